# Two-stage fine-tuning on CheXpert: head only for freeze_iters, then everything with
# discriminative LRs (backbone at 0.1x) and layer decay.
# Hardware: 4 GPUs. Time: not measured here. Expected: ~0.90 5-task mean AUC, as convnext_chexpert.py.
#   torchrun --standalone --nproc_per_node=4 train.py config/two_stage_chexpert.py
out_dir = "out/two_stage_chexpert"
data_dir = "data/chexpert"
dataset = "chexpert"
model = "convnext_tiny"
image_size = 256
init_from = "pretrained"
pretrained_path = "torchvision:ConvNeXt_Tiny_Weights.IMAGENET1K_V1"
norm = "imagenet"
finetune_mode = "two_stage"
freeze_iters = 500
lr_backbone_mult = 0.1
layer_decay = 0.8
batch_size = 32
gradient_accumulation_steps = 4
max_iters = 6000
lr_decay_iters = 6000
warmup_iters = 300
learning_rate = 1e-3
min_lr = 1e-5
eval_interval = 500
early_stop_patience = 4
compile = True
channels_last = True
augment = True  # random affine / crop / contrast / gamma / noise on the device
select_metric = "auc_comp5"  # the 5-task CheXpert competition mean AUC (issue 15)
train_subset_images = 2000  # each eval: select_metric on 2,000 fixed train images too (the gap to val)
