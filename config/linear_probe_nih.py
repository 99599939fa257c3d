# Linear probe on NIH ChestX-ray14: ImageNet ConvNeXt-Tiny frozen (BN/LN statistics too), only the
# head trains. A cheap measure of how transferable the features are.
# Hardware: 1 GPU (or a CPU at small image sizes). Time: not measured here.
# Expected: clearly below full fine-tuning (literature: ~0.75-0.80 mean AUC for ImageNet linear probes).
out_dir = "out/linear_probe_nih"
data_dir = "data/nih"
dataset = "nih"
model = "convnext_tiny"
image_size = 224
init_from = "pretrained"
pretrained_path = "torchvision:ConvNeXt_Tiny_Weights.IMAGENET1K_V1"
norm = "imagenet"
finetune_mode = "linear_probe"
augment = False
batch_size = 128
max_iters = 3000
lr_decay_iters = 3000
warmup_iters = 100
learning_rate = 1e-3
weight_decay = 0.0
eval_interval = 500
