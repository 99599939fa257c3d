# CLIP distillation on the phantom (export.py's "distill" for CLIP; CLIP-KD, Yang et al. 2024): a small student
# learns from the two-stage phantom CLIP on every batch: loss = (1 - distill_alpha) x InfoNCE + distill_alpha x
# KL(teacher || student) over the batch's image->text and text->image similarity distributions + distill_feature x
# (1 - cosine) between the student's and the teacher's embeddings of each image and report.
#   python train.py && python train_clip.py config/clip_phantom.py        # stage 1 + 2: the teacher (3.55M params)
#   python train_clip.py config/distill_clip_phantom.py                    # the student (0.69M params), ~2 min
#   python train_clip.py config/distill_clip_phantom.py --teacher_ckpt= --out_dir=out/clip_student_alone  # baseline
# Student: a ViT (3 blocks, width 128, 8-px patches, from scratch) and a 1-block text transformer (width 48) over
# the same BPE; the teacher brings its own tokenizer, normalization and image size (the student's images are
# converted for it). Data, schedule and zero-shot prompts as config/clip_phantom.py.
# Expected: see the README's CLIP distillation table (negation-aware zero-shot macro AUC, student alone vs taught).
out_dir = "out/clip_student"
data_dir = "data/phantom"
dataset = "phantom"
phantom_images = 12000
image_size = 64
in_chans = 1
image_model = "clip_vit"
embed_dim = 64
tokenizer = "bpe"
bpe_vocab_size = 1024
context_length = 48
batch_size = 64
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
learning_rate = 2e-3
min_lr = 2e-5
weight_decay = 0.2
eval_interval = 100
log_interval = 50
val_size = 1000
zs_prompts = "phantom"
select_metric = "zs_neg_auc_macro"
vision_width = 128
vision_layers = 3
vision_heads = 4
patch_size = 8
text_width = 48
text_layers = 1
text_heads = 2
teacher_ckpt = "out/clip_phantom/best.pt"
distill_alpha = 0.5
distill_temperature = 1.0
distill_feature = 2.0  # + 2 x (1 - cos) to the teacher's embeddings (same width, 64): the term that made the gain robust
seed = 7
