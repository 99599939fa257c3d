# Stage 2 of 2: finetune the PubMed-pretrained GPT (config/gpt_pubmed_pretrain.py) on ROCO captions.
# Data:     python text_data.py --dataset=roco_text --root=/data/roco --tokenizer=data/pubmed/tokenizer.json \
#               --out_dir=data/roco_pubmedtok        (same tokenizer as the pretraining, or the load is refused)
# Run:      python train_gpt.py config/gpt_roco_finetune.py --pretrained_path=out/gpt_pubmed/ckpt.pt
# Hardware: one GPU.
# Time:     ~10 min on one A100 (2000 steps).
# Expected: not yet measured in this repository; the pretrained start should beat config/gpt_roco.py's val
#           bits-per-byte (bpb, not loss: the tokenizers differ) after far fewer steps. That is not a controlled
#           study: the model (12x768 from the pretraining vs 6x384), tokenizer, batch and dropout differ too.
out_dir = "out/gpt_roco_finetune"
dataset = "roco_pubmedtok"
init_from = "pretrained"  # weights of pretrained_path, fresh optimizer, step 0
pretrained_path = "out/gpt_pubmed/ckpt.pt"
eval_interval = 200
log_interval = 10
eval_max_windows = 0
batch_size = 32
gradient_accumulation_steps = 1
block_size = 256
dropout = 0.1
learning_rate = 1e-4  # finetuning: ~1/6 of the pretraining peak
max_iters = 2000
warmup_iters = 100
min_lr = 1e-5
compile = True
