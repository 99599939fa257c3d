# Radiology CLIP on ROCO (radiology subset, ~65k train / ~8.2k validation image-caption pairs), fine-tuned from
# OpenAI's CLIP ViT-B/16 (the Hugging Face folder openai/clip-vit-base-patch16, downloaded beforehand: the
# script never downloads). Both towers train, with layer-wise LR decay; one InfoNCE over the 512-pair global batch.
# Hardware: 4 GPUs (A100/H100 class), bf16. Time: not measured here (no GPU in the session that wrote it);
#   ~1,500 steps x 512 pairs ~ 12 epochs.
# Expected: ROCO retrieval papers report image->text R@10 in the ~0.3-0.5 range on 2k-8k pools after
#   fine-tuning; zero-shot OpenAI CLIP is far lower. Measure the baseline first with --eval_only=True.
# Prepare:  python data.py --dataset=roco --root=/data/roco --out_dir=data/roco --image_size=224
# Baseline: python train_clip.py config/clip_roco.py --eval_only=True
# Run:      torchrun --standalone --nproc_per_node=4 train_clip.py config/clip_roco.py
out_dir = "out/clip_roco"
data_dir = "data/roco"
dataset = "roco"
image_size = 224
in_chans = 3  # OpenAI's RGB patch filters as they are; the gray image is replicated
norm = "clip"  # OpenAI CLIP's pixel mean/std
init_from = "pretrained"
pretrained_path = "weights/clip-vit-base-patch16"  # HF folder: model.safetensors (or pytorch_model.bin) + config.json
tokenizer = "clip"
tokenizer_path = "weights/clip-vit-base-patch16"  # its vocab.json + merges.txt (same ids as open_clip's merges file)
context_length = 77
batch_size = 128  # per GPU
gradient_accumulation_steps = 4  # 4 GPUs x 1 micro-step: global batch 512
feature_cache = True
max_iters = 1500
lr_decay_iters = 1500
warmup_iters = 100
learning_rate = 1e-5  # fine-tuning CLIP: 1e-5..5e-5; higher forgets the pretraining
min_lr = 1e-6
weight_decay = 0.2
layer_decay_image = 0.8
layer_decay_text = 0.8
drop_path = 0.1
eval_interval = 125
eval_batch_size = 512
val_size = 0  # the whole ROCO validation split is the retrieval pool
select_metric = "r_mean"  # ROCO has captions but no finding labels: mean of R@1/5/10 both directions
compile = True
