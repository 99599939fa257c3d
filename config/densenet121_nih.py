# CheXNet's baseline (Rajpurkar et al. 2017): DenseNet-121 from ImageNet on NIH ChestX-ray14,
# 14 findings, official train_val/test lists.
# Hardware: 1-4 GPUs. Time: not measured here.
# Expected: mean AUC ~0.84 over the 14 findings (CheXNet reports 0.841).
# Prepare: python data.py --dataset=nih --root=/data/nih --out_dir=data/nih --image_size=256
out_dir = "out/densenet121_nih"
data_dir = "data/nih"
dataset = "nih"
model = "tv:densenet121"
image_size = 256
init_from = "pretrained"
pretrained_path = "torchvision:DenseNet121_Weights.IMAGENET1K_V1"
norm = "imagenet"
batch_size = 32
gradient_accumulation_steps = 4
max_iters = 8000
lr_decay_iters = 8000
warmup_iters = 200
learning_rate = 3e-4
min_lr = 3e-6
weight_decay = 1e-4
eval_interval = 500
channels_last = True
augment = True  # random affine / crop / contrast / gamma / noise on the device
train_subset_images = 2000  # each eval: select_metric on 2,000 fixed train images too (the gap to val)
