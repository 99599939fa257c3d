"""
Train a radiology CLIP: contrastive image-caption training with retrieval and zero-shot evaluation.

With no arguments it is the CPU quick start on the phantom (its reports are the captions): generate
data/phantom if it is missing, train a small ViT + causal text transformer from scratch, and end with
image->text Recall@5 and zero-shot macro AUC on 1,000 validation pairs (config/clip_phantom.py, ~3 min):

    python train_clip.py config/clip_phantom.py

ROCO from OpenAI's CLIP ViT-B/16 (Hugging Face folder openai/clip-vit-base-patch16, local), 4 GPUs:
    python data.py --dataset=roco --root=/data/roco --out_dir=data/roco --image_size=224
    torchrun --standalone --nproc_per_node=4 train_clip.py config/clip_roco.py

BiomedCLIP-style (PubMedBERT text tower): torchrun --standalone --nproc_per_node=4 train_clip.py config/clip_roco_pubmedbert.py
CPU, 2 processes (gloo), as the tests do: torchrun --standalone --nproc_per_node=2 train_clip.py config/clip_phantom.py --device=cpu
Two nodes: as train.py (torchrun --nnodes=2 --node_rank=k --master_addr=... train_clip.py config/clip_roco.py).

The loss is the symmetric InfoNCE over the whole global batch: every rank gathers the features of all ranks
with gradients (each rank's own slice stays its local tensor), so W ranks x batch B == one process with W*B.
With gradient_accumulation_steps > 1 and feature_cache=True (GradCache, Gao et al. 2021) the negatives
also span the accumulated micro-batches: features of all micro-batches first (no grad), the full-batch loss
and its gradient w.r.t. the features, then each micro-batch again with grad, backpropagating the cached
feature gradients.

Evaluation (every eval_interval, exact across ranks): image->text and text->image Recall@1/5/10, mean and
median rank and MRR over the validation pool (val_size pairs), and zero-shot classification from prompt
templates (macro AUC per class, top-1 on single-finding images). A retrieved caption is a match when its
text equals the query's caption; with labels (phantom) the `lab_` metrics count a caption whose findings
(label vector) equal the image's as a match, since many reports differ only in the randomly chosen
negative sentences ("No edema." vs "No nodule."), which no image can predict.

Distillation (a small CLIP from a big one, CLIP-KD): --teacher_ckpt=<a train_clip.py checkpoint> adds, per batch,
KL(teacher || student) over the batch's similarity distributions (distill_alpha, distill_temperature) and a cosine
term to the teacher's embeddings (distill_feature); config/distill_clip_phantom.py, config/distill_clip_roco.py.

Retrieval from a trained run (validation pool):
    python train_clip.py --eval_only=True --out_dir=out/clip_phantom --query="Small left pleural effusion."
    python train_clip.py --eval_only=True --out_dir=out/clip_phantom --image=xray.png
"""

import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
import configurator
import data
import model as models
import model_clip
import phantom
import runs
import tokenizer as tok_lib
import tracking

# -----------------------------------------------------------------------------
# config: the defaults are the phantom quick start on a CPU (config/clip_phantom.py sets the same)
# run
out_dir = "out/clip_phantom"
data_dir = "data/phantom"
dataset = "phantom"  # only used to generate data_dir when it is missing and dataset == 'phantom'
phantom_images = 12000  # generated phantom size (train/val/test 70/15/15 by patient)
seed = 1337
device = "auto"  # auto | cpu | cuda | cuda:1
dtype = "auto"  # auto (bfloat16 on a CUDA GPU that supports it, else float32) | float32 | bfloat16 | float16
compile = False  # torch.compile the towers (GPU)
backend = "auto"  # DDP backend: auto | nccl | gloo
globals().update(tracking.KNOBS)  # tensorboard, trackers, mlflow_uri, mlflow_experiment, wandb_project, wandb_mode,
# track_checkpoints: the tracker knobs, the same for every train script (defaults and meaning in tracking.py)
log_interval = 20  # iterations between log lines
eval_interval = 200  # iterations between evaluations + checkpoints
eval_only = False  # evaluate (and answer --query / --image) once and exit
eval_batch_size = 256  # per process
val_size = 1000  # validation pool: the first val_size pairs of the val split (0 = all); retrieval ranks among them
keep_last = 0  # also keep the last k periodic checkpoints
overwrite = False  # True: a fresh run may replace the run already in out_dir (its checkpoints and metrics are removed)
allow_data_change = False  # True: init_from=resume may continue on data other than the checkpoint's (the best so far is reset)
dist_timeout = 600  # seconds a collective waits for a peer before failing
# retrieval tool (with eval_only)
query = ""  # a caption: print the top_k validation images
image = ""  # an image file: print the top_k validation captions
top_k = 5
query_negative = "auto"  # --query scores p(query) = softmax over cos(query), cos(this sentence): "auto" = "No <query>.", "" = plain cosine
# model: image tower
image_model = "clip_vit"  # clip_vit (ViT with CLIP's switches) | any model.py name (its head = the projection)
embed_dim = 128  # shared embedding width (512 for ViT-B/16 CLIP)
image_size = 64  # must equal the prepared data's image_size
in_chans = 1  # 1 for X-rays (RGB weights are summed); 3 replicates the gray channel
patch_size = 8
vision_width = 192
vision_layers = 4
vision_heads = 3
ln_pre = True  # OpenAI CLIP's LayerNorm after patch + position embedding (timm ViTs: False)
patch_bias = True  # OpenAI CLIP: False
vision_act = "auto"  # auto (gelu from scratch, read off the weights when pretrained) | gelu | quick_gelu
drop_path = 0.0
# model: text tower
text_model = "causal"  # causal (CLIP) | bert (PubMedBERT / BiomedCLIP)
tokenizer = "clip"  # clip (CLIP BPE, 49,408 ids) | wordpiece (BERT vocab.txt) | bpe (ours, trained on the train captions)
tokenizer_path = ""  # clip: '' = open_clip's merges file, or a HF CLIP folder; wordpiece: vocab.txt
bpe_vocab_size = 1024  # tokenizer='bpe': vocabulary trained on the captions (small: the embedding stays cheap on a CPU)
context_length = 77  # tokens incl. start/end (CLIP 77; BiomedCLIP 256)
text_width = 128
text_layers = 3
text_heads = 2
text_act = "auto"  # auto | gelu | quick_gelu
text_proj = "linear"  # linear | mlp (BiomedCLIP) | none
grad_checkpoint = False
# init
init_from = "scratch"  # scratch | pretrained | resume
pretrained_path = ""  # open_clip .pt/.bin/.safetensors, a HF CLIPModel folder, or a BiomedCLIP open_clip file
image_init = ""  # image_model = a model.py name: start its tower from these weights (a train.py best.pt, a timm or
#                  torchvision file, torchvision:<Weights>); the classifier head is replaced by the projection
norm = "dataset"  # dataset (train mean/std) | imagenet | clip (OpenAI CLIP's RGB stats; for its weights)
# LiT-style locking (Zhai et al. 2022)
lock_image = False  # freeze the image tower ...
lock_text = False  # ... or the text tower
unlock_last_n = 0  # ... except its last n layer groups (final norm + projection = 1 group, then blocks)
# batch
batch_size = 128  # micro-batch per process
gradient_accumulation_steps = 1  # global micro-steps per optimizer step, divided across ranks
feature_cache = True  # GradCache: the loss sees the whole accumulated batch (else each micro-batch alone)
max_iters = 600
# optimizer (CLIP: AdamW, beta2 0.98, wd 0.2, cosine)
learning_rate = 2e-3
lr_mult_image = 1.0  # image tower LR = learning_rate x this (e.g. 0.1 for pretrained towers)
lr_mult_text = 1.0
layer_decay_image = 1.0  # layer-wise LR decay inside the image tower (0.65-0.8 fine-tuning pretrained ViTs)
layer_decay_text = 1.0
weight_decay = 0.2
beta1 = 0.9
beta2 = 0.98
grad_clip = 1.0
warmup_iters = 50
plateau_iters = 0
lr_decay_iters = 600
min_lr = 2e-5
max_logit_scale = 100.0  # CLIP clamps the learned temperature at 100 after every step
# loss: symmetric InfoNCE, optional margin for critical findings
margin = 0.0  # additive margin on every positive cosine (0 = plain InfoNCE)
critical_terms = "pneumothorax"  # comma-separated caption terms that mark critical findings
critical_margin = 0.0  # extra margin for pairs whose caption names a critical term (stricter for them)
critical_weight = 1.0  # loss weight of those pairs (1 = off)
augment = True  # on-device affine / crop / contrast (no flips: laterality is in the captions)
# zero-shot
zs_templates = "a chest x-ray showing {}.|{} is seen.|there is {}.|findings consistent with {}.|{}."
zs_negative = "no {}."  # negative prompt: the zs_neg_ metrics use softmax(positive, negative) per class
zs_prompts = ""  # per-class prompts instead of the templates: "" | phantom (its reports' own wording) | a JSON file
#                  {"<class>": {"pos": [...], "neg": [...]}}; each list is averaged like CLIP's prompt ensembling
# selection
select_metric = "zs_auc_macro"  # zs_auc_macro | r_mean | i2t_r5 | lab_i2t_r5 | any key of the eval record
early_stop_patience = 0
# knowledge distillation from a trained CLIP (CLIP-KD, Yang et al. 2024): a small student learns the teacher's
# image-text similarity structure on every batch, on top of (or instead of) the contrastive loss
teacher_ckpt = ""  # a train_clip.py checkpoint of the big model (its own tokenizer, image size and normalization)
distill_alpha = 0.5  # loss = (1 - alpha) x InfoNCE + alpha x KL(teacher || student) over the batch's similarities
distill_temperature = 1.0  # softens both similarity distributions (the KL is scaled by T^2, as in Hinton et al.)
distill_feature = 0.0  # + this x mean(1 - cos(student, teacher)) per embedding (needs equal embed_dim)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per knob; CHECKS: across knobs)
RANGES = dict(phantom_images="[1, inf)", val_size="[0, inf)", top_k="[1, inf)", max_logit_scale="(0, inf)",
              bpe_vocab_size="[257, 1048576]",  # the 256 bytes + end-of-text at least
              margin="[0, 1]", critical_margin="[0, 1]", critical_weight="[0, 1000]", distill_feature="[0, 1000]")
CHECKS = {"min_lr <= learning_rate": "the cosine decays from learning_rate down to min_lr",
          "learning_rate * lr_mult_image <= 1": "the peak LR of the image tower",
          "learning_rate * lr_mult_text <= 1": "the peak LR of the text tower",
          "batch_size * gradient_accumulation_steps <= 1048576": "a global batch of at most 2**20 samples"}


# how a class name reads in a prompt (others: the lower-cased name)
FINDING_PHRASES = {"No Finding": "no acute cardiopulmonary abnormality", "Support Devices": "a tube or catheter",
                   "Edema": "pulmonary edema", "Nodule": "a pulmonary nodule", "Lung Opacity": "lung opacity"}

# -----------------------------------------------------------------------------
# the training loss (InfoNCE and distillation terms: model_clip.clip_loss / distill_loss, exact under DDP)


def batch_loss(img, txt, scale, dist, cfg, margin=None, weight=None, teacher=None):
    """The training loss of a batch of features: InfoNCE, mixed with distillation when a teacher's features come."""
    loss = model_clip.clip_loss(img, txt, scale, dist, margin, weight)
    if teacher is None:
        return loss
    a = cfg["distill_alpha"]
    return (1 - a) * loss + a * model_clip.distill_loss(img, txt, scale, teacher, dist, cfg["distill_temperature"],
                                                        cfg["distill_feature"])


def _rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.startswith("cuda") else None)


def _set_rng(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def forward_backward(net, micro, dist, cfg, feature_cache=True, scaler=None):
    """One optimizer step's forward + backward over this rank's micro-batches, leaving in .grad the gradient
    of the loss (feature_cache: over the whole global batch; else: the mean of per-micro-batch losses).
    micro: list of (images float (B,C,H,W), tokens (B,T), margin (B,) or None, weight (B,) or None, teacher
    (image features, text features, scale) or None). scaler: fp16's GradScaler (its scale on every backward).
    Returns the loss (this rank's, detached)."""
    ctx_amp = common.autocast(dist.device, cfg["dtype"])
    k = len(micro)

    if k == 1 or not feature_cache:
        total = 0.0
        for j, (x, t, m, w, teach) in enumerate(micro):
            with common.grad_sync(net, j == k - 1):
                with ctx_amp:
                    img, txt, scale = net(x, t)
                loss = batch_loss(img.float(), txt.float(), scale.float(), dist, cfg, m, w, teach) / k
                (loss if scaler is None else scaler.scale(loss)).backward()  # fp16: the GradScaler's scale
            total += loss.detach()
        return total

    # GradCache, pass 1: every micro-batch's features without a graph (remember the RNG for dropout / drop path)
    fwd = net.module if dist.ddp else net
    rngs, imgs, txts = [], [], []
    with torch.no_grad():
        for x, t, *_ in micro:
            rngs.append(_rng_state(dist.device))
            with ctx_amp:
                img, txt, _ = fwd(x, t)
            imgs.append(img.float())
            txts.append(txt.float())
    # pass 2: the loss over the accumulated batch and its gradient w.r.t. the cached features and the temperature
    img_all = torch.cat(imgs).requires_grad_(True)
    txt_all = torch.cat(txts).requires_grad_(True)
    scale = common.unwrap(net).logit_scale.detach().exp().requires_grad_(True)
    cat = lambda i: None if micro[0][i] is None else torch.cat([mb[i] for mb in micro])  # noqa: E731
    teach = None if micro[0][4] is None else (torch.cat([mb[4][0] for mb in micro]), torch.cat([mb[4][1] for mb in micro]),
                                              micro[0][4][2])
    loss = batch_loss(img_all, txt_all, scale, dist, cfg, cat(2), cat(3), teach)
    g_img, g_txt, g_scale = torch.autograd.grad(loss, [img_all, txt_all, scale])
    # pass 3: each micro-batch again with a graph, backpropagating its slice of the cached gradients
    rng_now = _rng_state(dist.device)
    off = 0
    for j, (x, t, *_) in enumerate(micro):
        B = x.shape[0]
        _set_rng(rngs[j], dist.device)
        with common.grad_sync(net, j == k - 1):
            with ctx_amp:
                img, txt, s = net(x, t)
            surrogate = s.float() * (g_scale / k)
            if img.requires_grad:
                surrogate = surrogate + (img.float() * g_img[off:off + B]).sum()
            if txt.requires_grad:
                surrogate = surrogate + (txt.float() * g_txt[off:off + B]).sum()
            (surrogate if scaler is None else scaler.scale(surrogate)).backward()
        off += B
    _set_rng(rng_now, dist.device)
    return loss.detach()


# -----------------------------------------------------------------------------
# retrieval metrics (exact, on the gathered pool)


def retrieval_ranks(q, c, q_group, c_group, chunk=1024):
    """Rank (1 = best) of the best-scoring correct candidate for each query: 1 + #candidates scoring strictly
    higher. q (Nq, D), c (Nc, D) normalized; a candidate is correct when its group equals the query's."""
    q_group, c_group = torch.as_tensor(q_group), torch.as_tensor(c_group)
    ranks = torch.empty(q.shape[0], dtype=torch.long)
    for a in range(0, q.shape[0], chunk):
        sim = q[a:a + chunk] @ c.t()  # (chunk, Nc)
        correct = q_group[a:a + chunk, None] == c_group[None, :]
        assert bool(correct.any(1).all()), "retrieval: a query has no correct candidate in the pool"
        best = sim.masked_fill(~correct, float("-inf")).max(1, keepdim=True).values
        ranks[a:a + chunk] = 1 + (sim > best).sum(1)
    return ranks


def rank_metrics(ranks, prefix):
    r = ranks.double()
    out = {f"{prefix}_r{k}": float((ranks <= k).double().mean()) for k in (1, 5, 10)}
    out.update({f"{prefix}_mean_rank": float(r.mean()), f"{prefix}_median_rank": float(r.median()),
                f"{prefix}_mrr": float((1.0 / r).mean())})
    return out


def chance_recall(groups, k):
    """Expected Recall@k of a random ranking: a query whose group has c members among N candidates finds one in
    the top k with probability 1 - C(N-c, k) / C(N, k). With unique captions it is k / N; with many identical
    (or same-findings) captions it can be large, so read recalls next to it."""
    groups = torch.as_tensor(groups)
    N = len(groups)
    c = torch.bincount(groups)[groups].double()
    miss = torch.ones_like(c)
    for j in range(min(k, N)):
        miss = miss * ((N - c - j) / (N - j)).clamp(min=0)
    return float((1 - miss).mean())


def retrieval_metrics(img, txt, groups, prefix=""):
    """Image i's caption is txt[i]; groups[i] names which captions count as the same (equal text, or equal labels)."""
    groups = torch.as_tensor(groups)
    out = rank_metrics(retrieval_ranks(img, txt, groups, groups), f"{prefix}i2t")
    out.update(rank_metrics(retrieval_ranks(txt, img, groups, groups), f"{prefix}t2i"))
    out[f"{prefix}r_mean"] = float(np.mean([out[f"{prefix}{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]))
    for k in (1, 5, 10):  # the same in both directions: both pools hold one item per pair
        out[f"{prefix}chance_r{k}"] = chance_recall(groups, k)
    return out


def group_ids(keys):
    ids = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)


# -----------------------------------------------------------------------------
# zero-shot classification from prompts


def class_prompts(classes, templates, negative, prompts=""):
    """(positive prompts, negative prompts) per class: templates filled with the class phrase, or zs_prompts."""
    if not prompts:
        return ([[t.format(FINDING_PHRASES.get(c, c.lower())) for t in templates] for c in classes],
                [[negative.format(FINDING_PHRASES.get(c, c.lower()))] for c in classes])
    if prompts == "phantom":
        table = {c: {"pos": p, "neg": n} for c, (p, n) in phantom.PROMPTS.items()}
    else:
        with open(prompts) as f:
            table = json.load(f)
    missing = [c for c in classes if c not in table or not table[c].get("pos") or not table[c].get("neg")]
    if missing:
        raise ValueError(f"zs_prompts {prompts!r} has no 'pos' and 'neg' prompts for {missing}")
    return [list(table[c]["pos"]) for c in classes], [list(table[c]["neg"]) for c in classes]


@torch.no_grad()
def zero_shot(raw, img, labels, classes, tok, cfg, device):
    """Macro AUC of prompt similarities per class (multi-label), the same with softmax(positive, negative
    prompt), and top-1 accuracy on images with exactly one positive class."""
    from sklearn.metrics import roc_auc_score
    templates = [t for t in cfg["zs_templates"].split("|") if t]
    pos, neg = class_prompts(classes, templates, cfg["zs_negative"], cfg["zs_prompts"])
    flat = [t for prompts in pos + neg for t in prompts]
    e = runs.encode_texts(raw, tok, flat, cfg, device)  # one pass for all prompts
    # average the prompt embeddings per class, as in CLIP's prompt ensembling
    ends = np.cumsum([len(p) for p in pos + neg])
    mean = torch.stack([e[a:b].mean(0) for a, b in zip(np.r_[0, ends[:-1]], ends)])
    emb = F.normalize(mean[:len(classes)], dim=-1)  # (C, D)
    neg_emb = F.normalize(mean[len(classes):], dim=-1)
    scale = float(raw.logit_scale.detach().exp())
    s_pos = (img @ emb.t()).numpy()
    s_neg = (img @ neg_emb.t()).numpy()
    p_neg = runs.negation_aware(torch.as_tensor(s_pos), torch.as_tensor(s_neg), scale).numpy()
    labels = np.asarray(labels, np.float64)
    out, aucs, aucs_neg = {}, {}, {}
    for j, c in enumerate(classes):
        known = ~np.isnan(labels[:, j])
        y = labels[known, j]
        if y.min() == y.max():
            continue  # AUC undefined without both positives and negatives
        aucs[c] = float(roc_auc_score(y, s_pos[known, j]))
        aucs_neg[c] = float(roc_auc_score(y, p_neg[known, j]))
    out["zs_auc_macro"] = float(np.mean(list(aucs.values()))) if aucs else float("nan")
    out["zs_neg_auc_macro"] = float(np.mean(list(aucs_neg.values()))) if aucs_neg else float("nan")
    out["zs_auc"] = aucs
    single = (np.nan_to_num(labels) == 1).sum(1) == 1
    if single.any():
        truth = np.nan_to_num(labels[single]).argmax(1)
        out["zs_top1"] = float((s_pos[single].argmax(1) == truth).mean())
        out["zs_n_single"] = int(single.sum())
    return out


# -----------------------------------------------------------------------------
# images and captions -> features


@torch.no_grad()
def encode_split(raw, split, tokens, lengths, n, cfg, meta, dist):
    """Image and caption features of the first n samples, each rank a shard, gathered exactly (sorted by index)."""
    idx_parts, img_parts, txt_parts = [], [], []
    view = _Head(split, n)
    for idx, x, _ in data.eval_shards(view, cfg["eval_batch_size"], dist.rank, dist.world_size):
        x = runs.images_to_float(x.to(dist.device), meta, cfg)
        t = runs.trim(torch.from_numpy(tokens[idx]).long(), torch.from_numpy(lengths[idx])).to(dist.device)
        with common.autocast(dist.device, cfg["dtype"]):
            img, txt, _ = raw(x, t)
        idx_parts.append(torch.as_tensor(idx))
        img_parts.append(img.float().cpu())
        txt_parts.append(txt.float().cpu())
    D = raw.model_args["embed_dim"]
    idx = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.long)
    feats = torch.cat([torch.cat(img_parts), torch.cat(txt_parts)], 1) if idx_parts else torch.zeros(0, 2 * D)
    idx, feats = common.gather_indexed(idx, feats, dist)
    assert idx.numel() == n and bool((idx == torch.arange(n)).all()), "eval did not see every sample once"
    return feats[:, :D], feats[:, D:]


class _Head:
    """The first n samples of a PreparedSplit (the validation pool), with the interface eval_shards reads."""

    def __init__(self, split, n):
        self.images, self.labels, self.n = split.images, np.asarray(split.labels)[:n], n

    def __len__(self):
        return self.n


def run_eval(raw, split, tokens, lengths, captions, cfg, meta, dist, tok):
    n = len(split) if cfg["val_size"] <= 0 else min(cfg["val_size"], len(split))
    raw.eval()
    img, txt = encode_split(raw, split, tokens, lengths, n, cfg, meta, dist)
    record = {"pool": n, "logit_scale": float(raw.logit_scale.detach().exp())}
    record.update(retrieval_metrics(img, txt, group_ids(captions[:n])))
    labels = np.asarray(split.labels)[:n]
    if labels.ndim == 2 and labels.shape[1] > 0:
        keys = [tuple(np.nan_to_num(r, nan=-1).tolist()) for r in labels]
        record.update(retrieval_metrics(img, txt, group_ids(keys), prefix="lab_"))
        record.update(zero_shot(raw, img, labels, meta["classes"], tok, cfg, dist.device))
    # InfoNCE over the whole pool at the current temperature (duplicated captions count as negatives)
    logits = record["logit_scale"] * img @ txt.t()
    target = torch.arange(n)
    record["loss_pool"] = float(0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)))
    raw.train()
    return record, img, txt


# -----------------------------------------------------------------------------
# data: captions -> tokens (cached next to the prepared data when the folder is writable)


def load_tokens(data_dir, split_name, captions, tok, cfg, master):
    if cfg["tokenizer"] == "bpe":  # trained per run: fast, and not worth a cache keyed on its merges
        return tok_lib.tokenize_numpy(tok, captions, cfg["context_length"])
    tag = hashlib.sha1(f"{cfg['tokenizer']}|{cfg['tokenizer_path']}|{cfg['context_length']}|{tok.vocab_size}".encode()).hexdigest()[:8]
    path = os.path.join(data_dir, f"{split_name}_tokens_{tag}.npz")
    if os.path.isfile(path):
        z = np.load(path)
        if len(z["tokens"]) == len(captions):
            return z["tokens"], z["lengths"]
    tokens, lengths = tok_lib.tokenize_numpy(tok, captions, cfg["context_length"])
    if master and os.access(data_dir, os.W_OK):
        tmp = path + ".tmp.npz"
        np.savez(tmp, tokens=tokens, lengths=lengths)
        os.replace(tmp, path)
    return tokens, lengths


class Teacher:
    """A trained CLIP, frozen, that embeds the student's training batches in its own terms: its tokenizer and
    context length over the same captions, its image size and normalization over the same (augmented) pixels."""

    def __init__(self, path, captions, cfg, meta, device, master):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher_ckpt={path!r} does not exist: train the teacher first (python train_clip.py "
                                    f"config/clip_phantom.py writes out/clip_phantom/best.pt) or set --teacher_ckpt=''")
        ck = common.load_checkpoint(path, flag="--teacher_ckpt", wants=("train_clip.py",))
        self.cfg = {**ck["config"], "dtype": cfg["dtype"]}
        self.meta, self.student_cfg, self.student_meta = ck["meta"], cfg, meta
        self.net = model_clip.build_clip(**ck["model_args"])
        self.net.load_state_dict(ck["model"])
        self.net.requires_grad_(False).eval().to(device)
        t = self.cfg
        self.tok = tok_lib.build_tokenizer(t["tokenizer"], t["tokenizer_path"], t["context_length"], None,
                                           t["bpe_vocab_size"], saved=ck.get("tokenizer"))
        self.tokens, self.lengths = load_tokens(cfg["data_dir"], "train", captions, self.tok, t, master)
        self.n_params, self.iter = sum(p.numel() for p in self.net.parameters()), ck["iter"]

    def describe(self, cfg):
        a = self.net.model_args
        return (f"teacher: {cfg['teacher_ckpt']} (iter {self.iter}, {self.n_params / 1e6:.2f}M params, image "
                f"{a['image_model']} at {a['image_size']} px, tokenizer {self.cfg['tokenizer']}) | loss = "
                f"{1 - cfg['distill_alpha']:g} x InfoNCE + {cfg['distill_alpha']:g} x KL at T={cfg['distill_temperature']:g}"
                + (f" + {cfg['distill_feature']:g} x feature cosine" if cfg["distill_feature"] else ""))

    @torch.no_grad()
    def __call__(self, x, idx):
        """x: the student's normalized (augmented) images; idx: their rows in the training split."""
        x = runs.images_to_float(runs.images_to_unit(x, self.student_meta, self.student_cfg), self.meta, self.cfg)
        S = self.net.model_args["image_size"]
        if x.shape[-1] != S or x.shape[-2] != S:
            x = F.interpolate(x, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        t = runs.trim(torch.from_numpy(self.tokens[idx]).long(), torch.from_numpy(self.lengths[idx])).to(x.device)
        with common.autocast(str(x.device), self.cfg["dtype"]):
            img, txt, scale = self.net(x, t)
        return img.float(), txt.float(), scale.float()


def critical_flags(captions, terms):
    """A caption is critical when a sentence names a term and is not a negation ('No pneumothorax.' is not)."""
    terms = [t.strip().lower() for t in terms.split(",") if t.strip()]

    def critical(c):
        sentences = [s.strip() for s in c.lower().replace(";", ".").split(".")]
        return any(t in s for s in sentences if not s.startswith(("no ", "without ")) for t in terms)
    return np.array([critical(c) for c in captions], dtype=bool)


# -----------------------------------------------------------------------------


def model_args_from_cfg(cfg):
    if cfg["init_from"] == "pretrained":
        if not cfg["pretrained_path"]:
            raise ValueError("init_from='pretrained' needs --pretrained_path=<open_clip file | HF CLIP folder | BiomedCLIP file>")
        a = model_clip.clip_args_from_weights(cfg["pretrained_path"])
        a.update(in_chans=cfg["in_chans"], image_size=cfg["image_size"], drop_path=cfg["drop_path"],
                 grad_checkpoint=cfg["grad_checkpoint"], context_length=min(a.get("context_length", 77), cfg["context_length"]))
        for key in ("vision_act", "text_act"):
            if cfg[key] != "auto":
                a[key] = cfg[key]
        return a
    act = lambda v: "gelu" if v == "auto" else v  # noqa: E731
    return dict(embed_dim=cfg["embed_dim"], image_model=cfg["image_model"], image_size=cfg["image_size"],
                patch_size=cfg["patch_size"], vision_width=cfg["vision_width"], vision_layers=cfg["vision_layers"],
                vision_heads=cfg["vision_heads"], in_chans=cfg["in_chans"], ln_pre=cfg["ln_pre"],
                patch_bias=cfg["patch_bias"], vision_act=act(cfg["vision_act"]), drop_path=cfg["drop_path"],
                text_model=cfg["text_model"], context_length=cfg["context_length"], text_width=cfg["text_width"],
                text_layers=cfg["text_layers"], text_heads=cfg["text_heads"], text_act=act(cfg["text_act"]),
                text_proj=cfg["text_proj"], grad_checkpoint=cfg["grad_checkpoint"],
                text_eps=1e-12 if cfg["text_model"] == "bert" else 1e-5)


def main(argv=None):
    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)
    quiet = cfg["eval_only"] and (cfg["query"] or cfg["image"])
    return common.launch(_train, cfg, "" if quiet else None)


def _train(cfg, dist, log):
    common.check_init_from(cfg)
    ckpt = eval_checkpoint(cfg, log) if cfg["eval_only"] else common.resume_checkpoint(cfg, "train_clip.py", log)
    common.start_run("train_clip.py", cfg, dist, log, DEFAULTS, save_config=ckpt is None)

    # --- data: pairs, tokens, critical flags
    meta = data.load_run_data(cfg, dist, log)
    train_split = data.PreparedSplit(cfg["data_dir"], "train")
    val_split = data.PreparedSplit(cfg["data_dir"], "val")
    captions = {s.split: [r["text"] for r in s.index] for s in (train_split, val_split)}
    tok = tok_lib.build_tokenizer(cfg["tokenizer"], cfg["tokenizer_path"], cfg["context_length"], captions["train"],
                                  cfg["bpe_vocab_size"], saved=ckpt.get("tokenizer") if ckpt is not None else None)
    for name, caps in captions.items():
        empty = sum(1 for c in caps if not c.strip())
        if empty:
            raise ValueError(f"{cfg['data_dir']}/{name}_index.csv: {empty} of {len(caps)} rows have an empty 'text' "
                             f"column; CLIP needs a caption per image (prepare with a dataset that has reports/captions)")
    tokens = {s: load_tokens(cfg["data_dir"], s, caps, tok, cfg, dist.master) for s, caps in captions.items()}
    crit = critical_flags(captions["train"], cfg["critical_terms"])
    accum, global_batch, note = common.batch_plan(cfg["batch_size"], cfg["gradient_accumulation_steps"], dist.world_size)
    if note:
        log.line(note)
    log_data(log, cfg, train_split, val_split, tokens, crit, accum, global_batch, dist.world_size)

    # --- model, teacher, optimizer
    raw, args = build_clip_model(cfg, ckpt, tok, log)
    raw.to(dist.device)
    teacher = None
    if cfg["teacher_ckpt"] and not cfg["eval_only"]:
        teacher = Teacher(cfg["teacher_ckpt"], captions["train"], cfg, meta, dist.device, dist.master)
        log.line(teacher.describe(cfg))
    n_params = sum(p.numel() for p in raw.parameters())
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    log.line(f"model: image {args['image_model']} | text {args['text_model']} | embed {args['embed_dim']} | "
             f"{n_params / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable) | tokenizer {cfg['tokenizer']} "
             f"(vocab {tok.vocab_size}, context {cfg['context_length']})")
    groups = model_clip.clip_param_groups(raw, cfg["weight_decay"], cfg["lr_mult_image"], cfg["lr_mult_text"],
                                          cfg["layer_decay_image"], cfg["layer_decay_text"])
    optimizer = common.make_optimizer(groups, cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), dist.device)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg["dtype"] == "float16")
    ckpt_meta = common.checkpoint_meta(meta, cfg["data_dir"], ("classes", "mean", "std"), norm=cfg["norm"])
    ckpt_meta["classes"] = ckpt_meta["classes"] or []
    prog = common.new_progress()
    if ckpt is not None and not cfg["eval_only"]:
        prog = common.restore(ckpt, cfg, ckpt_meta, optimizer, scaler, dist, log)
    ckpt = None
    iter_num = prog["iter"]
    if cfg["eval_only"] and (cfg["query"] or cfg["image"]):
        return _retrieve(raw, val_split, tokens["val"], captions["val"], cfg, meta, dist, tok)
    net = common.wrap(raw, cfg["compile"], dist)
    loader = data.Loader(train_split, cfg["batch_size"], accum, cfg["seed"], dist.rank, dist.world_size,
                         dist.device, start_step=iter_num)
    tokenizer_state = tok.to_dict() if cfg["tokenizer"] == "bpe" else None

    # --- the loop
    log.line(f"training {cfg['max_iters']} iterations from iter {iter_num}")
    timer = common.Timer(dist.device)
    resumed_at, record = (iter_num if iter_num > 0 else -1), None
    while True:
        last_step = iter_num >= cfg["max_iters"]
        lr = common.schedule_lr(optimizer, iter_num, cfg)

        # evaluate, log and checkpoint
        if common.eval_due(iter_num, cfg, last_step, resumed_at):
            with timer.paused():
                t_eval = time.time()
                record, img_f, txt_f = run_eval(raw, val_split, *tokens["val"], captions["val"], cfg, meta, dist, tok)
                record = {"iter": iter_num, "split": "val", **record}
                improved = common.select(prog, record, cfg, common.higher_is_better(cfg["select_metric"]), iter_num)
                log_eval(log, record, time.time() - t_eval)
                log.line(f"  best {cfg['select_metric']} {prog['best_metric']:.4f} @ {prog['best_iter']}")
                log.jsonl(record)
                if dist.master:
                    _tensorboard_eval(log, record, img_f, txt_f, val_split, captions["val"], iter_num)
                common.save_run(cfg, dist, log, "train_clip.py", iter_num, prog, improved, raw, raw.model_args, ckpt_meta,
                                optimizer, scaler, tokenizer=tokenizer_state)
            last_step = last_step or common.early_stop(prog, cfg, log)
        if last_step or cfg["eval_only"]:
            break

        # TRAINING SECTION: this rank's micro-batches, forward + backward (GradCache across them), the optimizer step
        micro = [micro_batch(x, idx, k, iter_num, tokens["train"], crit, teacher, cfg, meta, dist)
                 for k, (x, _, idx) in enumerate(loader.get(iter_num))]
        loss = forward_backward(net, micro, dist, cfg, cfg["feature_cache"], scaler)
        common.check_finite(loss, iter_num, cfg["out_dir"])
        norm = common.optimizer_step(optimizer, scaler, [p for p in raw.parameters() if p.requires_grad], cfg["grad_clip"])
        raw.clamp_logit_scale(cfg["max_logit_scale"])
        iter_num += 1
        timer.step()
        # TRAINING SECTION END: what follows is the log line

        if iter_num % cfg["log_interval"] == 0 or iter_num == cfg["max_iters"]:
            common.log_step(log, dist, timer, iter_num, cfg, loss, norm, lr, global_batch, "pairs",
                            extra={"scale": float(raw.logit_scale.detach().exp())})

    loader.close()
    final = common.finish(log, prog, cfg, iter_num, timer)
    return {**final, "last": record}


# -----------------------------------------------------------------------------
# the pieces of _train: the checkpoint eval_only reads, the model, a micro-batch, the data and eval lines


def eval_checkpoint(cfg, log):
    """eval_only: the run's best.pt (else ckpt.pt), whose tokenizer, normalization and size the eval then uses;
    None with init_from='pretrained' (evaluate those weights)."""
    if cfg["init_from"] == "pretrained":
        return None
    ckpt_path, best = (os.path.join(cfg["out_dir"], f) for f in ("ckpt.pt", "best.pt"))
    path = best if os.path.exists(best) else ckpt_path
    if not os.path.exists(path):
        raise FileNotFoundError(f"eval_only: no {best} or {ckpt_path}; train first (python train_clip.py "
                                f"--out_dir={cfg['out_dir']}) or pass --init_from=pretrained --pretrained_path=...")
    ckpt = common.load_checkpoint(path)
    for key in ("tokenizer", "tokenizer_path", "bpe_vocab_size", "context_length", "norm", "in_chans", "image_size"):
        cfg[key] = ckpt["config"][key]  # the run's own choices; the rest of the command line still applies
    log.line(f"eval_only: {path} (iter {ckpt['iter']})")
    return ckpt


def build_clip_model(cfg, ckpt, tok, log):
    """The CLIP from a checkpoint, pretrained weights (+ image_init for a model.py image tower) or scratch; locked towers."""
    if ckpt is not None:
        args = ckpt["model_args"]
    else:
        args = model_args_from_cfg(cfg)
        if cfg["init_from"] == "scratch":
            args["vocab_size"] = tok.vocab_size
        args.update(eot_id=tok.eot_id, pad_id=tok.pad_id)
    if args["vocab_size"] < tok.vocab_size:
        raise ValueError(f"the text tower knows {args['vocab_size']} token ids but tokenizer={cfg['tokenizer']!r} makes "
                         f"{tok.vocab_size}: use the tokenizer the weights were trained with")
    raw = model_clip.build_clip(**args)
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
    elif cfg["init_from"] == "pretrained":
        report = model_clip.load_clip_weights(raw, cfg["pretrained_path"])
        log.line(f"loaded {report['file']} ({report['layout']} layout, {report['loaded']} tensors)"
                 + (f" | adapted: {'; '.join(report['adapted'])}" if report["adapted"] else ""))
    if ckpt is None and cfg["image_init"]:
        if not isinstance(raw.visual, model_clip.ImageModelTower):
            raise ValueError(f"image_init needs image_model = a model.py name (convnext_atto, vit_small, tv:resnet50, ...), "
                             f"got image_model={args['image_model']!r}")
        r = models.load_image_init(raw.visual.net, cfg["image_init"])
        log.line(f"image tower from {cfg['image_init']} ({r['layout']} layout; head reset: {len(r['reset'])} tensors)")
    if cfg["lock_image"]:
        model_clip.lock_tower(raw, "visual", cfg["unlock_last_n"])
    if cfg["lock_text"]:
        model_clip.lock_tower(raw, "text", cfg["unlock_last_n"])
    return raw, args


def micro_batch(x, idx, k, it, train_tokens, crit, teacher, cfg, meta, dist):
    """(images, tokens, margin, weight, teacher features) of one micro-batch: images augmented on device, a pure
    function of (seed, iter, rank, micro-step); margins and weights of the critical pairs."""
    x = runs.images_to_float(x, meta, cfg)
    if cfg["augment"]:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(((cfg["seed"] * 1_000_003 + it) * 1009 + dist.rank) * 131 + k)
        x = data.augment(x, gen, hflip=False)
    tokens, lengths = train_tokens
    t = runs.trim(torch.from_numpy(tokens[idx]).long(), torch.from_numpy(lengths[idx])).to(dist.device)
    c = torch.from_numpy(crit[idx]).to(dist.device).float()
    m = cfg["margin"] + cfg["critical_margin"] * c if (cfg["margin"] or cfg["critical_margin"]) else None
    w = 1.0 + (cfg["critical_weight"] - 1.0) * c if cfg["critical_weight"] != 1.0 else None
    return x, t, m, w, teacher(x, idx) if teacher is not None else None


def log_data(log, cfg, train_split, val_split, tokens, crit, accum, global_batch, world):
    n_val = len(val_split) if cfg["val_size"] <= 0 else min(cfg["val_size"], len(val_split))
    lengths = tokens["train"][1]
    one_loss = cfg["feature_cache"] or accum * world == 1
    log.line(f"data: {cfg['data_dir']} | train {len(train_split)} pairs | val pool {n_val} pairs | "
             f"global batch {global_batch} = {cfg['batch_size']} x {accum} accum x {world} ranks "
             f"({'one loss over all of it' if one_loss else 'a loss per micro-batch'}) | "
             f"{cfg['max_iters'] * global_batch / len(train_split):.1f} epochs | tokens/caption "
             f"{lengths.mean():.1f} (max {lengths.max()}, {100 * (lengths >= cfg['context_length']).mean():.1f}% "
             f"cut at {cfg['context_length']}) | critical pairs {100 * crit.mean():.1f}%")


def log_eval(log, r, seconds):
    log.line(f"eval iter {r['iter']} | pool {r['pool']} | i2t R@1/5/10 {r['i2t_r1']:.3f}/{r['i2t_r5']:.3f}/"
             f"{r['i2t_r10']:.3f} mrr {r['i2t_mrr']:.3f} | t2i R@1/5/10 {r['t2i_r1']:.3f}/"
             f"{r['t2i_r5']:.3f}/{r['t2i_r10']:.3f} | loss_pool {r['loss_pool']:.3f} | "
             f"scale {r['logit_scale']:.1f} | {seconds:.1f} s")
    if "zs_auc_macro" in r:
        log.line(f"  findings-match i2t R@1/5/10 {r['lab_i2t_r1']:.3f}/{r['lab_i2t_r5']:.3f}/{r['lab_i2t_r10']:.3f}"
                 f" t2i {r['lab_t2i_r1']:.3f}/{r['lab_t2i_r5']:.3f}/{r['lab_t2i_r10']:.3f} (chance "
                 f"{r['lab_chance_r1']:.3f}/{r['lab_chance_r5']:.3f}/{r['lab_chance_r10']:.3f}) | zero-shot "
                 f"auc_macro {r['zs_auc_macro']:.4f} (with 'no X' prompts {r['zs_neg_auc_macro']:.4f}) | "
                 f"top1 {r.get('zs_top1', float('nan')):.3f} on {r.get('zs_n_single', 0)} single-finding images")
        log.line("  zero-shot AUC: " + " ".join(f"{c[:12]}={v:.3f}" for c, v in r["zs_auc"].items()))


def _retrieve(raw, split, tokens, captions, cfg, meta, dist, tok):
    """--query: top-k validation images for a caption; --image: top-k validation captions for an image file."""
    n = len(split) if cfg["val_size"] <= 0 else min(cfg["val_size"], len(split))
    raw.eval()
    img, txt = encode_split(raw, split, *tokens, n, cfg, meta, dist)
    out = {}
    if cfg["query"]:
        score, neg = runs.rank_by_query(raw, tok, img, cfg["query"], cfg, dist.device, cfg["query_negative"])
        scores, order = score.topk(min(cfg["top_k"], n))
        out["images"] = [(int(i), float(s), captions[i]) for s, i in zip(scores, order)]
        how = f"p(query) against {neg!r}" if neg else "cosine"
        common.print0(f"query: {cfg['query']!r} -> top {len(order)} of {n} validation images by {how}")
        for r, (i, s, c) in enumerate(out["images"], 1):
            common.print0(f"{r:3d} | val #{i:5d} | {s:.3f} | {c}")
    if cfg["image"]:
        a = data.decode_image(cfg["image"], cfg["image_size"])
        x = runs.images_to_float(torch.from_numpy(np.asarray(a, np.uint8))[None, None].to(dist.device), meta, cfg)
        with torch.no_grad(), common.autocast(dist.device, cfg["dtype"]):
            v = raw.encode_image(x).float().cpu()[0]
        first = {}
        for i in range(n):
            first.setdefault(captions[i], i)  # identical captions are listed once
        cand = torch.tensor(sorted(first.values()))
        scores, order = (txt[cand] @ v).topk(min(cfg["top_k"], len(cand)))
        out["captions"] = [(int(cand[o]), float(s), captions[int(cand[o])]) for s, o in zip(scores, order)]
        common.print0(f"image: {cfg['image']} -> top {len(order)} of {len(cand)} distinct validation captions")
        for r, (i, s, c) in enumerate(out["captions"], 1):
            common.print0(f"{r:3d} | val #{i:5d} | {s:.3f} | {c}")
    return out


def _tensorboard_eval(log, record, img, txt, split, queries, it):
    if log.tb is None:
        return
    log.scalars({k: v for k, v in record.items() if isinstance(v, float)}, it, "val/")
    log.scalars(record.get("zs_auc", {}), it, "val_zs_auc/")
    # top-5 retrieved images for the first 4 validation captions: one row per query, the true image first
    rows, captions = [], []
    for q in range(min(4, len(txt))):
        top = (img @ txt[q]).topk(min(5, len(img))).indices.tolist()
        rows += [q] + top
        captions += [f"query {q}: {queries[q][:40]}"] + [f"top {r + 1}: val #{i}" for r, i in enumerate(top)]
    common.tb_image_grid(log, "val/retrievals", np.asarray(split.images[np.array(rows)]), captions, it, cols=6)


if __name__ == "__main__":
    configurator.cli(main)
