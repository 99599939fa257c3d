# ConvNeXt-Tiny on CheXpert from random init: the "scratch" arm of the pretraining study (README,
# "Is pretraining worth it?"). Same data and budget as convnext_chexpert.py.
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
eval_interval = 500
compile = True
channels_last = True
augment = True  # random affine / crop / contrast / gamma / noise on the device
select_metric = "auc_comp5"  # the 5-task CheXpert competition mean AUC (issue 15)
