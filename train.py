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

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

import common
import configurator
import data
import fusion
import losses
import metrics
import model as models
import tracking

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
globals().update(tracking.KNOBS)  # tensorboard, trackers, mlflow_uri, mlflow_experiment, wandb_project, wandb_mode,
# track_checkpoints: the tracker knobs, the same for every train script (defaults and meaning in tracking.py)
log_interval = 20  # iterations between log lines
eval_interval = 200  # iterations between evaluations + checkpoints
eval_only = False  # evaluate the initial/resumed model once and exit
keep_last = 0  # also keep the last k periodic checkpoints ckpt_<iter>.pt (0 = only ckpt.pt + best.pt)
eval_batch_size = 256  # per process
overwrite = False  # True: a fresh run may replace the run already in out_dir (its checkpoints and metrics are removed)
allow_data_change = False  # True: init_from=resume may continue on data other than the checkpoint's (the best so far is reset)
dist_timeout = 600  # seconds a collective waits for a peer before failing
# model
model = "convnext_atto"  # convnext_{atto..base} | vit_{tiny,small,base} | vit_cxr | tv:<torchvision name>
image_size = 64  # must equal the prepared data's image_size
in_chans = 1  # 1 for X-rays; 3 replicates the gray channel (for RGB-pretrained models loaded as-is)
drop_path = 0.0  # stochastic depth rate; ~0.1 for tiny, 0.2-0.4 for larger (tv: models: their StochasticDepth)
dropout = 0.0  # dropout before the head
grad_checkpoint = False  # recompute blocks in backward (saves memory, ~30% slower)
n_layer = 0  # ViTs (vit_*, vit_cxr): blocks; 0 = the named size's (vit_cxr: 10)
n_head = 0  # ViTs: attention heads; 0 = the size's (vit_cxr: 3)
n_embd = 0  # ViTs: token width; 0 = the size's (vit_cxr: 192)
mlp_ratio = 0.0  # ViTs: MLP hidden width / n_embd; 0 = 4
patch_size = 0  # ViTs: pixels per token side; 0 = 16 (vit_cxr: 4 = tokens at H/4 x W/4, 3,136 at 224 px, the seed's)
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
max_train_images = 0  # train on a fixed random subset of this many train images (a smoke run on real data); 0 = all
max_eval_images = 0  # validate on a fixed random subset of this many val images; 0 = all
train_subset_images = 0  # each eval also scores select_metric on this many fixed train images (overfitting); 0 = off
# optimizer
optimizer = "adamw"  # adamw | sgd (momentum; the seed's linear probes: SGD at learning_rate 0.1)
momentum = 0.9  # sgd only
nesterov = False  # sgd only
learning_rate = 8e-3  # peak LR for the head; AdamW (quick start: 8e-3 beat 4e-3, 0.876 vs 0.866 at 400 iterations)
lr_backbone_mult = 1.0  # backbone LR = learning_rate * lr_backbone_mult (discriminative LRs, e.g. 0.1)
layer_decay = 1.0  # layer-wise LR decay (BEiT/ConvNeXt fine-tuning use 0.65-0.8); 1.0 = off
weight_decay = 0.05
beta1 = 0.9  # adamw only
beta2 = 0.999  # adamw only
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
label_smoothing = 0.0  # ce: over the classes; bce / focal: each label toward 1/2 (1 -> 1 - eps/2, 0 -> eps/2)
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
eval_uncertain = "mask"  # data with raw labels (CheXpert): mask (val scored on the raw labels, uncertain unknown, blank per
#                          the prepare's blank_policy: what papers report) | as_policy (the labels training used)
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
text_with_head = False  # the text encoder trains as part of the head: in two_stage's stage 1 too (not frozen at its init) and at the head's LR after; for a from-scratch text encoder
vision_logits = False  # keep the image model's classifier (from pretrained_path) as a residual path beside the fused head: training starts from the image model's predictions
head_dropout = 0.3  # before the head's first Linear
head_dropout2 = 0.2  # before the head's last Linear
stage2_lr = 0.0  # two_stage: peak LR of fusion + head after freeze_iters (encoders: x lr_backbone_mult); 0 = one schedule
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per knob; CHECKS: across knobs)
RANGES = dict(phantom_images="[1, inf)")
CHECKS = {"min_lr <= learning_rate": "the cosine decays from learning_rate down to min_lr",
          "learning_rate * lr_backbone_mult <= 1": "the peak LR of the backbone",
          "batch_size * gradient_accumulation_steps <= 1048576": "a global batch of at most 2**20 samples"}


# -----------------------------------------------------------------------------
# teacher and mixup (the classifier losses live beside the model: model.make_loss_fn, model.distill_loss)


def load_teacher(path, device, classes):
    models.require_weights(path, "teacher_ckpt", "--teacher_ckpt='' to train without distillation")
    ckpt = common.load_checkpoint(path, flag="--teacher_ckpt", wants=("train.py",))
    if ckpt["model_args"].get("model") == "fusion":  # its forward needs the text / clinical inputs of its own data
        raise ValueError(f"--teacher_ckpt={path} is a fusion model (train.py --modalities="
                         f"{ckpt['model_args'].get('modalities')!r}); the teacher must be an image classifier")
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
    scored = labels.numpy()
    if task == "multilabel":  # the uncertain policy is a training choice: metrics use the raw labels (issue 15)
        blank = (split.meta.get("label_policy") or {}).get("blank", "ignore")
        scored = metrics.eval_labels(scored, split.labels_raw, cfg["eval_uncertain"], blank)
    record = metrics.classification_metrics(probs.numpy(), scored, meta["classes"], task)
    record["loss"] = float(loss_fn(logits, labels))  # the training objective, on the labels training uses
    return record, probs


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)
    return common.launch(_train, cfg)


def _train(cfg, dist, log):
    common.check_init_from(cfg)
    ckpt = common.resume_checkpoint(cfg, "train.py", log)
    check_probe_weights(cfg, ckpt)
    common.start_run("train.py", cfg, dist, log, DEFAULTS, save_config=ckpt is None)

    # --- data
    meta = data.load_run_data(cfg, dist, log)
    task, classes = meta["task"], meta["classes"]
    train_split = subset(data.PreparedSplit(cfg["data_dir"], "train"), cfg["max_train_images"], "max_train_images", log)
    val_split = subset(data.PreparedSplit(cfg["data_dir"], "val"), cfg["max_eval_images"], "max_eval_images", log)
    accum, global_batch, note = common.batch_plan(cfg["batch_size"], cfg["gradient_accumulation_steps"], dist.world_size)
    if note:
        log.line(note)
    log.line(f"data: {cfg['data_dir']} | {task} | {len(classes)} classes | train {len(train_split)} | val {len(val_split)} | "
             f"global batch {global_batch} = {cfg['batch_size']} x {accum} accum x {dist.world_size} ranks | "
             f"{len(train_split) / global_batch:.1f} iters/epoch | {cfg['max_iters'] * global_batch / len(train_split):.1f} epochs")
    scored_on = "raw labels, uncertain masked" if cfg["eval_uncertain"] == "mask" else "the training policy labels"
    if val_split.labels_raw is not None:
        log.line(f"val metrics on {scored_on} (eval_uncertain={cfg['eval_uncertain']}); the loss on the policy labels")
    pos_w = pos_weights(cfg, task, np.asarray(train_split.labels), dist.device)
    loss_terms = losses.make_loss_terms(cfg, task, pos_w)
    eval_loss_fn = losses.make_loss_fn(cfg, task, None if pos_w is None else pos_w.cpu())

    # --- model, teacher, optimizer (over every parameter; the fine-tune mode then freezes some: AdamW skips them)
    raw, inputs = build_classifier(cfg, ckpt, classes, train_split, val_split, log)
    # the overfitting check: select_metric on fixed train images (another draw than max_train_images'), at each eval
    train_eval = (subset(train_split, cfg["train_subset_images"], "train_subset_images", log, seed=1)
                  if cfg["train_subset_images"] > 0 else None)
    if train_eval is not None and inputs["train"] is not None:
        inputs["train_eval"] = fusion.split_inputs(train_eval, raw.model_args)
    raw.to(dist.device)
    if cfg["channels_last"]:
        raw = raw.to(memory_format=torch.channels_last)
    fused = bool(cfg["modalities"])
    flops_per_img = 3 * (fusion.estimate_flops(raw, dist.device) if fused else
                         models.estimate_flops(raw, cfg["image_size"], cfg["in_chans"]))  # fwd + bwd ~ 3x fwd
    log.line(f"model: {cfg['model']} | {models.get_num_params(raw) / 1e6:.2f}M params | "
             f"{flops_per_img / 3 / 1e9:.3f} GFLOPs/img forward at {cfg['image_size']}px")
    teacher = None
    if cfg["teacher_ckpt"]:
        teacher = load_teacher(cfg["teacher_ckpt"], dist.device, classes)
        log.line(f"distilling from {cfg['teacher_ckpt']} ({teacher[0].model_args['model']}, "
                 f"alpha {cfg['distill_alpha']}, T {cfg['distill_temperature']})")
    mode = cfg["finetune_mode"]
    if mode not in ("full", "linear_probe", "two_stage"):
        raise ValueError(f"finetune_mode must be full, linear_probe or two_stage, got {mode!r}")
    groups = models.param_groups(raw, cfg["weight_decay"], cfg["layer_decay"], cfg["lr_backbone_mult"])
    optimizer = common.make_optimizer(groups, cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), dist.device,
                                      cfg["optimizer"], cfg["momentum"], cfg["nesterov"])
    scaler = torch.amp.GradScaler("cuda", enabled=cfg["dtype"] == "float16")
    ema = common.make_ema(raw, cfg["ema_decay"])
    ckpt_meta = common.checkpoint_meta(meta, cfg["data_dir"], ("classes", "task", "mean", "std"),
                                       imagenet_norm=cfg["norm"] == "imagenet",
                                       eval_labels=scored_on if val_split.labels_raw is not None else "labels")
    prog = common.new_progress()
    if ckpt is not None:
        prog = common.restore(ckpt, cfg, ckpt_meta, optimizer, scaler, dist, log, ema)
    ckpt = None  # free the memory
    iter_num = prog["iter"]
    in_stage1 = lambda it: mode == "two_stage" and it < cfg["freeze_iters"]  # noqa: E731
    if dist.ddp and dist.device.startswith("cuda") and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in raw.modules()):
        raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    if mode == "linear_probe" or in_stage1(iter_num):
        models.freeze_backbone(raw)
    net = common.wrap(raw, cfg["compile"], dist)
    loader = data.Loader(train_split, cfg["batch_size"], accum, cfg["seed"], dist.rank, dist.world_size,
                         dist.device, start_step=iter_num)
    peak = common.device_peak_flops(dist.device, cfg["dtype"])

    # --- the loop
    log.line(f"training {cfg['max_iters']} iterations from iter {iter_num}")
    timer = common.Timer(dist.device)
    resumed_at = iter_num if iter_num > 0 else -1
    while True:
        last_step = iter_num >= cfg["max_iters"]
        lr = stage_lr(optimizer, iter_num, cfg)

        # evaluate, log and checkpoint
        if common.eval_due(iter_num, cfg, last_step, resumed_at):
            with timer.paused():
                record, probs = evaluate_and_log(raw, ema, val_split, cfg, meta, dist, eval_loss_fn, inputs, log,
                                                 iter_num, prog, train_eval)
                improved = common.select(prog, record, cfg, common.higher_is_better(cfg["select_metric"]), iter_num)
                worst_improved = "auc_worst" in record and (prog["best_worst"] is None or record["auc_worst"] > prog["best_worst"])
                if worst_improved:
                    prog["best_worst"] = record["auc_worst"]
                log.line(f"  best {cfg['select_metric']} {prog['best_metric']:.4f} @ {prog['best_iter']}")
                log.jsonl(record)
                if dist.master:
                    _tensorboard_eval(log, record, probs, val_split, meta, iter_num)
                common.save_run(cfg, dist, log, "train.py", iter_num, prog, improved, raw, raw.model_args, ckpt_meta,
                                optimizer, scaler, ema, worst_improved=worst_improved)
            if not in_stage1(iter_num) and common.early_stop(prog, cfg, log):
                last_step = True
        if last_step or cfg["eval_only"]:
            break

        # two_stage: unfreeze the backbone after freeze_iters
        if mode == "two_stage" and iter_num == cfg["freeze_iters"] and iter_num > 0:
            models.unfreeze(raw)
            net = common.wrap(raw, cfg["compile"], dist)
            prog["bad_evals"] = 0  # early stopping counts stage-2 evals only
            log.line(f"iter {iter_num}: two_stage unfreezes the backbone (backbone LR x{cfg['lr_backbone_mult']})")

        # TRAINING SECTION: micro-steps with the gradient sync on the last one, then the optimizer step
        micro = loader.get(iter_num)
        loss_sum, terms_sum = torch.zeros((), device=dist.device), {}
        for k, (x, y, idx) in enumerate(micro):
            with common.grad_sync(net, k == len(micro) - 1):
                terms = micro_loss(net, teacher, x, y, idx, k, iter_num, cfg, meta, dist, loss_terms, inputs["train"])
                loss = sum(terms.values()) / len(micro)
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
            for name, v in terms.items():  # loss/<term> in the step record: the terms add up to the loss
                terms_sum[name] = terms_sum.get(name, 0) + v.detach() / len(micro)
        common.check_finite(loss_sum, iter_num, cfg["out_dir"])
        norm = common.optimizer_step(optimizer, scaler, [p for p in raw.parameters() if p.requires_grad], cfg["grad_clip"])
        if ema is not None:
            ema.update_parameters(raw)
        iter_num += 1
        timer.step()
        # TRAINING SECTION END: what follows is the log line

        if iter_num % cfg["log_interval"] == 0 or iter_num == cfg["max_iters"]:
            common.log_step(log, dist, timer, iter_num, cfg, loss_sum, norm, lr, global_batch, "img",
                            flops_per_img * global_batch, peak, jsonl=True,
                            scalars=step_scalars(optimizer, terms_sum, dist))

    return common.finish(log, prog, cfg, iter_num, timer, best_auc_worst=prog["best_worst"])


# -----------------------------------------------------------------------------
# the pieces of _train: loss weights, the model, the LR of each stage, one micro-step, an eval


def check_probe_weights(cfg, ckpt):
    """A linear probe trains the head on frozen features: from random weights (init_from=scratch, or resume with no
    checkpoint yet) they stay random. A fusion run whose encoders start from vision_init / text_init has features."""
    if cfg["finetune_mode"] != "linear_probe" or ckpt is not None or cfg["init_from"] == "pretrained":
        return
    if cfg["modalities"] and (cfg["vision_init"] or cfg["text_init"]):
        return
    start = ("init_from='scratch'" if cfg["init_from"] == "scratch" else
             f"init_from='resume' with no {cfg['out_dir']}/ckpt.pt yet")
    raise ValueError(f"finetune_mode='linear_probe' trains only the head on a frozen backbone, but {start} starts it "
                     f"from random weights, which would stay random: pass "
                     f"--init_from=pretrained --pretrained_path=<weights> (e.g. torchvision:ConvNeXt_Tiny_Weights."
                     f"IMAGENET1K_V1 or out/<run>/best.pt), or use --finetune_mode=full")


def pos_weights(cfg, task, labels, device):
    """pos_weight='auto': negatives / positives per class from the train split (multi-label), else None."""
    if cfg["pos_weight"] == "none":
        return None
    if cfg["pos_weight"] != "auto":
        raise ValueError(f"pos_weight must be 'none' or 'auto', got {cfg['pos_weight']!r}")
    if task != "multilabel":
        raise ValueError("pos_weight='auto' is for multi-label data; use --pos_weight=none")
    pos = np.nansum(labels, 0)
    neg = np.sum(~np.isnan(labels), 0) - pos
    return torch.tensor(neg / np.maximum(pos, 1), dtype=torch.float32, device=device)


class SplitRows:
    """Some rows of a PreparedSplit, as a split of their own (images in memory: the subsets are small)."""

    def __init__(self, split, rows):
        self.split, self.data_dir, self.meta, self.rows = split.split, split.data_dir, split.meta, rows
        self._parent = split
        self.images = np.take(split.images, rows, axis=0)
        self.labels = np.asarray(split.labels)[rows]
        raw = split.labels_raw
        self.labels_raw = None if raw is None else raw[rows]

    @property
    def index(self):  # read only when asked (fusion's text and clinical columns): a real train split's CSV is large
        return [self._parent.index[i] for i in self.rows]

    def __len__(self):
        return len(self.rows)


def subset(split, n, knob, log, seed=0):
    """A fixed random subset of n rows of split (sorted: memmap reads go forward), or split itself when n is 0 or
    covers it."""
    if n <= 0 or n >= len(split):
        return split
    rows = np.sort(np.random.default_rng(seed).choice(len(split), n, replace=False))
    log.line(f"{knob}={n}: a fixed subset of the {len(split)} {split.split} images")
    return SplitRows(split, rows)


def build_classifier(cfg, ckpt, classes, train_split, val_split, log):
    """The image classifier (or fusion model) from the checkpoint, pretrained weights or scratch; with the
    per-split modality arrays a fusion model reads by the batch's indices ({"train": None, "val": None} image-only)."""
    fused = bool(cfg["modalities"])  # image + text + clinical (fusion.py); the vision-only ablation is modalities='vision'
    if ckpt is not None:
        want = "fusion" if fused else cfg["model"]
        if ckpt["model_args"]["model"] != want:
            raise ValueError(f"{cfg['out_dir']}/ckpt.pt holds a {ckpt['model_args']['model']} model but this run builds "
                             f"{want!r} (model={cfg['model']!r}, modalities={cfg['modalities']!r}): match them or use another out_dir")
    if fused and cfg["mixup_alpha"] > 0:
        raise ValueError("mixup_alpha > 0 mixes images but not their text or clinical variables: use --mixup_alpha=0 with modalities")
    if fused:  # the clinical encoding (train-split mean/std, categories) lives in model_args: a resumed run keeps it
        raw = fusion.build_fusion(**(ckpt["model_args"] if ckpt is not None else
                                     fusion.fusion_args_from_cfg(cfg, len(classes), train_split)))
    else:
        raw = models.build_model(cfg["model"], num_classes=len(classes), in_chans=cfg["in_chans"], image_size=cfg["image_size"],
                                 drop_path=cfg["drop_path"], dropout=cfg["dropout"],
                                 grad_checkpoint=cfg["grad_checkpoint"], **{k: cfg[k] for k in models.VIT_SHAPE_KNOBS})
    if cfg["init_from"] == "pretrained":
        if not cfg["pretrained_path"]:
            raise ValueError("init_from='pretrained' needs --pretrained_path=<file> or torchvision:<WeightsEnum.NAME>")
        models.require_weights(cfg["pretrained_path"], "pretrained_path", "--init_from=scratch")
        if fused:  # the vision encoder: a train.py / train_clip.py checkpoint (head dropped) or any load_pretrained file
            log.line(fusion.load_vision_init(raw, cfg["pretrained_path"]))
        else:
            models.load_pretrained(raw, cfg["pretrained_path"])
    if fused and ckpt is None and cfg["vision_init"] and "vision" in raw.modalities:
        log.line(fusion.load_vision_init(raw, cfg["vision_init"]))
    if fused and ckpt is None and cfg["text_init"] and "text" in raw.modalities:
        log.line(fusion.load_text_init(raw, cfg["text_init"]))
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
    if not fused:
        return raw, {"train": None, "val": None}
    a = raw.model_args
    log.line(f"fusion: modalities {a['modalities']} | {a['fusion']} | "
             + (f"text {a['text_column']!r} -> {a['text_encoder']} ({a['text_tokenizer']}, {a['text_context']} tokens) | " if "text" in raw.modalities else "")
             + (f"clinical {[s['name'] for s in a['clinical_spec']]} -> {a['clinical_dim']} features" if "clinical" in raw.modalities else ""))
    return raw, {"train": fusion.split_inputs(train_split, a), "val": fusion.split_inputs(val_split, a)}


def stage_lr(optimizer, it, cfg):
    """The step's LR; two_stage with stage2_lr > 0 warms up again to stage2_lr after freeze_iters, then the cosine."""
    if cfg["finetune_mode"] == "two_stage" and cfg["stage2_lr"] > 0 and it >= cfg["freeze_iters"]:
        lr = common.get_lr(it - cfg["freeze_iters"], cfg["stage2_lr"], cfg["warmup_iters"], 0,
                           cfg["lr_decay_iters"] - cfg["freeze_iters"], cfg["min_lr"])
        common.set_lr(optimizer, lr)
        return lr
    return common.schedule_lr(optimizer, it, cfg)


def micro_loss(net, teacher, x, y, idx, k, it, cfg, meta, dist, loss_terms, inputs):
    """One micro-batch's loss terms ({name: weighted term}, their sum the loss): augmentation on [0, 1] pixels, a pure
    function of (seed, iter, rank, micro-step), mixup, normalization, forward, the task loss's terms, mixed with the
    distillation loss when a teacher is set."""
    x01 = x.float() / 255.0
    gen = torch.Generator(device=x01.device)
    gen.manual_seed(((cfg["seed"] * 1_000_003 + it) * 1009 + dist.rank) * 131 + k)
    if cfg["augment"]:
        x01 = data.augment(x01, gen, hflip=cfg["hflip"])
    if cfg["mixup_alpha"] > 0:
        x01, y = mixup(x01, y, cfg["mixup_alpha"], gen, meta["task"], len(meta["classes"]))
    x = data.to_float(x01, meta["mean"], meta["std"], cfg["in_chans"], cfg["norm"] == "imagenet")
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    with common.autocast(dist.device, cfg["dtype"]):
        logits = net(x, **fusion.batch_inputs(inputs, idx, dist.device))  # {} for an image-only model
    terms = loss_terms(logits.float(), y)
    if teacher is None:
        return terms
    t_net, t_meta = teacher
    xt = data.to_float(x01, t_meta["mean"], t_meta["std"], t_net.model_args["in_chans"], t_meta["imagenet_norm"])
    with torch.no_grad(), common.autocast(dist.device, cfg["dtype"]):
        t_logits = t_net(xt)
    a = cfg["distill_alpha"]
    return {**{name: (1 - a) * v for name, v in terms.items()},
            "distill": a * losses.distill_loss(logits.float(), t_logits.float(), meta["task"],
                                               cfg["distill_temperature"])}


def step_scalars(optimizer, terms, dist):
    """lr/<group> of each optimizer group and loss/<term> of each loss term (all-reduced like the loss), for the step
    record in metrics.jsonl and TensorBoard."""
    out = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
    names = sorted(terms)
    values = common.all_reduce_mean(torch.stack([terms[n] for n in names]), dist) if names else []
    return {**out, **{f"loss/{n}": float(v) for n, v in zip(names, values)}}


def evaluate_and_log(raw, ema, split, cfg, meta, dist, loss_fn, inputs, log, it, prog, train_eval=None):
    """The eval record at this iter (val metrics, the worst class's AUC, the EMA weights' metrics, select_metric on the
    fixed train images train_eval as train_subset_<metric>) and its lines."""
    record, probs = run_eval(raw, split, cfg, meta, dist, loss_fn, inputs["val"])
    key = cfg["select_metric"]
    if train_eval is not None:
        sub, _ = run_eval(raw, train_eval, cfg, meta, dist, loss_fn, inputs.get("train_eval"))
        record[f"train_subset_{key}"] = sub.get(key)
    aucs = [v for v in record.get("auc", {}).values() if v is not None and math.isfinite(v)]
    if aucs:
        record["auc_worst"] = min(aucs)  # the worst class's AUC: best_worst.pt keeps its best
    record = {"iter": it, "split": "val", **record}
    if ema is not None:
        ema_record, _ = run_eval(ema.module, split, cfg, meta, dist, loss_fn, inputs["val"])
        record["ema"] = {k: ema_record[k] for k in ("loss", "auc_macro", "ap_macro", "acc") if k in ema_record}
    nan = float("nan")
    log.line(f"eval iter {it} | val loss {record['loss']:.4f} | auc_macro {record.get('auc_macro', nan):.4f}"
             f"{common.macro_note(record, 'auc_macro')} | ap_macro {record.get('ap_macro', nan):.4f}"
             + (f" | acc {record['acc']:.4f}" if "acc" in record else "")
             + (f" | ema auc_macro {record['ema'].get('auc_macro', nan):.4f}" if "ema" in record else "")
             + (f" | auc_worst {record['auc_worst']:.4f}" if "auc_worst" in record else "")
             + (f" | train_subset {key} {record[f'train_subset_{key}']:.4f}"
                if isinstance(record.get(f"train_subset_{key}"), float) else ""))
    per_class = " ".join(f"{c[:12]}={v:.3f}" for c, v in record.get("auc", {}).items())
    if per_class:
        log.line(f"  per-class AUC: {per_class}")
    return record, probs


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
    # the first 16 validation images in one grid, each captioned with its true and top predicted findings
    n = min(16, len(split))
    captions = []
    for i in range(n):
        true = ([c for j, c in enumerate(classes) if labels[i, j] == 1] if meta["task"] == "multilabel"
                else [classes[int(labels[i])]])
        top = [f"{classes[j]} {probs[i, j]:.2f}" for j in torch.argsort(probs[i], descending=True)[:2].tolist()]
        captions.append(f"true: {', '.join(true) or '-'}\npred: {', '.join(top)}")
    common.tb_image_grid(log, "val/images", np.asarray(split.images[:n]), captions, it)


if __name__ == "__main__":
    configurator.cli(main)
