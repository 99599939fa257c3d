"""
The image classifiers' losses, beside the models they train (open_clip keeps its loss.py the same way; the CLIP
losses are in model_clip.py). NaN labels are unknown: masked out per class. train.py trains with them, export.py
fine-tunes pruned models with them.
"""

import torch
import torch.nn.functional as F

# the loss knobs of train.py's config and their defaults there: what a checkpoint without a config is read with
LOSS_DEFAULTS = dict(loss="auto", bce_weight=0.7, focal_alpha=0.25, focal_gamma=2.0, label_smoothing=0.0)


def masked_bce(logits, y, pos_weight=None):
    mask = ~torch.isnan(y)
    target = torch.where(mask, y, torch.zeros_like(y))
    per = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1)


def masked_focal(logits, y, alpha, gamma):
    """Sigmoid focal loss (Lin et al. 2017, eq. 5; torchvision's) averaged over known labels."""
    from torchvision.ops import sigmoid_focal_loss  # here, not at the top: importing torchvision adds ~1.3 s to
    # every script's start-up (it loads torch._dynamo), and only the focal losses need it
    mask = ~torch.isnan(y)
    target = torch.where(mask, y, torch.zeros_like(y))
    per = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1)


def make_loss_fn(cfg, task, pos_w):
    """loss(logits, y) from train.py's loss knobs (cfg: loss, bce_weight, focal_alpha, focal_gamma, label_smoothing)."""
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
