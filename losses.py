"""
The image classifiers' losses, beside the models they train (open_clip keeps its loss.py the same way; the CLIP
losses are in model_clip.py). NaN labels are unknown: masked out per class. train.py trains with them, export.py
fine-tunes pruned models with them.
"""

import torch
import torch.nn.functional as F

# the loss knobs of train.py's config and their defaults there: what a checkpoint without a config is read with
LOSS_DEFAULTS = dict(loss="auto", bce_weight=0.7, focal_alpha=0.25, focal_gamma=2.0, label_smoothing=0.0)


def smooth_targets(y, eps):
    """Label smoothing for sigmoid outputs: 1 -> 1 - eps/2, 0 -> eps/2 (each label a two-class problem smoothed as
    Szegedy et al. 2016 smooth K classes: (1 - eps) * y + eps / K); NaN (unknown) stays NaN."""
    return y * (1 - eps) + eps / 2 if eps > 0 else y


def masked_bce(logits, y, pos_weight=None, smoothing=0.0):
    mask = ~torch.isnan(y)
    target = torch.where(mask, smooth_targets(y, smoothing), torch.zeros_like(y))
    per = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1)


def masked_focal(logits, y, alpha, gamma, smoothing=0.0):
    """Sigmoid focal loss (Lin et al. 2017, eq. 5; torchvision's) averaged over known labels."""
    from torchvision.ops import sigmoid_focal_loss  # here, not at the top: importing torchvision adds ~1.3 s to
    # every script's start-up (it loads torch._dynamo), and only the focal losses need it
    mask = ~torch.isnan(y)
    target = torch.where(mask, smooth_targets(y, smoothing), torch.zeros_like(y))
    per = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1)


def make_loss_terms(cfg, task, pos_w):
    """terms(logits, y) -> {name: weighted term} whose values add up to the loss (bce, focal, ce), from train.py's loss
    knobs (cfg: loss, bce_weight, focal_alpha, focal_gamma, label_smoothing): metrics.jsonl logs each as loss/<name>."""
    kind = cfg["loss"] if cfg["loss"] != "auto" else ("bce" if task == "multilabel" else "ce")
    if task == "multiclass" and kind != "ce":
        raise ValueError(f"loss={kind!r} is for multi-label data; this dataset is multi-class: use --loss=ce")
    if task == "multilabel" and kind == "ce":
        raise ValueError("loss='ce' is for multi-class data; this dataset is multi-label: use bce, focal or bce+focal")
    eps = cfg["label_smoothing"]
    if not 0 <= eps < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {eps}")
    alpha, gamma = cfg["focal_alpha"], cfg["focal_gamma"]
    if kind == "ce":
        # y is a class index, or a soft target (B, C) after mixup
        return lambda logits, y: {"ce": F.cross_entropy(logits, y, label_smoothing=eps)}
    if kind == "bce":
        return lambda logits, y: {"bce": masked_bce(logits, y, pos_w, eps)}
    if kind == "focal":
        return lambda logits, y: {"focal": masked_focal(logits, y, alpha, gamma, eps)}
    if kind == "bce+focal":
        w = cfg["bce_weight"]
        return lambda logits, y: {"bce": w * masked_bce(logits, y, pos_w, eps),
                                  "focal": (1 - w) * masked_focal(logits, y, alpha, gamma, eps)}
    raise ValueError(f"unknown loss {kind!r}: choose auto, bce, focal, bce+focal or ce")


def make_loss_fn(cfg, task, pos_w):
    """loss(logits, y): the sum of make_loss_terms' terms."""
    terms = make_loss_terms(cfg, task, pos_w)
    return lambda logits, y: sum(terms(logits, y).values())


def distill_loss(student_logits, teacher_logits, task, T):
    """Soft BCE against the teacher's tempered sigmoids (multi-label), KL to its tempered softmax (multi-class)."""
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(student_logits / T, torch.sigmoid(teacher_logits / T)) * T * T
    return F.kl_div(F.log_softmax(student_logits / T, 1), F.log_softmax(teacher_logits / T, 1),
                    reduction="batchmean", log_target=True) * T * T
