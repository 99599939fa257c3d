# Radiology CLIP from scratch on the phantom (its reports are the captions): the CPU quick start.
# ViT (patch 16 at 64 px, 3 blocks, width 96) + causal text transformer (2 blocks, width 64) over our
# byte-level BPE trained on the training reports (~830 ids: a 49k-row CLIP embedding would dominate a CPU step).
# Hardware: a CPU. Time: ~0.5 s/iter on one free core (set OMP_NUM_THREADS=1 on a shared, oversubscribed machine:
#   2 OpenMP threads were 10x slower there), i.e. ~10 min for 1,000 iterations plus evals.
# Expected (1,000-pair validation pool): see docs_clip.md for what was measured. Exact-text recall stays near
#   chance by construction (reports differ in randomly chosen negative sentences); the lab_ metrics count a
#   caption with the same findings as a match and print their chance level next to them.
#   python train_clip.py config/clip_phantom.py
out_dir = "out/clip_phantom"
data_dir = "data/phantom"
dataset = "phantom"
phantom_images = 12000
image_size = 64
in_chans = 1
patch_size = 16
vision_width = 96
vision_layers = 3
vision_heads = 3
embed_dim = 64
tokenizer = "bpe"
bpe_vocab_size = 1024
context_length = 48  # ~7% of phantom reports are longer (their last negative sentences are cut)
text_width = 64
text_layers = 2
text_heads = 2
batch_size = 64
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 20
learning_rate = 2e-3
min_lr = 2e-5
weight_decay = 0.2
eval_interval = 250
log_interval = 50
val_size = 1000
select_metric = "zs_auc_macro"
