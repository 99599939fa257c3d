# MDF-Net on MIMIC-CXR + MIMIC-IV-ED (seed 002's recipe, issue 17): BiomedCLIP's ViT-B/16 image tower, Clinical
# ModernBERT over the report's INDICATION, an MLP over age / sex / view / ED triage vitals; cross-attention fusion;
# two stages (frozen encoders at 1e-3, then encoders 1e-5 / fusion + head 1e-4); 0.7 BCE + 0.3 focal; early stop.
# Data (python data.py --dataset=mimic_cxr --root=<mimic-cxr-jpg/2.0.0> --clinical_root=<mimiciv> --out_dir=data/mimic_cxr
#   --image_size=224): the index carries indication, age, sex, view and the triage columns used below. Never feed
#   text_column='text' (FINDINGS / IMPRESSION): the CheXpert labeler made the labels from it.
# Weights (local files, downloaded once): BiomedCLIP's open_clip_pytorch_model.bin
#   (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) and a Hugging Face ModernBERT folder with
#   config.json + model.safetensors + tokenizer.json (Clinical ModernBERT; answerdotai/ModernBERT-base also loads).
# Hardware: 4 GPUs (batch 16 per GPU x accumulation 2 per GPU = global batch 128). One GPU: add
#   --gradient_accumulation_steps=2 (global batch 32, 4x the steps per epoch).
# Epoch equivalents (PROJECTIONS, not measured: no MIMIC access here): ~243k frontal train images (MIMIC-CXR-JPG
#   2.0.0, PA/AP) / 128 per step = ~1,900 steps per epoch, so stage 1 (freeze_iters 1,900) ~ 1 epoch, the whole
#   run (max_iters 19,000) ~ 10 epochs, an eval every ~0.5 epoch (eval_interval 1,000); early stopping after 5
#   stage-2 evals without a better val macro AUC (~2.5 epochs). Expected: fusion (all) above vision-only macro
#   AUC, as in MDF-Net (Hsieh et al. 2023); the size of the gain on MIMIC is not measured here.
#   torchrun --standalone --nproc_per_node=4 train.py config/fusion_mimic.py
#   for m in vision text clinical all; do torchrun --standalone --nproc_per_node=4 train.py config/fusion_mimic.py \
#     --modalities=$m --out_dir=out/fusion_mimic_${m}_s1337; done
#   python compare.py --ablation 'out/fusion_mimic_*' --group_by=modalities --baseline=vision
out_dir = "out/fusion_mimic_all_s1337"
data_dir = "data/mimic_cxr"
dataset = "mimic_cxr"
image_size = 224  # BiomedCLIP's 14x14 grid of 16-px patches (another size resamples the position embeddings)
in_chans = 1  # gray radiographs: BiomedCLIP's RGB patch filters are summed (== the RGB tower on a gray image)
norm = "imagenet"  # close to CLIP's pixel statistics, which the tower was trained with
modalities = "all"
fusion_mode = "cross_attention"  # the 196 BiomedCLIP patch tokens attend to the indication's ModernBERT tokens
vision_encoder = "clip"
vision_init = "weights/biomedclip/open_clip_pytorch_model.bin"
text_encoder = "modernbert"
text_init = "weights/clinical_modernbert"  # HF folder: config.json, model.safetensors, tokenizer.json
text_column = "indication"
text_context = 128  # indications are short
clinical_columns = "age,sex,view,temperature,heartrate,resprate,o2sat,sbp,dbp,acuity"  # pain and chiefcomplaint are free text
drop_path = 0.1
fusion_dim = 256
fusion_dropout = 0.3  # the seed's dropouts: 0.3 after fusion, 0.3 / 0.2 in the head
head_dropout = 0.3
head_dropout2 = 0.2
finetune_mode = "two_stage"
freeze_iters = 1900  # stage 1 ~ 1 epoch: clinical MLP + fusion + head at learning_rate, encoders frozen
learning_rate = 1e-3  # stage 1
stage2_lr = 1e-4  # stage 2: fusion + head
lr_backbone_mult = 0.1  # stage 2: encoders at 1e-4 x 0.1 = 1e-5
weight_decay = 1e-4
warmup_iters = 200
max_iters = 19000  # ~10 epochs (projection); early stopping usually ends the run before
lr_decay_iters = 19000
min_lr = 1e-6
early_stop_patience = 5  # stage-2 evals without a better select_metric
eval_interval = 1000
keep_last = 3  # also keep the last 3 periodic checkpoints ckpt_<iter>.pt
select_metric = "auc_macro"
loss = "bce+focal"
bce_weight = 0.7  # 0.7 BCE + 0.3 focal
focal_alpha = 0.25
focal_gamma = 2.0
batch_size = 16  # per GPU
gradient_accumulation_steps = 8  # global micro-steps: 2 per GPU on 4 GPUs
dtype = "bfloat16"
compile = True
augment = True
