# The ~5M-parameter ViT with a convolutional stem (vit_cxr) on the 9-class lung set
# (lung-covid, lung-oct-cnv, lung-oct-drusen, lung-opacity, lung-viral-pneumonia, ...), multi-class.
# Hardware: 1 GPU. Time: not measured here.
# Prepare: python data.py --dataset=folder --root=/data/lung9 --out_dir=data/lung9 --image_size=224
out_dir = "out/vit_cxr_lung9"
data_dir = "data/lung9"
dataset = "folder"
model = "vit_cxr"
image_size = 224
drop_path = 0.1
batch_size = 128
max_iters = 5000
lr_decay_iters = 5000
warmup_iters = 250
learning_rate = 1e-3
min_lr = 1e-5
weight_decay = 0.05
loss = "ce"
label_smoothing = 0.1
select_metric = "acc"
eval_interval = 250
augment = True  # random affine / crop / contrast / gamma / noise on the device
