"""
Train an image classifier (multi-label chest X-ray findings, or multi-class e.g. OCT / lung sets).

With no arguments it is the quick start: generate the phantom (data/phantom) if it is missing,
train a small ConvNeXt on it on the CPU, and end with the validation macro AUC (~0.9x, ~4 minutes
on 2 cores):

    python train.py

A recipe, overriding knobs on the command line (configurator.py, as in nanoGPT):

    python train.py config/convnext_chexpert.py --batch_size=32 --compile=False

One GPU:
    python train.py config/convnext_chexpert.py --device=cuda

One node, 4 GPUs (gradient_accumulation_steps is global and is divided across the ranks):
    torchrun --standalone --nproc_per_node=4 train.py config/convnext_chexpert.py

CPU, 2 processes (gloo), as the tests do:
    torchrun --standalone --nproc_per_node=2 train.py --device=cpu

Two nodes, 4 GPUs each (run on both, with the first node's address):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --master_addr=10.0.0.1 --master_port=29500 train.py config/x.py
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=4 --master_addr=10.0.0.1 --master_port=29500 train.py config/x.py

Relaunch with --init_from=resume (or torchrun --max-restarts=3 ... --init_from=resume) to continue
exactly where a killed run stopped; with no checkpoint yet it starts from scratch.
"""

import contextlib
import glob
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import configurator
import data
import evaluate
import fusion
import model as models

# -----------------------------------------------------------------------------
# config: the defaults are the quick start (phantom, small ConvNeXt, CPU)
# run
out_dir = "out/quickstart"
data_dir = "data/phantom"
dataset = "phantom"  # only used to generate data_dir when it is missing and dataset == 'phantom'
phantom_images = 12000  # size of the generated phantom (train/val/test 70/15/15 by patient)
seed = 1337
device = "auto"  # auto | cpu | cuda | cuda:1
dtype = "auto"  # auto (bfloat16 on a CUDA GPU that supports it, else float32) | float32 | bfloat16 | float16
compile = False  # torch.compile the model (GPU; minutes of warm-up)
channels_last = False  # NHWC memory format for conv nets on GPU
backend = "auto"  # DDP backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
tensorboard_log = True  # out_dir/tb; view with: tensorboard --logdir out
log_interval = 20  # iterations between log lines
eval_interval = 200  # iterations between evaluations + checkpoints
eval_only = False  # evaluate the initial/resumed model once and exit
keep_last = 0  # also keep the last k periodic checkpoints ckpt_<iter>.pt (0 = only ckpt.pt + best.pt)
eval_batch_size = 256  # per process
# model
model = "convnext_atto"  # convnext_{atto..base} | vit_{tiny,small,base} | vit_cxr | tv:<torchvision name>
image_size = 64  # must equal the prepared data's image_size
in_chans = 1  # 1 for X-rays; 3 replicates the gray channel (for RGB-pretrained models loaded as-is)
drop_path = 0.0  # stochastic depth rate; ~0.1 for tiny, 0.2-0.4 for larger models
dropout = 0.0  # dropout before the head
grad_checkpoint = False  # recompute blocks in backward (saves memory, ~30% slower)
# init
init_from = "scratch"  # scratch | pretrained | resume
pretrained_path = ""  # .pth/.pt/.safetensors (torchvision/timm/nanorad layout) or torchvision:ConvNeXt_Tiny_Weights.IMAGENET1K_V1
norm = "dataset"  # dataset (mean/std of the train split) | imagenet (for ImageNet-pretrained weights)
finetune_mode = "full"  # full | linear_probe (head only, backbone + BN frozen) | two_stage (head, then all)
freeze_iters = 0  # two_stage: iterations that train the head only
# batch
batch_size = 64  # micro-batch per process
gradient_accumulation_steps = 1  # global micro-steps per optimizer step, divided across ranks
max_iters = 800  # optimizer steps
# optimizer
learning_rate = 8e-3  # peak LR for the head; AdamW (quick start: 8e-3 beat 4e-3, 0.876 vs 0.866 at 400 iterations)
lr_backbone_mult = 1.0  # backbone LR = learning_rate * lr_backbone_mult (discriminative LRs, e.g. 0.1)
layer_decay = 1.0  # layer-wise LR decay (BEiT/ConvNeXt fine-tuning use 0.65-0.8); 1.0 = off
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # max global grad norm; 0 = off
ema_decay = 0.0  # EMA of the weights (0 = off; 0.999-0.9999 typical); evaluated next to the raw weights
# schedule: linear warmup -> plateau -> cosine decay
warmup_iters = 50  # ~1-5% of max_iters
plateau_iters = 0  # constant-LR iterations after warmup
lr_decay_iters = 800  # cosine reaches min_lr here; usually = max_iters
min_lr = 4e-5  # ~learning_rate / 100
# loss
loss = "auto"  # auto (bce for multilabel, ce for multiclass) | bce | focal | bce+focal | ce
bce_weight = 0.7  # bce+focal: loss = bce_weight * bce + (1 - bce_weight) * focal
focal_alpha = 0.25
focal_gamma = 2.0
label_smoothing = 0.0  # ce only
pos_weight = "none"  # none | auto (negatives/positives per class, from the train split)
mixup_alpha = 0.0  # 0 = off; 0.2-0.4 typical
augment = False  # on-device random affine / crop / contrast / gamma / noise (real-data configs turn it on; the quick
#                 start's 6 epochs learn faster without: 0.866 vs 0.849 val AUC at 400 iterations, measured)
hflip = False  # left-right flips move the heart: off for chest X-rays
# distillation: a trained train.py checkpoint teaches this model (Hinton et al. 2015)
teacher_ckpt = ""  # path to a train.py checkpoint, e.g. out/convnext_tiny/best.pt; "" = off
distill_alpha = 0.5  # loss = (1 - alpha) * task loss + alpha * distillation loss
distill_temperature = 2.0  # softens teacher and student outputs; the distillation term is scaled by T^2
# selection
select_metric = "auc_macro"  # auc_macro | loss | any key of the eval record (acc, f1_macro, ap_macro, ...)
early_stop_patience = 0  # stop after this many evals without improvement; 0 = off
# multimodal fusion (fusion.py): image + a text column + clinical variables; "" keeps the image-only classifier
modalities = ""  # "" (image-only, build_model) | vision | text | clinical | vision,text | vision,clinical | text,clinical | all
fusion_mode = "concat"  # concat (project each modality, concatenate, MLP) | cross_attention (+ image tokens attend to text tokens)
text_column = "indication"  # {split}_index.csv column read by the text encoder; not 'text' (the report) when labels were mined from reports: it leaks them
clinical_columns = "age,sex,view"  # index columns: numeric -> z-score, else one-hot; an empty cell -> 0 + a missing flag
vision_encoder = "model"  # model (the `model` network) | clip (a CLIP ViT image tower at vision_init, e.g. BiomedCLIP's)
vision_init = ""  # vision_encoder='clip': BiomedCLIP open_clip_pytorch_model.bin, open_clip / HF CLIP weights or a train_clip.py checkpoint
text_encoder = "small"  # small (bytes -> text_layers Blocks, from scratch or a fusion run at text_init) | clip (text tower of a CLIP / BERT at text_init) | modernbert (HF folder at text_init)
text_init = ""  # text_encoder='clip': a train_clip.py checkpoint, open_clip / BiomedCLIP weights or a HF CLIP folder; 'modernbert': a HF ModernBERT folder
text_tokenizer = "auto"  # auto (byte for small, the checkpoint's for clip) | byte | bpe (tokenizer.py json) | clip | wordpiece
text_tokenizer_path = ""  # bpe: tokenizer.py json; clip: merges file or HF folder ('' = open_clip's); wordpiece: vocab.txt
text_context = 64  # tokens per text (phantom indications <= 50 bytes; CLIP 77)
text_width = 128  # small text encoder: width, blocks, heads
text_layers = 2
text_heads = 4
fusion_dim = 256  # width of each projected modality and of the fusion MLP
fusion_dropout = 0.3  # after the fusion MLP
modality_dropout = 0.0  # training: each sample drops each modality's fused features with this probability (one always stays)
head_dropout = 0.3  # before the head's first Linear
head_dropout2 = 0.2  # before the head's last Linear
stage2_lr = 0.0  # two_stage: peak LR of fusion + head after freeze_iters (encoders: x lr_backbone_mult); 0 = one schedule
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


# -----------------------------------------------------------------------------
# losses (NaN labels are unknown: masked out per class)


def masked_bce(logits, y, pos_weight=None):
    mask = ~torch.isnan(y)
    target = torch.where(mask, y, torch.zeros_like(y))
    per = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1)


def masked_focal(logits, y, alpha, gamma):
    """Sigmoid focal loss (Lin et al. 2017, eq. 5) averaged over known labels."""
    mask = ~torch.isnan(y)
    target = torch.where(mask, y, torch.zeros_like(y))
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    per = alpha_t * (1 - p_t) ** gamma * ce
    return (per * mask).sum() / mask.sum().clamp(min=1)


def make_loss_fn(cfg, task, pos_w):
    kind = cfg["loss"] if cfg["loss"] != "auto" else ("bce" if task == "multilabel" else "ce")
    if task == "multiclass" and kind != "ce":
        raise ValueError(f"loss={kind!r} is for multi-label data; this dataset is multi-class: use --loss=ce")
    if task == "multilabel" and kind == "ce":
        raise ValueError("loss='ce' is for multi-class data; this dataset is multi-label: use bce, focal or bce+focal")
    if kind == "ce":
        # y is a class index, or a soft target (B, C) after mixup
        return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=cfg["label_smoothing"])
    if kind == "bce":
        return lambda logits, y: masked_bce(logits, y, pos_w)
    if kind == "focal":
        return lambda logits, y: masked_focal(logits, y, cfg["focal_alpha"], cfg["focal_gamma"])
    if kind == "bce+focal":
        w = cfg["bce_weight"]
        return lambda logits, y: w * masked_bce(logits, y, pos_w) + (1 - w) * masked_focal(logits, y, cfg["focal_alpha"], cfg["focal_gamma"])
    raise ValueError(f"unknown loss {kind!r}: choose auto, bce, focal, bce+focal or ce")


def distill_loss(student_logits, teacher_logits, task, T):
    """Soft BCE against the teacher's tempered sigmoids (multi-label), KL to its tempered softmax (multi-class)."""
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(student_logits / T, torch.sigmoid(teacher_logits / T)) * T * T
    return F.kl_div(F.log_softmax(student_logits / T, 1), F.log_softmax(teacher_logits / T, 1),
                    reduction="batchmean", log_target=True) * T * T


def load_teacher(path, device, classes):
    ckpt = common.load_checkpoint(path)
    if ckpt["meta"]["classes"] != classes:
        raise ValueError(f"teacher {path} was trained on classes {ckpt['meta']['classes']}, this data has {classes}")
    teacher = models.build_model(**ckpt["model_args"])
    teacher.load_state_dict(ckpt["model"])
    teacher.to(device).eval().requires_grad_(False)
    return teacher, ckpt["meta"]


def mixup(x, y, alpha, gen, task, num_classes):
    """Mix each sample with a permuted partner; unknown labels stay unknown if either side is unknown."""
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    x = lam * x + (1 - lam) * x[perm]
    if task == "multiclass":
        y = F.one_hot(y, num_classes).float()
    return x, lam * y + (1 - lam) * y[perm]


# -----------------------------------------------------------------------------
# evaluation: every rank scores its shard, predictions gathered with their indices


@torch.no_grad()
def run_eval(net, split, cfg, meta, dist, loss_fn, inputs=None):
    net.eval()
    idx_parts, logit_parts = [], []
    for idx, x, _ in data.eval_shards(split, cfg["eval_batch_size"], dist.rank, dist.world_size):
        x = x.to(dist.device, non_blocking=True)
        x = data.to_float(x, meta["mean"], meta["std"], cfg["in_chans"], cfg["norm"] == "imagenet")
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with common.autocast(dist.device, cfg["dtype"]):
            logits = net(x, **fusion.batch_inputs(inputs, idx, dist.device))  # {} for an image-only model
        idx_parts.append(torch.as_tensor(idx))
        logit_parts.append(logits.float().cpu())
    empty = torch.zeros((0, len(meta["classes"])))
    idx = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.int64)
    logits = torch.cat(logit_parts) if logit_parts else empty
    idx, logits = common.gather_indexed(idx, logits, dist)
    net.train()
    assert idx.numel() == len(split) and bool((idx == torch.arange(len(split))).all()), "eval did not see every sample once"
    labels = torch.as_tensor(np.asarray(split.labels))
    task = meta["task"]
    probs = torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)
    record = evaluate.classification_metrics(probs.numpy(), labels.numpy(), meta["classes"], task)
    record["loss"] = float(loss_fn(logits, labels))
    return record, probs


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)

    # --- setup: processes, device, precision, seed, run folder
    dist = common.setup_distributed(cfg["device"], cfg["backend"])
    cfg["dtype"] = common.resolve_dtype(cfg["dtype"], dist.device)
    log = common.Logger(cfg["out_dir"], cfg["tensorboard_log"], dist.master)
    try:
        return _train(cfg, dist, log)
    finally:
        log.close()
        common.cleanup_distributed()


def _train(cfg, dist, log):
    master = dist.master
    common.start_run("train.py", cfg, dist, log)

    # --- data
    meta = data.load_run_data(cfg, dist, log)
    task, classes = meta["task"], meta["classes"]
    train_split = data.PreparedSplit(cfg["data_dir"], "train")
    val_split = data.PreparedSplit(cfg["data_dir"], "val")

    gas = cfg["gradient_accumulation_steps"]
    assert gas % dist.world_size == 0, f"gradient_accumulation_steps={gas} must be divisible by the world size {dist.world_size}"
    accum = gas // dist.world_size
    global_batch = cfg["batch_size"] * gas
    log.line(f"data: {cfg['data_dir']} | {task} | {len(classes)} classes | train {len(train_split)} | val {len(val_split)} | "
             f"global batch {global_batch} = {cfg['batch_size']} x {accum} accum x {dist.world_size} ranks | "
             f"{len(train_split) / global_batch:.1f} iters/epoch | {cfg['max_iters'] * global_batch / len(train_split):.1f} epochs")

    labels_np = np.asarray(train_split.labels)
    pos_w = None
    if cfg["pos_weight"] == "auto":
        assert task == "multilabel", "pos_weight='auto' is for multi-label data"
        pos = np.nansum(labels_np, 0)
        neg = np.sum(~np.isnan(labels_np), 0) - pos
        pos_w = torch.tensor(neg / np.maximum(pos, 1), dtype=torch.float32, device=dist.device)
    elif cfg["pos_weight"] != "none":
        raise ValueError(f"pos_weight must be 'none' or 'auto', got {cfg['pos_weight']!r}")
    loss_fn = make_loss_fn(cfg, task, pos_w)
    eval_loss_fn = make_loss_fn(cfg, task, None if pos_w is None else pos_w.cpu())

    # --- model
    ckpt = None
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if cfg["init_from"] == "resume":
        if os.path.exists(ckpt_path):
            ckpt = common.load_checkpoint(ckpt_path)
            want = "fusion" if cfg["modalities"] else cfg["model"]
            if ckpt["model_args"]["model"] != want:
                raise ValueError(f"{ckpt_path} holds a {ckpt['model_args']['model']} model but this run builds {want!r} "
                                 f"(model={cfg['model']!r}, modalities={cfg['modalities']!r}): match them or use another out_dir")
        else:
            log.line(f"init_from='resume' but {ckpt_path} does not exist yet: starting from scratch")
    elif cfg["init_from"] not in ("scratch", "pretrained"):
        raise ValueError(f"init_from must be scratch, pretrained or resume, got {cfg['init_from']!r}")
    fused = bool(cfg["modalities"])  # image + text + clinical (fusion.py); the vision-only ablation row is modalities='vision'
    if fused and cfg["mixup_alpha"] > 0:
        raise ValueError("mixup_alpha > 0 mixes images but not their text or clinical variables: use --mixup_alpha=0 with modalities")
    if fused:
        # the clinical encoding (train-split mean/std, categories) lives in model_args: a resumed run keeps it
        raw = fusion.build_fusion(**(ckpt["model_args"] if ckpt is not None else
                                     fusion.fusion_args_from_cfg(cfg, len(classes), train_split)))
    else:
        raw = models.build_model(cfg["model"], num_classes=len(classes), in_chans=cfg["in_chans"], image_size=cfg["image_size"],
                                 drop_path=cfg["drop_path"], dropout=cfg["dropout"], grad_checkpoint=cfg["grad_checkpoint"])
    if cfg["init_from"] == "pretrained" and ckpt is None:
        if not cfg["pretrained_path"]:
            raise ValueError("init_from='pretrained' needs --pretrained_path=<file> or torchvision:<WeightsEnum.NAME>")
        if fused:  # the vision encoder: a train.py / train_clip.py checkpoint (head dropped) or any load_pretrained file
            log.line(fusion.load_vision_init(raw, cfg["pretrained_path"]))
        else:
            _check_family(cfg["pretrained_path"], cfg["model"])
            models.load_pretrained(raw, cfg["pretrained_path"])
    if fused and ckpt is None and cfg["vision_init"] and "vision" in raw.modalities:
        log.line(fusion.load_vision_init(raw, cfg["vision_init"]))
    if fused and ckpt is None and cfg["text_init"] and "text" in raw.modalities:
        log.line(fusion.load_text_init(raw, cfg["text_init"]))
    # per-split modality arrays, row i = sample i: the training loop and eval look them up by the batch's indices
    inputs = {"train": None, "val": None}
    if fused:
        inputs = {"train": fusion.split_inputs(train_split, raw.model_args), "val": fusion.split_inputs(val_split, raw.model_args)}
        a = raw.model_args
        log.line(f"fusion: modalities {a['modalities']} | {a['fusion']} | "
                 + (f"text {a['text_column']!r} -> {a['text_encoder']} ({a['text_tokenizer']}, {a['text_context']} tokens) | " if "text" in raw.modalities else "")
                 + (f"clinical {[s['name'] for s in a['clinical_spec']]} -> {a['clinical_dim']} features" if "clinical" in raw.modalities else ""))
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
    raw.to(dist.device)
    if cfg["channels_last"]:
        raw = raw.to(memory_format=torch.channels_last)
    flops_per_img = 3 * (fusion.estimate_flops(raw, dist.device) if fused else
                         models.estimate_flops(raw, cfg["image_size"], cfg["in_chans"]))  # fwd + bwd ~ 3x fwd
    log.line(f"model: {cfg['model']} | {models.get_num_params(raw) / 1e6:.2f}M params | "
             f"{flops_per_img / 3 / 1e9:.3f} GFLOPs/img forward at {cfg['image_size']}px")

    teacher = None
    if cfg["teacher_ckpt"]:
        teacher, teacher_meta = load_teacher(cfg["teacher_ckpt"], dist.device, classes)
        log.line(f"distilling from {cfg['teacher_ckpt']} ({teacher.model_args['model']}, "
                 f"alpha {cfg['distill_alpha']}, T {cfg['distill_temperature']})")

    # --- optimizer (built over every parameter, then the fine-tune mode freezes some: AdamW skips params without grads)
    mode = cfg["finetune_mode"]
    if mode not in ("full", "linear_probe", "two_stage"):
        raise ValueError(f"finetune_mode must be full, linear_probe or two_stage, got {mode!r}")
    groups = models.param_groups(raw, cfg["weight_decay"], cfg["layer_decay"], cfg["lr_backbone_mult"])
    optimizer = common.make_optimizer(groups, cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), dist.device)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg["dtype"] == "float16")
    ema = None
    if cfg["ema_decay"] > 0:
        ema = {k: v.detach().clone().float() for k, v in raw.state_dict().items()}
    iter_num, best_metric, best_iter, bad_evals = 0, None, -1, 0
    best_worst = None  # best worst-class AUC so far (best_worst.pt)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema = {k: v.to(dist.device) for k, v in ckpt["ema"].items()}
        iter_num, best_metric, best_iter = ckpt["iter"], ckpt["best_metric"], ckpt["best_iter"]
        bad_evals = ckpt.get("bad_evals", 0)
        best_worst = ckpt.get("best_worst")
        common.set_rng_state(ckpt["rng"][min(dist.rank, len(ckpt["rng"]) - 1)])
        log.line(f"resumed from {ckpt_path} at iter {iter_num} (best {cfg['select_metric']} {best_metric})")
    ckpt = None  # free the memory

    def frozen_at(it):
        return mode == "linear_probe" or (mode == "two_stage" and it < cfg["freeze_iters"])

    def wrap(raw_model):
        net = raw_model
        if cfg["compile"]:
            net = torch.compile(net)
        if dist.ddp:
            net = DDP(net, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None)
        return net

    if dist.ddp and dist.device.startswith("cuda") and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in raw.modules()):
        raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    if frozen_at(iter_num):
        models.freeze_backbone(raw)
    net = wrap(raw)

    loader = data.Loader(train_split, cfg["batch_size"], accum, cfg["seed"], dist.rank, dist.world_size,
                         dist.device, start_step=iter_num)
    peak = common.device_peak_flops(dist.device, cfg["dtype"])
    select, higher_better = cfg["select_metric"], cfg["select_metric"] != "loss"

    def save(name, it):
        state = {
            "model": raw.state_dict(), "model_args": raw.model_args, "config": cfg, "iter": it,
            "best_metric": best_metric, "best_iter": best_iter, "bad_evals": bad_evals, "best_worst": best_worst,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema, "rng": rng_all,
            "meta": {"classes": classes, "task": task, "mean": meta["mean"], "std": meta["std"],
                     "imagenet_norm": cfg["norm"] == "imagenet", "data_dir": cfg["data_dir"]},
        }
        common.save_checkpoint(state, os.path.join(cfg["out_dir"], name))

    # --- the loop
    log.line(f"training {cfg['max_iters']} iterations from iter {iter_num}")
    timer = common.Timer(dist.device)
    t_start, iters_done, iters_since = time.time(), 0, 0
    resumed_at = iter_num if cfg["init_from"] == "resume" and iter_num > 0 else -1
    rng_all = None
    while True:
        last_step = iter_num >= cfg["max_iters"]
        if mode == "two_stage" and cfg["stage2_lr"] > 0 and iter_num >= cfg["freeze_iters"]:
            # stage 2: warmup again to stage2_lr (encoders x lr_backbone_mult), cosine to min_lr at lr_decay_iters
            lr = common.get_lr(iter_num - cfg["freeze_iters"], cfg["stage2_lr"], cfg["warmup_iters"], 0,
                               cfg["lr_decay_iters"] - cfg["freeze_iters"], cfg["min_lr"])
        else:
            lr = common.get_lr(iter_num, cfg["learning_rate"], cfg["warmup_iters"], cfg["plateau_iters"],
                               cfg["lr_decay_iters"], cfg["min_lr"])
        common.set_lr(optimizer, lr)

        # evaluate, log and checkpoint
        if (iter_num % cfg["eval_interval"] == 0 or last_step or cfg["eval_only"]) and iter_num != resumed_at:
            record, probs = run_eval(raw, val_split, cfg, meta, dist, eval_loss_fn, inputs["val"])
            aucs = [v for v in record.get("auc", {}).values() if v is not None and math.isfinite(v)]
            if aucs:
                record["auc_worst"] = min(aucs)  # the worst class's AUC: best_worst.pt keeps its best
            record = {"iter": iter_num, "split": "val", **record}
            if ema is not None:
                ema_model = fusion.build_any(raw.model_args).to(dist.device)
                ema_model.load_state_dict({k: v.to(raw.state_dict()[k].dtype) for k, v in ema.items()})
                ema_record, _ = run_eval(ema_model, val_split, cfg, meta, dist, eval_loss_fn, inputs["val"])
                record["ema"] = {k: ema_record[k] for k in ("loss", "auc_macro", "ap_macro", "acc") if k in ema_record}
            value = record.get(select)
            if value is None:
                raise ValueError(f"select_metric={select!r} is not in the eval record; choose one of {sorted(record)}")
            improved = best_metric is None or (value > best_metric if higher_better else value < best_metric)
            if improved:
                best_metric, best_iter, bad_evals = value, iter_num, 0
            elif not cfg["eval_only"]:
                bad_evals += 1
            worst_improved = "auc_worst" in record and (best_worst is None or record["auc_worst"] > best_worst)
            if worst_improved:
                best_worst = record["auc_worst"]
            per_class = " ".join(f"{c[:12]}={v:.3f}" for c, v in record.get("auc", {}).items())
            log.line(f"eval iter {iter_num} | val loss {record['loss']:.4f} | auc_macro {record.get('auc_macro', float('nan')):.4f} | "
                     f"ap_macro {record.get('ap_macro', float('nan')):.4f}"
                     + (f" | acc {record['acc']:.4f}" if "acc" in record else "")
                     + (f" | ema auc_macro {record['ema'].get('auc_macro', float('nan')):.4f}" if "ema" in record else "")
                     + (f" | auc_worst {record['auc_worst']:.4f}" if "auc_worst" in record else "")
                     + f" | best {select} {best_metric:.4f} @ {best_iter}")
            if per_class:
                log.line(f"  per-class AUC: {per_class}")
            log.jsonl(record)
            if master:
                _tensorboard_eval(log, record, probs, val_split, meta, iter_num)
            rng_all = _gather_rng(dist)
            timer.lap()  # the step timing below excludes evaluation
            iters_since = 0
            if master and not cfg["eval_only"]:
                save("ckpt.pt", iter_num)
                if improved:
                    save("best.pt", iter_num)
                if worst_improved:
                    save("best_worst.pt", iter_num)
                if cfg["keep_last"] > 0:
                    save(f"ckpt_{iter_num:07d}.pt", iter_num)
                    for old in sorted(glob.glob(os.path.join(cfg["out_dir"], "ckpt_*.pt")))[:-cfg["keep_last"]]:
                        os.remove(old)
            in_stage1 = mode == "two_stage" and iter_num < cfg["freeze_iters"]
            if cfg["early_stop_patience"] > 0 and bad_evals >= cfg["early_stop_patience"] and not in_stage1:
                log.line(f"early stop: {bad_evals} evals without a better {select} (best {best_metric:.4f} @ {best_iter})")
                last_step = True
        if last_step or cfg["eval_only"]:
            break

        # switch the fine-tune stage: two_stage unfreezes the backbone after freeze_iters
        if mode == "two_stage" and iter_num == cfg["freeze_iters"] and iter_num > 0:
            models.unfreeze(raw)
            net = wrap(raw)
            bad_evals = 0  # early stopping counts stage-2 evals only
            log.line(f"iter {iter_num}: two_stage unfreezes the backbone (backbone LR x{cfg['lr_backbone_mult']})")

        # forward/backward over the micro-steps, gradient sync only on the last one
        micro = loader.get(iter_num)
        loss_sum = 0.0
        for k, (x, y, idx) in enumerate(micro):
            sync = k == len(micro) - 1
            ctx = net.no_sync() if dist.ddp and not sync else contextlib.nullcontext()
            with ctx:
                # augmentation on [0, 1] pixels, a pure function of (seed, iter, rank, micro-step); then normalize
                x01 = x.float() / 255.0
                gen = torch.Generator(device=x01.device)
                gen.manual_seed(((cfg["seed"] * 1_000_003 + iter_num) * 1009 + dist.rank) * 131 + k)
                if cfg["augment"]:
                    x01 = data.augment(x01, gen, hflip=cfg["hflip"])
                if cfg["mixup_alpha"] > 0:
                    x01, y = mixup(x01, y, cfg["mixup_alpha"], gen, task, len(classes))
                x = data.to_float(x01, meta["mean"], meta["std"], cfg["in_chans"], cfg["norm"] == "imagenet")
                if cfg["channels_last"]:
                    x = x.contiguous(memory_format=torch.channels_last)
                with common.autocast(dist.device, cfg["dtype"]):
                    logits = net(x, **fusion.batch_inputs(inputs["train"], idx, dist.device))  # {} image-only
                loss = loss_fn(logits.float(), y)
                if teacher is not None:
                    xt = data.to_float(x01, teacher_meta["mean"], teacher_meta["std"], teacher.model_args["in_chans"],
                                       teacher_meta["imagenet_norm"])
                    with torch.no_grad(), common.autocast(dist.device, cfg["dtype"]):
                        t_logits = teacher(xt)
                    a = cfg["distill_alpha"]
                    loss = (1 - a) * loss + a * distill_loss(logits.float(), t_logits.float(), task, cfg["distill_temperature"])
                loss = loss / len(micro)
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if not torch.isfinite(loss_sum).all():
            raise FloatingPointError(f"non-finite loss ({float(loss_sum)}) at iter {iter_num}: stopping; the last good "
                                     f"checkpoint {ckpt_path} is intact. Try a lower learning_rate or dtype=float32.")
        trainable = [p for p in raw.parameters() if p.requires_grad]
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip"])
        else:
            norm = common.grad_norm(trainable)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                d = cfg["ema_decay"]
                for k, v in raw.state_dict().items():
                    ema[k].mul_(d).add_(v.float(), alpha=1 - d) if v.dtype.is_floating_point else ema[k].copy_(v)

        # log
        iter_num += 1
        iters_done += 1
        iters_since += 1
        if iter_num % cfg["log_interval"] == 0 or iter_num == cfg["max_iters"]:
            dt = timer.lap() / iters_since
            iters_since = 0
            loss_val = float(common.all_reduce_mean(loss_sum.reshape(1), dist)[0])
            img_s = global_batch / dt
            mfu = "-" if peak is None else f"{100 * flops_per_img * img_s / (peak * dist.world_size):.1f}%"
            eta = common.format_eta((cfg["max_iters"] - iter_num) * (time.time() - t_start) / iters_done)
            log.line(f"iter {iter_num:6d} | loss {loss_val:.4f} | norm {float(norm):6.3f} | lr {lr:.2e} | "
                     f"{1000 * dt:7.1f} ms | {img_s:7.1f} img/s | mfu {mfu} | eta {eta}")
            scalars = {"train/loss": loss_val, "train/grad_norm": float(norm), "train/lr": lr, "perf/img_per_s": img_s}
            for g in optimizer.param_groups:
                scalars[f"lr/{g.get('name', 'group')}"] = g["lr"]
            if dist.device.startswith("cuda"):
                scalars["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            log.scalars(scalars, iter_num)

    final = {"final": True, "best_iter": best_iter, "best_metric": best_metric, "select_metric": select,
             f"best_{select}": best_metric, "best_auc_worst": best_worst, "iters": iter_num,
             "time_s": round(time.time() - t_start, 1)}
    log.jsonl(final)
    log.line(f"done: best {select} {best_metric:.4f} at iter {best_iter} | {final['time_s']:.0f} s | {cfg['out_dir']}")
    return final


def _check_family(path, model_name):
    """A nanorad checkpoint from another model family is refused with both names."""
    if path.endswith((".pt", ".pth")) and os.path.exists(path):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "model_args" in obj and obj["model_args"]["model"] != model_name:
            raise ValueError(f"{path} holds a {obj['model_args']['model']} model but model={model_name!r}: "
                             f"use --model={obj['model_args']['model']} or another checkpoint")


def _gather_rng(dist):
    """Every rank's RNG state (dropout / drop path), so a resume continues exactly on each rank."""
    state = common.rng_state()
    if not dist.ddp:
        return [state]
    states = [None] * dist.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def _tensorboard_eval(log, record, probs, split, meta, it):
    if log.tb is None:
        return
    log.scalars({k: record[k] for k in ("loss", "auc_macro", "ap_macro", "acc", "f1_macro") if k in record}, it, "val/")
    log.scalars({c: v for c, v in record.get("auc", {}).items()}, it, "val_auc/")
    labels = np.asarray(split.labels)
    classes = meta["classes"]
    if meta["task"] == "multilabel":
        for j, c in enumerate(classes):
            known = ~np.isnan(labels[:, j])
            if known.any():
                log.tb.add_pr_curve(f"pr/{c}", labels[known, j].astype(bool), probs[known, j].numpy(), it)
    # a grid of the first 16 validation images, captioned with true and top predicted findings
    n = min(16, len(split))
    imgs = torch.from_numpy(np.array(split.images[:n])).unsqueeze(1)
    log.tb.add_images("val/images", imgs, it, dataformats="NCHW")
    lines = []
    for i in range(n):
        if meta["task"] == "multilabel":
            true = [c for j, c in enumerate(classes) if labels[i, j] == 1]
            top = [f"{classes[j]} {probs[i, j]:.2f}" for j in torch.argsort(probs[i], descending=True)[:3].tolist()]
        else:
            true, top = [classes[int(labels[i])]], [f"{classes[j]} {probs[i, j]:.2f}" for j in torch.argsort(probs[i], descending=True)[:3].tolist()]
        lines.append(f"{i}: true [{', '.join(true) or '-'}] | predicted [{', '.join(top)}]")
    log.tb.add_text("val/images_captions", "  \n".join(lines), it)


if __name__ == "__main__":
    main()
