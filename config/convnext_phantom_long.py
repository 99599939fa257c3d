# The quick start, 3x longer and with augmentation: a stronger phantom classifier (ConvNeXt-atto, 2,400 steps of 64
# images at 64 px, on-device augmentation). The report GPT (config/gpt_report_from_image.py) starts its image
# encoder from it: a report cannot name a finding the image model does not see, and the quick start's classifier
# (val macro AUC ~0.92, macro-F1 ~0.55 at p >= 0.5) caps the reports far below the target.
#   python train.py config/convnext_phantom_long.py
# Hardware: CPU, ~10-12 min on 2 free cores (~0.25 s/step; 609 s in the full test run of ccce5c6); one GPU: about a minute.
# Measured (2 cores): val macro AUC 0.901 at step 800, 0.959 at 1,600, 0.977 at 2,400; on the first 3,000 test
#   images macro AUC 0.975, macro-F1 0.807 at p >= 0.5 (0.815 with per-class F1 thresholds chosen on val).
#   Re-run 2026-11-30 (the full test run's fixture): 0.902, 0.958, 0.975 val macro AUC, 609 s.
out_dir = "out/phantom_long"
data_dir = "data/phantom"
dataset = "phantom"
model = "convnext_atto"
image_size = 64
batch_size = 64
max_iters = 2400
lr_decay_iters = 2400
warmup_iters = 50
eval_interval = 400
learning_rate = 8e-3
min_lr = 4e-5
augment = True
