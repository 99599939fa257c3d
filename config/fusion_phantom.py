# Multimodal fusion on the phantom (CPU): image + clinical indication text + age/sex/view, all encoders from
# scratch in one stage (two_stage only pays off with pretrained encoders: see config/fusion_mimic_like.py).
# The phantom's indication is drawn from the findings half of the time and age/sex/view follow the findings
# (phantom.py), so each modality carries signal and the ablation shows what fusion adds.
# Hardware: a laptop CPU (2 cores). Time: 0.5-11 min per run at 32 px on 2 busy cores (clinical fastest, all slowest).
# Expected (measured with the ablation commands below): val macro AUC vision 0.52, text 0.73, clinical 0.63, text,clinical 0.76,
# all 0.75: at 32 px / 300 iterations the image branch has not learned yet (64 px: --data_dir=data/phantom
# --image_size=64 --batch_size=64, where vision alone reaches >= 0.85, not measured here).
# The ablation (one row per modality set; compare.py groups by the `modalities` key of config.json):
#   python data.py --dataset=phantom --out_dir=data/phantom32 --image_size=32 --n_images=6000
#   for m in vision text clinical vision,text vision,clinical text,clinical all; do
#     python train.py config/fusion_phantom.py --modalities=$m --out_dir=out/fusion_${m/,/+}_s1337; done
#   python compare.py --ablation 'out/fusion_*' --group_by=modalities --baseline=vision
out_dir = "out/fusion_all_s1337"
data_dir = "data/phantom32"
dataset = "phantom"
phantom_images = 6000
image_size = 32
model = "convnext_atto"
modalities = "all"
fusion_mode = "concat"  # cross_attention: image tokens attend to the indication's tokens (a 1x1 map at 32 px: use >= 64 px)
text_column = "indication"  # never 'text': the phantom's labels are exactly what its report says
clinical_columns = "age,sex,view"
text_encoder = "small"
text_context = 48  # phantom indications are <= 42 bytes (+ BOS)
text_width = 64
text_heads = 2
finetune_mode = "full"
batch_size = 32
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
learning_rate = 4e-3  # as the quick start: ConvNeXt from scratch
min_lr = 4e-5
eval_interval = 100
loss = "bce+focal"  # 0.7 bce + 0.3 focal (alpha 0.25, gamma 2): the recipe default
augment = True
tensorboard = False
