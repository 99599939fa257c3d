# MDF-Net-style fusion on a MIMIC-CXR-like data set: frontal image + the report's INDICATION section + age, sex,
# view, two stages (frozen encoders, then everything with discriminative LRs and early stopping).
# Data: a prepared folder data/mimic_cxr whose {split}_index.csv carries, per image,
#   indication   the INDICATION (or HISTORY / REASON FOR EXAM) section of the study's report, de-identified
#                ("___") as MIMIC ships it; NOT the FINDINGS / IMPRESSION text: the CheXpert labeler made the
#                labels from those, so feeding them leaks the answer (text_column='text' would)
#   age, sex     MIMIC-IV patients.csv anchor_age / gender joined on subject_id (empty cell = missing)
#   view         ViewPosition of mimic-cxr-2.0.0-metadata.csv (PA / AP / LATERAL ...)
# and labels from mimic-cxr-2.0.0-chexpert.csv (14 observations, -1 policy as for CheXpert). data.py has no
# MIMIC reader yet: write the folder with data.write_prepared(out_dir, {split: (images, labels, records)}, meta).
# Encoders: the vision encoder starts from a CheXpert / MIMIC train.py checkpoint (or ImageNet weights), the
# text encoder from a radiology CLIP (train_clip.py out/clip_roco_pubmedbert/best.pt, or BiomedCLIP weights).
# Hardware: 4 GPUs. Time: not measured here (no MIMIC access). Expected: fusion > vision-only macro AUC, as in
# MDF-Net (Hsieh et al. 2023); run the ablation with --modalities=vision / all into out/fusion_mimic_<m>_s<seed>.
#   torchrun --standalone --nproc_per_node=4 train.py config/fusion_mimic_like.py
#   torchrun --standalone --nproc_per_node=4 train.py config/fusion_mimic_like.py --modalities=vision --out_dir=out/fusion_mimic_vision_s1337
#   python compare.py --ablation 'out/fusion_mimic_*' --group_by=modalities --baseline=vision
out_dir = "out/fusion_mimic_all_s1337"
data_dir = "data/mimic_cxr"
dataset = "mimic_cxr"
image_size = 224
model = "convnext_tiny"
init_from = "pretrained"
pretrained_path = "out/convnext_chexpert/best.pt"  # a train.py checkpoint (head dropped); or torchvision:ConvNeXt_Tiny_Weights.IMAGENET1K_V1 with norm='imagenet'
modalities = "all"
fusion_mode = "cross_attention"  # 7x7 ConvNeXt tokens attend to the indication's tokens
text_column = "indication"
clinical_columns = "age,sex,view"
text_encoder = "clip"
text_init = "out/clip_roco_pubmedbert/best.pt"  # or BiomedCLIP's open_clip_pytorch_model.bin (then text_tokenizer=wordpiece + its vocab.txt)
text_tokenizer = "auto"  # a train_clip.py checkpoint brings its tokenizer settings
text_context = 128  # indications are short; 256 is BiomedCLIP's maximum
drop_path = 0.1
fusion_dim = 256
fusion_dropout = 0.3
head_dropout = 0.3
head_dropout2 = 0.2
# two stages in one command: fusion + head (+ clinical MLP) at 1e-3 with the encoders frozen, then all at
# stage2_lr = 1e-4 with the encoders at 1e-4 x 0.1 = 1e-5, early stopping on the stage-2 evals
finetune_mode = "two_stage"
freeze_iters = 1000
learning_rate = 1e-3
stage2_lr = 1e-4
lr_backbone_mult = 0.1
early_stop_patience = 5
loss = "bce+focal"  # 0.7 bce + 0.3 focal, alpha 0.25, gamma 2
bce_weight = 0.7
focal_alpha = 0.25
focal_gamma = 2.0
batch_size = 32  # per GPU
gradient_accumulation_steps = 4  # global batch 128 on 4 GPUs
max_iters = 8000
lr_decay_iters = 8000
warmup_iters = 200
min_lr = 1e-6
weight_decay = 0.05
eval_interval = 500
select_metric = "auc_macro"  # best.pt; best_worst.pt keeps the best worst-class AUC, ckpt.pt the latest
compile = True
channels_last = True
augment = True  # random affine / crop / contrast / gamma / noise on the device
