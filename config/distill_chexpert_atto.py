# Knowledge distillation: the fine-tuned ConvNeXt-Tiny of config/convnext_chexpert.py teaches a ConvNeXt-Atto
# (3.4M parameters, ~1/8 of the teacher's FLOPs) on the same data (Hinton et al. 2015: soft BCE against the
# teacher's tempered sigmoids for multi-label, scaled by T^2; loss = (1 - alpha) * BCE + alpha * soft BCE).
# Hardware: 4 GPUs. Time: not measured here (no GPU in the session that wrote it); the teacher's forward adds
#   ~1/3 to each step. Expected: the student closes part of its gap to the teacher; compare against the same
#   student trained alone (--teacher_ckpt='') with compare.py over seeds before claiming it.
# Measured on the phantom (tests/test_export.py::test_distillation_improves_student): a 0.92 teacher trained on
#   12,000 images lifts a student on a 1,000-image set by +0.016 to +0.045 macro AUC in 150 steps (3 seeds).
# Run (teacher first):
#   torchrun --standalone --nproc_per_node=4 train.py config/convnext_chexpert.py
#   torchrun --standalone --nproc_per_node=4 train.py config/distill_chexpert_atto.py
out_dir = "out/distill_chexpert_atto"
data_dir = "data/chexpert"
dataset = "chexpert"
model = "convnext_atto"
image_size = 256
in_chans = 1
norm = "dataset"
teacher_ckpt = "out/convnext_chexpert/best.pt"  # its own normalization is applied to the teacher's input
distill_alpha = 0.7
distill_temperature = 2.0
drop_path = 0.05
batch_size = 64  # per GPU
gradient_accumulation_steps = 4  # global batch 256
max_iters = 6000
lr_decay_iters = 6000
warmup_iters = 300
learning_rate = 2e-3
min_lr = 2e-5
weight_decay = 0.05
loss = "bce"
augment = True  # random affine / crop / contrast / gamma / noise on the device
dtype = "auto"
compile = True
channels_last = True
select_metric = "auc_comp5"  # the 5-task CheXpert competition mean AUC (issue 15)
train_subset_images = 2000  # each eval: select_metric on 2,000 fixed train images too (the gap to val)
