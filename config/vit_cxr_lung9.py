# The ~5M-parameter ViT with a convolutional stem (vit_cxr) on the 9-class lung set
# (lung-covid, lung-oct-cnv, lung-oct-drusen, lung-opacity, lung-viral-pneumonia, ...), multi-class.
# The seed's model: tokens at H/4 x W/4 from the convolutional stem (patch_size = 4: 56 x 56 = 3,136 tokens at
# 224 px), 10 blocks x 3 heads x width 192, 5.2M parameters. That is 16x the tokens of vit_cxr's default 16-px
# patches and 32x its forward FLOPs (105 vs 3.2 GFLOPs per image, model.estimate_flops; the attention over 3,137
# tokens dominates); --patch_size=16 is the cheap variant.
# Hardware: 1 GPU. Time: not measured here.
# Prepare (the seed's 5 : 2 : 1 train : val : test split, by patient / image):
#   python data.py --dataset=folder --root=/data/lung9 --out_dir=data/lung9 --image_size=224 --val_frac=0.25 \
#       --test_frac=0.125
out_dir = "out/vit_cxr_lung9"
data_dir = "data/lung9"
dataset = "folder"
model = "vit_cxr"
patch_size = 4  # tokens at H/4 x W/4 (the seed's); n_layer / n_head / n_embd keep vit_cxr's 10 / 3 / 192
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
train_subset_images = 2000  # each eval: select_metric on 2,000 fixed train images too (the gap to val)
