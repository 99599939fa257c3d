# Quick start: the default run of `python train.py`, spelled out.
# Purpose: a first end-to-end run on the generated phantom (data/phantom, made on first use).
# Hardware: any CPU (2 cores is enough). Time: ~3 min on 2 cores (measured, see README).
# Expected: validation macro AUC >= 0.90 over the 10 phantom findings.
out_dir = "out/quickstart"
data_dir = "data/phantom"
dataset = "phantom"
model = "convnext_atto"
image_size = 64
batch_size = 64
max_iters = 800
lr_decay_iters = 800
eval_interval = 200
learning_rate = 8e-3
augment = False
