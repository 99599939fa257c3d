# CLIP distillation on ROCO: a ViT-Tiny-sized student (12 blocks, width 192, 16-px patches, ~5.5M image params)
# with a small text transformer (4 blocks, width 256) learns from the fine-tuned ViT-B/16 radiology CLIP
# (config/clip_roco.py writes out/clip_roco/best.pt: the teacher, ~150M params) on every batch:
# loss = 0.5 x InfoNCE + 0.5 x KL(teacher || student) over the global batch's similarities (gathered across GPUs),
# + a feature term (1 - cos) to the teacher's embeddings (same width: embed_dim 512).
# The teacher keeps its own CLIP tokenizer and RGB CLIP normalization; the student reads the same gray pixels
# (in_chans=1) and a BPE trained on the ROCO captions (small vocabulary: a cheap embedding).
# Hardware: 4 GPUs, bf16. Time: not measured here (no GPU in the session that wrote it); the teacher's forward
#   adds ~1/3 of a ViT-B/16 training step per batch.
# Expected: not measured. The phantom version (config/distill_clip_phantom.py) is measured in the README.
# Run: torchrun --standalone --nproc_per_node=4 train_clip.py config/distill_clip_roco.py
#      baseline: ... config/distill_clip_roco.py --teacher_ckpt= --out_dir=out/clip_roco_tiny_alone
out_dir = "out/clip_roco_tiny"
data_dir = "data/roco"
dataset = "roco"
image_size = 224
in_chans = 1
norm = "dataset"
image_model = "clip_vit"
embed_dim = 512
patch_size = 16
vision_width = 192
vision_layers = 12
vision_heads = 3
tokenizer = "bpe"
bpe_vocab_size = 8192
context_length = 77
text_width = 256
text_layers = 4
text_heads = 4
teacher_ckpt = "out/clip_roco/best.pt"
distill_alpha = 0.5
distill_temperature = 1.0
distill_feature = 1.0
batch_size = 128  # per GPU
gradient_accumulation_steps = 4  # 4 GPUs x 1 micro-step: global batch 512
feature_cache = True
max_iters = 3000
lr_decay_iters = 3000
warmup_iters = 200
learning_rate = 5e-4
min_lr = 1e-5
weight_decay = 0.2
eval_interval = 250
eval_batch_size = 512
val_size = 0
select_metric = "r_mean"
compile = True
