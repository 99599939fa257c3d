# ConvNeXt-Tiny on CheXpert from random init: the "scratch" arm of the pretraining study (README,
# "Is pretraining worth it?", docs/studies.md). Same data, budget and recipe as convnext_chexpert.py; the
# arms differ only in the initialisation and what follows from it (init_from / pretrained_path, norm: this
# arm's own data statistics, learning_rate 5x the fine-tune's and min_lr = learning_rate / 100 in both);
# tests/test_recipes.py checks it.
# Hardware: 4 GPUs. Time: not measured here. Expected: a few AUC points below the pretrained arm
#   (from-scratch CNNs on CheXpert land around 0.85-0.88 5-task mean AUC in the literature).
#   torchrun --standalone --nproc_per_node=4 train.py config/convnext_chexpert_scratch.py --seed=0 --out_dir=out/scratch_s0
out_dir = "out/convnext_chexpert_scratch"
data_dir = "data/chexpert"
dataset = "chexpert"
model = "convnext_tiny"
image_size = 256
init_from = "scratch"
drop_path = 0.1
batch_size = 32
gradient_accumulation_steps = 4
max_iters = 6000
lr_decay_iters = 6000
warmup_iters = 300
learning_rate = 1e-3
min_lr = 1e-5
weight_decay = 0.05
loss = "bce"
ema_decay = 0.9998  # evaluated beside the raw weights, not selected: as in the pretrained arm
eval_interval = 500
compile = True
channels_last = True
augment = True  # random affine / crop / contrast / gamma / noise on the device
select_metric = "auc_comp5"  # the 5-task CheXpert competition mean AUC (issue 15)
train_subset_images = 2000  # each eval: select_metric on 2,000 fixed train images too (the gap to val)
