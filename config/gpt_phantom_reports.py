# GPT on the phantom's radiology reports: the CPU quick start for train_gpt.py.
# Purpose:  see a language model learn report structure in minutes, no downloads (data/phantom_reports is
#           generated on first use: 12000 reports split by patient, byte-level BPE with ~830 tokens, ~25 per report;
#           for a char-level model: python text_data.py --dataset=phantom_reports --tokenizer=char
#           --out_dir=data/phantom_reports_char, then --dataset=phantom_reports_char --block_size=256).
# Hardware: CPU (2+ cores); a GPU finishes in well under a minute.
# Time:     ~1-1.5 min on 2 quiet CPU cores (600 steps: 54 s for issue 21, 82 s + 8 s data on 2026-11-30); more on busy cores.
# Expected: val loss ~0.65 nats/token (measured 0.647) vs the unigram entropy 4.116 nats/token printed at start
#           (BPE tokens: the run prints nats per token, and bpb, bits per byte of text, beside it);
#           samples read like phantom reports ("Small right pleural effusion. No pneumothorax.").
# Then:     python sample.py --out_dir=out/gpt_phantom_reports --start="Moderate"
out_dir = "out/gpt_phantom_reports"
dataset = "phantom_reports"
device = "cpu"
eval_interval = 200
log_interval = 20
eval_max_windows = 100
batch_size = 32
block_size = 64  # tokens; a report is ~25
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
pos = "learned"
learning_rate = 2e-3  # tiny model, large lr
max_iters = 600
warmup_iters = 30
min_lr = 2e-4
beta2 = 0.99  # few tokens per step
