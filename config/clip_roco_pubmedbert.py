# ROCO from BiomedCLIP (Zhang et al. 2023: ViT-B/16 + PubMedBERT, trained on PMC-15M), fine-tuned.
# Weights: microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (open_clip_pytorch_model.bin) and the
# vocab.txt of microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract, downloaded beforehand.
# The text tower is BERT (post-LN, [CLS] pooling, MLP projection), WordPiece tokens, 256-token context.
# Hardware: 4 GPUs, bf16. Time: not measured here. Expected: above clip_roco.py (BiomedCLIP's pretraining
#   covers PubMed figures, ROCO's source); check the zero-shot baseline first with --eval_only=True.
#   torchrun --standalone --nproc_per_node=4 train_clip.py config/clip_roco_pubmedbert.py
out_dir = "out/clip_roco_pubmedbert"
data_dir = "data/roco"
dataset = "roco"
image_size = 224
in_chans = 3
norm = "clip"  # BiomedCLIP's preprocessing uses OpenAI CLIP's mean/std
init_from = "pretrained"
pretrained_path = "weights/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224/open_clip_pytorch_model.bin"
tokenizer = "wordpiece"
tokenizer_path = "weights/BiomedNLP-BiomedBERT-base-uncased-abstract/vocab.txt"
context_length = 256
batch_size = 128
gradient_accumulation_steps = 4
max_iters = 1500
lr_decay_iters = 1500
warmup_iters = 100
learning_rate = 1e-5
min_lr = 1e-6
weight_decay = 0.2
layer_decay_image = 0.8
layer_decay_text = 0.8
eval_interval = 125
eval_batch_size = 512
val_size = 0
select_metric = "r_mean"
compile = True
