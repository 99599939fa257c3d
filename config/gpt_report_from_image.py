# Report from image: a GPT conditioned on 16 visual tokens (4x4 grid from a small conv encoder + mapping
# network) writes the phantom's radiology report; loss on report tokens only.
# Purpose:  show image-conditioned generation that names the findings actually in the image.
# Data:     python text_data.py --dataset=phantom_pairs --tokenizer=bpe --vocab_size=1024 --max_tokens=64
#           (made automatically on first use: 12000 images at 64 px, split by patient, reports as BPE ids)
# Hardware: CPU works (2 cores); one GPU takes ~1 min.
# Time:     ~1-3 s/step on 2 heavily shared CPU cores (1000 steps: 20-50 min); a GPU: ~1-2 min.
# Expected: prints finding macro-F1 of the greedy reports (rule-based, negation-aware labeler vs the true labels)
#           and BLEU-4 / ROUGE-L against the references. NOT YET TUNED: measured so far (CPU, 32 px, 400 steps)
#           macro-F1 0.31-0.34, BLEU-4 0.29, ROUGE-L 0.47 (cardiomegaly, effusion, devices learned; the rest not);
#           the target is macro-F1 >= 0.7, which likely needs ~2000+ steps at batch 64 or a stronger encoder.
# Swap the encoder for a model.py backbone: --image_encoder=convnext_atto (n_prefix any number then).
out_dir = "out/gpt_report_from_image"
dataset = "phantom_pairs"
cond = "image"
device = "cpu"
eval_interval = 250
log_interval = 25
eval_reports = 300  # val images to write reports for at each eval
batch_size = 32
n_layer = 3
n_head = 4
n_embd = 128
n_prefix = 16  # 4 x 4 grid of visual tokens: keeps left/right apart
image_encoder = "conv"
prefix_width = 64
dropout = 0.0
learning_rate = 2e-3
max_iters = 1000
warmup_iters = 30
min_lr = 2e-4
beta2 = 0.99
