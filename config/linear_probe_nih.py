# Linear probe on NIH ChestX-ray14: ImageNet ConvNeXt-Tiny frozen (BN/LN statistics too), only the
# head trains. A cheap measure of how transferable the features are.
# Hardware: 1 GPU (or a CPU at small image sizes). Time: not measured here.
# Expected: clearly below full fine-tuning (literature: ~0.75-0.80 mean AUC for ImageNet linear probes).
# Optimizer: SGD with momentum at LR 0.1, no weight decay, as the seed writes linear probes (the MoCo / SimCLR
#   linear-evaluation protocol: a convex problem on frozen features, where a large SGD step converges fast).
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
optimizer = "sgd"
momentum = 0.9
learning_rate = 0.1
min_lr = 1e-3  # learning_rate / 100
weight_decay = 0.0
eval_interval = 500
train_subset_images = 2000  # each eval: select_metric on 2,000 fixed train images too (the gap to val)
