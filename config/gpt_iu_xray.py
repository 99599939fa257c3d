# GPT on real radiology reports: the Indiana University chest X-ray collection (Open-i), findings + impression.
# Purpose:  a report language model on real text, scored in bits per byte against a classical compressor computed
#           in the same run (xz -9 of the val reports given the train reports; train_gpt.py prints both at the end).
# Data:     python text_data.py --dataset=iu_xray --root=/data/iu_xray --tokenizer=bpe --vocab_size=1024
#           (--root holds ecgen-radiology/ or NLMCXR_reports.tgz; 'XXXX', the anonymisation mark, stays one token)
# Hardware: CPU (2 cores); a GPU finishes in seconds.
# Time:     140 CPU-seconds with OMP_NUM_THREADS=1 (800 steps, ~0.17 s each, + 9 evals + xz), i.e. ~2.5 min on one
#           free core; measured on a machine loaded ~15x (wall 33 min there: the CPU time is the honest figure).
# Expected: measured on the 994-report sample (984 reports, 740 train / 98 val): val bpb 0.719 vs xz -9 0.876 in the
#           same run (val loss 2.31 nats/token vs unigram entropy 5.41); bpb 1.02 at step 100, 0.88 at 200, 0.79 at 400.
# Then:     python sample.py --out_dir=out/gpt_iu_xray --start="The heart"
out_dir = "out/gpt_iu_xray"
dataset = "iu_xray"
device = "cpu"
eval_interval = 100
log_interval = 20
eval_max_windows = 0  # the whole val split: the xz baseline reads all of it too
batch_size = 16
block_size = 128  # tokens; a report is ~60
n_layer = 3
n_head = 3
n_embd = 96
dropout = 0.1  # small data (~0.2M bytes of train text in the 994-report sample)
pos = "learned"
learning_rate = 2e-3
max_iters = 800  # ~30 passes over the ~44k train tokens of the sample; val loss still falls at the end
warmup_iters = 30
min_lr = 2e-4
beta2 = 0.99
