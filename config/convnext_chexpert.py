# ConvNeXt-Tiny fine-tuned from ImageNet on CheXpert (the seeds' recipe: AdamW, warmup + cosine,
# BCE, selection on validation macro AUC); the "pretrained" arm of the pretraining study (docs/studies.md).
# The arms differ only in the initialisation and what follows from it: init_from / pretrained_path, norm
# (ImageNet statistics for ImageNet weights), learning_rate and min_lr (same min_lr / learning_rate = 1/100);
# tests/test_recipes.py checks it. Both take loss = "bce" and ema_decay = 0.9998 (EMA is only evaluated beside the
# raw weights, never selected); neither takes layer decay, a fine-tuning device that would slow the scratch arm's
# first layers: the layer-decayed fine-tune is config/two_stage_chexpert.py.
# Hardware: 4 GPUs (A100/H100 class), bf16. Time: not measured here (no GPU in the session that wrote it).
# Expected: CheXpert 5-task (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion) mean AUC
#   ~0.90 on the official validation set (Irvin et al. 2019 report 0.907 for their best single-policy model).
# Prepare first:
#   python data.py --dataset=chexpert --root=/data/CheXpert-v1.0-small --out_dir=data/chexpert --image_size=256 \
#       --uncertain_policy=ones --views=frontal
# Run:
#   torchrun --standalone --nproc_per_node=4 train.py config/convnext_chexpert.py
out_dir = "out/convnext_chexpert"
data_dir = "data/chexpert"
dataset = "chexpert"
model = "convnext_tiny"
image_size = 256
in_chans = 1  # ImageNet RGB stem summed to one channel at load time
init_from = "pretrained"
pretrained_path = "torchvision:ConvNeXt_Tiny_Weights.IMAGENET1K_V1"
norm = "imagenet"
drop_path = 0.1
batch_size = 32  # per GPU
gradient_accumulation_steps = 4  # global: 4 GPUs x 1 -> global batch 128
max_iters = 6000  # ~3.5 epochs of the 191k frontal training images at batch 128
lr_decay_iters = 6000
warmup_iters = 300
learning_rate = 2e-4
min_lr = 2e-6
weight_decay = 0.05
loss = "bce"
eval_interval = 500
select_metric = "auc_comp5"  # the 5-task CheXpert competition mean AUC (issue 15)
ema_decay = 0.9998
compile = True
channels_last = True
augment = True  # random affine / crop / contrast / gamma / noise on the device
train_subset_images = 2000  # each eval: select_metric on 2,000 fixed train images too (the gap to val)
