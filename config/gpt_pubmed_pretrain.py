# Stage 1 of 2: pretrain a GPT-2-small-sized model on PubMed abstracts (one abstract per line), then finetune
# on ROCO captions with config/gpt_roco_finetune.py.
# Data:     python text_data.py --dataset=text --files='/data/pubmed/*.txt' --tokenizer=bpe --vocab_size=16384 \
#               --out_dir=data/pubmed
#           (the ROCO finetune data must reuse this tokenizer: --tokenizer=data/pubmed/tokenizer.json)
# Hardware: 8 GPUs (torchrun --standalone --nproc_per_node=8 train_gpt.py config/gpt_pubmed_pretrain.py),
#           or 2 nodes x 8; gradient_accumulation_steps is global so the token batch stays ~0.5M.
# Time:     ~5 h on 8 x A100 for 50k steps (~25B tokens is far more than needed; stop when val loss flattens).
# Expected: not yet measured in this repository; GPT-2 small on biomedical text typically reaches a val loss
#           of ~2.3-2.6 nats/token with a domain BPE.
out_dir = "out/gpt_pubmed"
dataset = "pubmed"
eval_interval = 1000
log_interval = 10
eval_max_windows = 400
batch_size = 16
gradient_accumulation_steps = 32  # 16 x 32 x 1024 = 0.5M tokens per step (GPT-3 small)
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
pos = "rope"  # finetuning may use a different context length
learning_rate = 6e-4
max_iters = 50000
warmup_iters = 2000
lr_decay_iters = 50000
min_lr = 6e-5
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0
compile = True
