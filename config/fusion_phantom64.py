# Multimodal fusion on the phantom at 64 px where every modality carries signal: the vision encoder starts from
# the quick start's checkpoint (python train.py -> out/quickstart/best.pt, val macro AUC ~0.91), the small text
# encoder reads the indication, the clinical MLP reads age/sex/view; two stages (frozen vision encoder, then all).
# Hardware: CPU, 2 cores. Time: see the README's fusion ablation (measured there, with the commands).
#   python train.py                                   # the quick start: data/phantom (64 px) + out/quickstart/best.pt
#   for m in vision text clinical all; do
#     python train.py config/fusion_phantom64.py --modalities=$m --out_dir=out/fusion64_${m/,/+}_s1337; done
# text / clinical rows have no vision encoder: add --init_from=scratch for them.
# Variant with a pretrained text encoder (measured to help most, see the README's table):
#   python train.py config/fusion_phantom64.py --init_from=scratch --modalities=text --finetune_mode=full \
#     --learning_rate=3e-3 --lr_backbone_mult=1.0 --max_iters=800 --lr_decay_iters=800 --min_lr=3e-5 \
#     --eval_interval=200 --out_dir=out/fusion64_text_pre
#   python train.py config/fusion_phantom64.py --modalities=all --text_init=out/fusion64_text_pre/best.pt --out_dir=out/fusion64_all_textpre
# Expected (measured, one seed, val macro AUC): vision 0.901, text 0.714, clinical 0.650, all 0.908: all beats
# vision by 0.007, short of the 0.02 issue 17 asks for (a logistic regression on the same inputs gets +0.022).
out_dir = "out/fusion64_all_s1337"
data_dir = "data/phantom"
dataset = "phantom"
image_size = 64
model = "convnext_atto"
init_from = "pretrained"
pretrained_path = "out/quickstart/best.pt"
modalities = "all"
fusion_mode = "concat"
text_column = "indication"  # never 'text': the phantom's labels are exactly what its report says
clinical_columns = "age,sex,view"
text_encoder = "small"
text_context = 48  # phantom indications are <= 42 bytes (+ BOS)
text_width = 64
text_heads = 2
finetune_mode = "two_stage"
freeze_iters = 200
max_iters = 400
lr_decay_iters = 400
warmup_iters = 20
learning_rate = 1e-3  # stage 1: fusion + head (+ clinical MLP)
stage2_lr = 1e-4  # stage 2: fusion + head; encoders x lr_backbone_mult
lr_backbone_mult = 0.1
min_lr = 1e-5
batch_size = 32
eval_interval = 100
loss = "bce+focal"
augment = False  # as the quick start that trained the vision encoder
tensorboard_log = False
