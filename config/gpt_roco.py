# GPT on ROCO radiology captions (~65k train / 8k val captions, ~30 BPE tokens each).
# Purpose:  a caption language model; the bits-per-byte it prints compares tokenizers fairly.
# Data:     python text_data.py --dataset=roco_text --root=/data/roco --tokenizer=bpe --vocab_size=8192
# Hardware: one GPU (any 16 GB+); torchrun --standalone --nproc_per_node=4 train_gpt.py config/gpt_roco.py for 4.
# Time:     ~10 min on one A100/H100 (3000 steps x 64 x 256 tokens, ~25M-param model, bf16, compile).
# Expected: not yet measured on real ROCO in this repository; the run prints val loss / ppl / bpb. With ~2M train
#           tokens, a 6-layer model overfits after a few epochs: watch val loss and keep the best checkpoint.
out_dir = "out/gpt_roco"
dataset = "roco_text"
eval_interval = 250
log_interval = 10
eval_max_windows = 0  # the whole val split (~250k tokens)
batch_size = 64
gradient_accumulation_steps = 1
block_size = 256  # several captions per window, separated by <|endoftext|>
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2  # small data
pos = "learned"
learning_rate = 1e-3
max_iters = 3000
warmup_iters = 100
min_lr = 1e-4
beta2 = 0.99
compile = True
