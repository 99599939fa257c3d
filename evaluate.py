"""
Test-set evaluation of a classifier checkpoint: per-class ROC AUC with a patient-level bootstrap
95% CI, average precision, sensitivity / specificity / F1 at a threshold chosen on validation,
macro and micro means, calibration, curves, predictions CSV, Grad-CAM / attention-rollout heatmaps.

    python evaluate.py --ckpt=out/phantom/best.pt --split=test           # writes out/phantom/eval_test.json
    python evaluate.py --ckpt=out/x/best.pt --data_dir=data/nih          # another data set: shared classes only
    python evaluate.py --ckpt=out/x/best.pt --tta=8 --n_bootstrap=2000   # 8 augmented views, tighter CI
    python evaluate.py --ckpt=out/x/best.pt --cam=4                      # heatmaps: 4 best hits + 4 worst errors per class
    python evaluate.py --ckpt=out/x/best.pt --image=some_cxr.png         # one image: probabilities + heatmaps

Outputs next to the checkpoint (or in --out_dir), `<tag>` = split, or <dataset>_<split> for another data set:
    eval_<tag>.json          every number printed, plus the reliability table
    predictions_<tag>.csv    one row per image: index columns, true_<class> labels, one probability per class
    submission_<tag>.csv     CheXpert only: study-level, the 5 competition columns, max over the study's views
    <tag>_roc.png, <tag>_pr.png, <tag>_reliability.png, <tag>_confusion.png (multiclass)   (needs matplotlib)
    cam_<tag>/*.png          heatmap overlays (--cam / --image)
    tb_eval/                 the same curves and figures for TensorBoard

The statistics are plain functions that the other scripts import: classification_metrics (train.py's
per-eval metrics), masked_auc / masked_ap, bootstrap_ci (resampling patients), delong_test (two
correlated AUCs), calibration (ECE + reliability table), youden_threshold. The heatmaps are in cam.py.
"""

import csv
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

import configurator

# -----------------------------------------------------------------------------
# config: python evaluate.py --key=value (or a config file), see configurator.py
ckpt = ""                 # path to best.pt / ckpt.pt written by train.py (required)
split = "test"            # train | val | test
data_dir = ""             # "" = the data set the checkpoint was trained on; another prepared dir = external test
out_dir = ""              # "" = the checkpoint's folder
weights = "model"         # model (the raw weights train.py selected best.pt on) | ema (the EMA copy, when trained with ema_decay>0)
batch_size = 64           # inference batch; memory only, results do not depend on it
device = "auto"           # auto | cpu | cuda | cuda:1
n_bootstrap = 1000        # bootstrap resamples of patients for the AUC CI; 0 = no CI. 1000 gives ~+-0.005 on the CI ends
bootstrap_seed = 0        # fixed so the CI is reproducible
threshold = "youden"      # how the operating point is chosen on validation: youden (max sens+spec-1) | sensitivity | f1
target_sensitivity = 0.9  # with threshold="sensitivity": the highest threshold that reaches this sensitivity on val
n_bins = 15               # calibration bins (equal width); 10-15 is the usual choice (Guo et al. 2017)
tta = 0                   # test-time augmentation: average the plain view and this many augmented views (0 = off)
tta_seed = 0              # fixed generator for the TTA views
cam = 0                   # heatmaps for the N most confident true positives and N worst errors per class (0 = off)
image = ""                # one image file (png/jpg): print its probabilities and write its heatmaps
figures = True            # PNG curves with matplotlib (optional dependency; the json is written either way)
tensorboard = True        # curves + figures to <out_dir>/tb_eval
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

CHEXPERT_COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]

# -----------------------------------------------------------------------------
# metrics on arrays: probs (N, C); labels (N, C) float with NaN = unknown (multilabel) or (N,) int (multiclass)


def _one_class_stats(y, p):
    """AUC and AP of one class, NaN when the class has a single label value among the known labels."""
    known = ~np.isnan(y)
    y, p = y[known], p[known]
    if y.size == 0 or y.min() == y.max():
        return float("nan"), float("nan")
    return float(roc_auc_score(y, p)), float(average_precision_score(y, p))


def _as_multilabel(labels, num_classes, task):
    """Multiclass int labels -> one-vs-rest float (N, C) so both tasks share the per-class code."""
    if task == "multiclass":
        labels = np.asarray(labels, dtype=np.int64)
        return np.eye(num_classes, dtype=np.float32)[labels]
    return np.asarray(labels, dtype=np.float64)


def masked_auc(probs, labels, task="multilabel"):
    """Per-class ROC AUC (C,), NaN labels masked, NaN for a class with one label value."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = _as_multilabel(labels, probs.shape[1], task)
    return np.array([_one_class_stats(labels[:, c], probs[:, c])[0] for c in range(probs.shape[1])])


def masked_ap(probs, labels, task="multilabel"):
    """Per-class average precision (C,), same masking as masked_auc."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = _as_multilabel(labels, probs.shape[1], task)
    return np.array([_one_class_stats(labels[:, c], probs[:, c])[1] for c in range(probs.shape[1])])


def _nanmean(x):
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def classification_metrics(probs, labels, classes, task):
    """The per-eval metrics train.py logs. probs: (N, C) sigmoid (multilabel) or softmax (multiclass).
    Returns {"auc_macro", "auc": {cls: v}, "ap_macro", "ap": {cls: v}} (+ "acc", "balanced_acc",
    "f1_macro" for multiclass). A class without both label values gets NaN and is left out of the macro."""
    probs = np.asarray(probs, dtype=np.float64)
    assert probs.ndim == 2 and probs.shape[1] == len(classes), \
        f"classification_metrics: probs {probs.shape} vs {len(classes)} classes"
    onehot = _as_multilabel(labels, len(classes), task)
    auc, ap = [], []
    for c in range(len(classes)):
        a, b = _one_class_stats(onehot[:, c], probs[:, c])
        auc.append(a)
        ap.append(b)
    out = {"auc_macro": _nanmean(auc), "auc": dict(zip(classes, auc)),
           "ap_macro": _nanmean(ap), "ap": dict(zip(classes, ap))}
    if task == "multiclass":
        y = np.asarray(labels, dtype=np.int64)
        pred = probs.argmax(1)
        recall, _, f1 = _per_class_prf(y, pred, len(classes))
        present = np.bincount(y, minlength=len(classes)) > 0
        out["acc"] = float((pred == y).mean()) if y.size else float("nan")
        out["balanced_acc"] = float(recall[present].mean()) if present.any() else float("nan")
        out["f1_macro"] = float(f1[present].mean()) if present.any() else float("nan")
    return out


def _per_class_prf(y, pred, num_classes):
    """Recall, precision, F1 per class from integer labels and predictions (0 where undefined)."""
    cm = confusion_matrix(y, pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return recall, precision, f1


def confusion_matrix(y, pred, num_classes):
    """(C, C) counts, rows = true class, columns = predicted class."""
    return np.bincount(np.asarray(y) * num_classes + np.asarray(pred), minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


# -----------------------------------------------------------------------------
# fast AUC (midranks: equal to sklearn, ties included) for the bootstrap and DeLong


def fast_auc(y, p):
    """ROC AUC of binary y (0/1, no NaN) via the Mann-Whitney statistic on midranks; NaN if one class only."""
    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = stats.rankdata(p)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_indices(groups, n_bootstrap, seed):
    """Yield index arrays of bootstrap resamples that draw whole groups (patients) with replacement.
    Resample b draws G group ids with rng.integers(0, G, G) (rng = default_rng(seed)) and takes every
    sample of each drawn group as many times as it was drawn: the cluster bootstrap, so several images
    of one patient do not count as independent evidence."""
    _, gid = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    gid = gid.reshape(-1)
    G = int(gid.max()) + 1 if gid.size else 0
    rng = np.random.default_rng(seed)
    rows = np.arange(gid.size)
    for _ in range(n_bootstrap):
        counts = np.bincount(rng.integers(0, G, G), minlength=G)
        yield np.repeat(rows, counts[gid])


def bootstrap_ci(probs, labels, groups, n_bootstrap=1000, seed=0, alpha=0.05, task="multilabel"):
    """Percentile CI of each class's AUC and of the macro AUC, resampling groups (patients).
    Returns (lo (C,), hi (C,), macro_lo, macro_hi). A resample where a class has one label value is
    skipped for that class (and the class left out of that resample's macro)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = _as_multilabel(labels, probs.shape[1], task)
    C = probs.shape[1]
    boot = np.full((n_bootstrap, C), np.nan)
    for b, idx in enumerate(bootstrap_indices(groups, n_bootstrap, seed)):
        for c in range(C):
            y = labels[idx, c]
            known = ~np.isnan(y)
            boot[b, c] = fast_auc(y[known], probs[idx, c][known])
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    lo, hi = np.full(C, np.nan), np.full(C, np.nan)
    for c in range(C):
        v = boot[:, c][~np.isnan(boot[:, c])]
        if v.size:
            lo[c], hi[c] = np.percentile(v, q)
    macro = np.array([_nanmean(row) for row in boot])
    macro = macro[~np.isnan(macro)]
    mlo, mhi = np.percentile(macro, q) if macro.size else (float("nan"), float("nan"))
    return lo, hi, float(mlo), float(mhi)


# -----------------------------------------------------------------------------
# DeLong's test for two correlated ROC AUCs on the same cases (fast midrank algorithm, Sun & Xu 2014)


def _midrank(x):
    """Midranks (1-based, ties averaged), as in Sun & Xu 2014 Algorithm 1."""
    return stats.rankdata(x, method="average")


def delong_auc_cov(y, scores):
    """y: (N,) 0/1; scores: (K, N) for K models. Returns (aucs (K,), cov (K, K)) by DeLong et al. 1988,
    computed with midranks in O(K N log N) (Sun & Xu 2014, IEEE SPL 21(11))."""
    y = np.asarray(y).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    assert m > 0 and n > 0, "delong_auc_cov needs both positive and negative cases"
    K = scores.shape[0]
    tx = np.stack([_midrank(pos[k]) for k in range(K)])   # ranks among positives
    ty = np.stack([_midrank(neg[k]) for k in range(K)])   # ranks among negatives
    tz = np.stack([_midrank(np.concatenate([pos[k], neg[k]])) for k in range(K)])
    aucs = tz[:, :m].sum(1) / (m * n) - (m + 1) / (2 * n)
    v01 = (tz[:, :m] - tx) / n          # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m    # ... and of the negatives
    sx = np.atleast_2d(np.cov(v01))
    sy = np.atleast_2d(np.cov(v10))
    return aucs, sx / m + sy / n


def delong_test(y, p1, p2):
    """Two-sided DeLong test that two models' AUCs on the same cases are equal.
    Returns dict(auc1, auc2, diff, se, z, p)."""
    aucs, cov = delong_auc_cov(y, np.stack([p1, p2]))
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    if var <= 0:  # identical rankings: no evidence of a difference
        return {"auc1": float(aucs[0]), "auc2": float(aucs[1]), "diff": diff, "se": 0.0, "z": 0.0, "p": 1.0}
    z = diff / math.sqrt(var)
    return {"auc1": float(aucs[0]), "auc2": float(aucs[1]), "diff": diff, "se": math.sqrt(var),
            "z": float(z), "p": float(2 * stats.norm.sf(abs(z)))}


# -----------------------------------------------------------------------------
# operating points and calibration


def youden_threshold(y, p):
    """The threshold maximising Youden's J = sensitivity + specificity - 1 (predict positive when p >= t)."""
    fpr, tpr, thr = roc_curve(y, p)
    j = tpr - fpr
    t = thr[int(np.argmax(j))]
    return float(min(t, 1.0)) if np.isfinite(t) else 1.0


def sensitivity_threshold(y, p, target):
    """The highest threshold whose sensitivity is >= target (predict positive when p >= t)."""
    fpr, tpr, thr = roc_curve(y, p)
    ok = np.nonzero(tpr >= target)[0]
    t = thr[ok[0]] if ok.size else thr[-1]
    return float(min(t, 1.0)) if np.isfinite(t) else 1.0


def f1_threshold(y, p):
    """The threshold maximising F1 of (p >= t) over every distinct score (exact, from the precision-recall curve)."""
    prec, rec, thr = precision_recall_curve(y, p)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    return float(thr[int(np.argmax(f1))])


def binary_at_threshold(y, p, t):
    """Sensitivity, specificity, PPV, F1 of (p >= t) against binary y."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= t
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    ppv = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"sensitivity": sens, "specificity": spec, "ppv": ppv, "f1": f1}


def calibration(probs, labels, n_bins=15, task="multilabel"):
    """Expected calibration error and a reliability table over equal-width bins.
    Multilabel: every known (image, class) probability is one prediction. Multiclass: the top-1
    confidence against top-1 correctness (Guo et al. 2017). ECE = sum_b n_b/N |frac_pos_b - mean_pred_b|."""
    probs = np.asarray(probs, dtype=np.float64)
    if task == "multiclass":
        y = np.asarray(labels, dtype=np.int64)
        conf = probs.max(1)
        hit = (probs.argmax(1) == y).astype(np.float64)
    else:
        lab = np.asarray(labels, dtype=np.float64)
        known = ~np.isnan(lab)
        conf, hit = probs[known], lab[known]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    table, ece = [], 0.0
    for i in range(n_bins):
        sel = b == i
        n = int(sel.sum())
        mp = float(conf[sel].mean()) if n else float("nan")
        fp = float(hit[sel].mean()) if n else float("nan")
        if n:
            ece += n / conf.size * abs(fp - mp)
        table.append({"lo": float(edges[i]), "hi": float(edges[i + 1]), "n": n, "mean_pred": mp, "frac_pos": fp})
    return float(ece) if conf.size else float("nan"), table

# -----------------------------------------------------------------------------
# the full report on one set of predictions


def _groups_from_index(index, n):
    """Patient ids for the cluster bootstrap; an image without a patient id is its own patient."""
    if not index:
        return np.arange(n).astype(str)
    return np.array([r.get("patient_id") or f"_row{i}" for i, r in enumerate(index)])


def choose_thresholds(val_probs, val_labels, rule="youden", target=0.9):
    """One threshold per class on validation predictions (multilabel); 0.5 where a class cannot be scored."""
    out = []
    for c in range(val_probs.shape[1]):
        y = val_labels[:, c]
        known = ~np.isnan(y)
        y, p = y[known], val_probs[known, c]
        if y.size == 0 or y.min() == y.max():
            out.append(0.5)
        elif rule == "youden":
            out.append(youden_threshold(y, p))
        elif rule == "sensitivity":
            out.append(sensitivity_threshold(y, p, target))
        elif rule == "f1":
            out.append(f1_threshold(y, p))
        else:
            raise ValueError(f"threshold must be 'youden', 'sensitivity' or 'f1', got {rule!r}")
    return np.array(out)


def evaluation_report(probs, labels, classes, task, groups, thresholds=None, n_bootstrap=1000, seed=0, n_bins=15):
    """Everything evaluate.py prints for one split, as a dict of plain types (NaN -> None when saved)."""
    probs = np.asarray(probs, dtype=np.float64)
    C = len(classes)
    onehot = _as_multilabel(labels, C, task)
    rep = classification_metrics(probs, labels, classes, task)
    if n_bootstrap > 0:
        lo, hi, mlo, mhi = bootstrap_ci(probs, labels, groups, n_bootstrap, seed, task=task)
    else:
        lo = hi = np.full(C, np.nan)
        mlo = mhi = float("nan")
    if task == "multiclass":
        pred = probs.argmax(1)
        decisions = np.eye(C, dtype=bool)[pred]  # operating point = the argmax
    else:
        thresholds = np.full(C, 0.5) if thresholds is None else np.asarray(thresholds)
        decisions = probs >= thresholds[None, :]
    per_class, tp_all, fp_all, fn_all, tn_all = {}, 0, 0, 0, 0
    for c, name in enumerate(classes):
        y = onehot[:, c]
        known = ~np.isnan(y)
        yk, dk = y[known].astype(bool), decisions[known, c]
        tp, fp = int((dk & yk).sum()), int((dk & ~yk).sum())
        fn, tn = int((~dk & yk).sum()), int((~dk & ~yk).sum())
        tp_all, fp_all, fn_all, tn_all = tp_all + tp, fp_all + fp, fn_all + fn, tn_all + tn
        per_class[name] = {
            "n_pos": int(yk.sum()), "n_neg": int((~yk).sum()), "auc": rep["auc"][name],
            "auc_ci": [float(lo[c]), float(hi[c])], "ap": rep["ap"][name],
            "threshold": None if task == "multiclass" else float(thresholds[c]),
            "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan"),
            "ppv": tp / (tp + fp) if tp + fp else float("nan"),
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
        }
    known = ~np.isnan(onehot)
    yk, pk = onehot[known], probs[known]
    auc_micro = fast_auc(yk, pk) if yk.size else float("nan")
    ap_micro = float(average_precision_score(yk, pk)) if 0 < yk.sum() < yk.size else float("nan")
    scored = [n for n in classes if per_class[n]["auc"] == per_class[n]["auc"]]  # classes with an AUC
    macro = lambda key: _nanmean([per_class[n][key] for n in scored])
    out = {
        "task": task, "classes": list(classes), "n_images": int(probs.shape[0]),
        "n_patients": int(np.unique(np.asarray(groups).astype(str)).size),
        "per_class": per_class, "auc": rep["auc"], "ap": rep["ap"],
        "auc_macro": rep["auc_macro"], "auc_macro_ci": [mlo, mhi], "ap_macro": rep["ap_macro"],
        "auc_micro": auc_micro, "ap_micro": ap_micro,
        "sensitivity_macro": macro("sensitivity"), "specificity_macro": macro("specificity"),
        "f1_macro": rep.get("f1_macro", macro("f1")),
        "sensitivity_micro": tp_all / (tp_all + fn_all) if tp_all + fn_all else float("nan"),
        "specificity_micro": tn_all / (tn_all + fp_all) if tn_all + fp_all else float("nan"),
        "f1_micro": 2 * tp_all / (2 * tp_all + fp_all + fn_all) if tp_all + fp_all + fn_all else float("nan"),
        "excluded_from_macro": [n for n in classes if n not in scored],
        "n_bootstrap": n_bootstrap, "bootstrap_seed": seed,
    }
    if task == "multiclass":
        out["acc"], out["balanced_acc"] = rep["acc"], rep["balanced_acc"]
        out["confusion_matrix"] = confusion_matrix(np.asarray(labels, dtype=np.int64), probs.argmax(1), C).tolist()
    out["ece"], out["reliability"] = calibration(probs, labels, n_bins, task)
    return out


def format_report(rep):
    """The printed table: one line per class, then macro and micro."""
    f = lambda v: "  -  " if v is None or v != v else f"{v:.3f}"
    lines = [f"{'class':<20} {'n_pos':>6} {'n_neg':>6}  {'AUC':>5} {'[95% CI]':>15}  {'AP':>5}  {'thr':>5} "
             f"{'sens':>5} {'spec':>5} {'F1':>5}"]
    for name, r in rep["per_class"].items():
        ci = f"[{f(r['auc_ci'][0])}, {f(r['auc_ci'][1])}]"
        lines.append(f"{name[:20]:<20} {r['n_pos']:>6} {r['n_neg']:>6}  {f(r['auc'])} {ci:>15}  {f(r['ap'])}  "
                     f"{f(r['threshold'])} {f(r['sensitivity'])} {f(r['specificity'])} {f(r['f1'])}")
    ci = f"[{f(rep['auc_macro_ci'][0])}, {f(rep['auc_macro_ci'][1])}]"
    lines.append(f"{'macro':<20} {'':>6} {'':>6}  {f(rep['auc_macro'])} {ci:>15}  {f(rep['ap_macro'])}  {'':>5} "
                 f"{f(rep['sensitivity_macro'])} {f(rep['specificity_macro'])} {f(rep['f1_macro'])}")
    lines.append(f"{'micro':<20} {'':>6} {'':>6}  {f(rep['auc_micro'])} {'':>15}  {f(rep['ap_micro'])}  {'':>5} "
                 f"{f(rep['sensitivity_micro'])} {f(rep['specificity_micro'])} {f(rep['f1_micro'])}")
    if rep["task"] == "multiclass":
        lines.append(f"accuracy {f(rep['acc'])} | balanced accuracy {f(rep['balanced_acc'])}")
        lines.append("confusion matrix (rows = true, columns = predicted):")
        lines += ["  " + " ".join(f"{v:>6d}" for v in row) for row in rep["confusion_matrix"]]
    lines.append(f"calibration: ECE {f(rep['ece'])} over {len(rep['reliability'])} bins")
    if rep["excluded_from_macro"]:
        lines.append(f"not scored (one label value only), left out of the macro: {', '.join(rep['excluded_from_macro'])}")
    return "\n".join(lines)


def to_json(obj):
    """NaN/inf -> None and numpy -> Python, so the file is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# -----------------------------------------------------------------------------
# model + data: load the checkpoint, run inference (optionally with TTA)


def load_model(ckpt_path, which="model", device="cpu"):
    import model as models
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path} not found: train one first (python train.py ...) "
                                f"or point --ckpt at out/<run>/best.pt")
    import common
    ck = common.load_checkpoint(ckpt_path, reader="evaluate.py")
    net = models.build_model(**ck["model_args"])
    if which == "ema":
        if ck.get("ema") is None:
            raise ValueError(f"weights='ema' but {ckpt_path} has no EMA weights (trained with ema_decay=0): use --weights=model")
        sd = net.state_dict()
        net.load_state_dict({k: v.to(sd[k].dtype) for k, v in ck["ema"].items()})
    elif which == "model":
        net.load_state_dict(ck["model"])
    else:
        raise ValueError(f"weights must be 'model' or 'ema', got {which!r}")
    net.to(device).eval()
    return net, ck


def _activation(logits, task):
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)


def _input(x_u8, ck, image_size):
    """uint8 (B,1,H,W) -> the normalised float input the model was trained on, resized if the data differ."""
    import data
    meta, in_chans = ck["meta"], ck["model_args"].get("in_chans", 1)
    x = data.to_float(x_u8, meta["mean"], meta["std"], in_chans, meta.get("imagenet_norm", False))
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def predict(net, images, ck, batch_size=64, tta=0, tta_seed=0, device="cpu"):
    """Probabilities (N, C) for uint8 images (N, H, W). TTA: mean of the plain view and `tta` views from
    data.augment with a generator seeded per batch, so the result does not depend on anything else."""
    import data
    task, image_size = ck["meta"]["task"], ck["model_args"].get("image_size", images.shape[-1])
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i:i + batch_size]))[:, None].to(device)
        x = _input(x, ck, image_size)
        p = _activation(net(x).float(), task)
        if tta > 0:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(tta_seed * 1_000_003 + i)
            for _ in range(tta):
                p += _activation(net(data.augment(x, gen)).float(), task)
            p /= tta + 1
        out.append(p.cpu().numpy())
    C = len(ck["meta"]["classes"])
    return np.concatenate(out) if out else np.zeros((0, C), np.float32)


def align_classes(model_classes, data_classes, task, probs, labels):
    """Restrict to the classes both the model and the data set know. Returns (classes, probs, labels, keep
    rows, dropped_model, dropped_data). Multiclass: rows of a class the model never saw are dropped and the
    probabilities renormalised over the shared classes."""
    shared = [c for c in model_classes if c in data_classes]
    if not shared:
        raise ValueError(f"the model's classes {model_classes} and the data set's {data_classes} have nothing in common")
    mcol = [model_classes.index(c) for c in shared]
    dcol = [data_classes.index(c) for c in shared]
    dropped_m = [c for c in model_classes if c not in shared]
    dropped_d = [c for c in data_classes if c not in shared]
    probs = probs[:, mcol]
    keep = np.arange(len(labels))
    if task == "multilabel":
        labels = np.asarray(labels, dtype=np.float32)[:, dcol]
    else:
        remap = np.full(len(data_classes), -1)
        remap[dcol] = np.arange(len(shared))
        y = remap[np.asarray(labels, dtype=np.int64)]
        keep = np.nonzero(y >= 0)[0]
        labels, probs = y[keep], probs[keep]
        if dropped_m:
            probs = probs / np.clip(probs.sum(1, keepdims=True), 1e-12, None)
    return shared, probs, labels, keep, dropped_m, dropped_d


# -----------------------------------------------------------------------------
# files: predictions CSV, CheXpert submission CSV, figures, TensorBoard

_SKIP_INDEX = ("text", "indication")  # free text does not belong in a predictions table


def write_predictions(path, index, rows, classes, probs, labels, task):
    cols = [k for k in (index[0].keys() if index else ["row"]) if k not in _SKIP_INDEX]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if task == "multilabel":
            w.writerow(cols + [f"true_{c}" for c in classes] + list(classes))
        else:
            w.writerow(cols + ["label", "pred"] + list(classes))
        for j, i in enumerate(rows):
            base = [index[i].get(k, "") for k in cols] if index else [i]
            if task == "multilabel":
                truth = ["" if v != v else int(v) for v in labels[j]]
            else:
                truth = [classes[int(labels[j])], classes[int(probs[j].argmax())]]
            w.writerow(base + truth + [f"{v:.6f}" for v in probs[j]])


def read_predictions(path):
    """predictions_<tag>.csv -> (rows (N,), classes, probs (N,C), labels (N,C) float NaN-masked or (N,) int, task)."""
    with open(path, newline="") as f:
        r = list(csv.DictReader(f))
    header = list(r[0].keys()) if r else []
    if "label" in header and "pred" in header:
        classes = header[header.index("pred") + 1:]
        labels = np.array([classes.index(x["label"]) for x in r], dtype=np.int64)
        task = "multiclass"
    else:
        classes = [h[5:] for h in header if h.startswith("true_")]
        labels = np.array([[float(x[f"true_{c}"]) if x[f"true_{c}"] != "" else np.nan for c in classes] for x in r])
        task = "multilabel"
    probs = np.array([[float(x[c]) for c in classes] for x in r])
    rows = np.array([int(x["row"]) for x in r]) if "row" in header else np.arange(len(r))
    return rows, classes, probs, labels, task


def write_chexpert_submission(path, index, rows, classes, probs):
    """The CheXpert challenge layout: Study, then the 5 competition columns, max over the study's views.
    Study = the image path up to its study folder (.../patient64541/study1)."""
    cols = [classes.index(c) for c in CHEXPERT_COMPETITION]
    studies = {}
    for j, i in enumerate(rows):
        study = os.path.dirname(index[i]["path"])
        studies[study] = np.maximum(studies[study], probs[j, cols]) if study in studies else probs[j, cols]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Study"] + CHEXPERT_COMPETITION)
        for study, p in studies.items():
            w.writerow([study] + [f"{v:.6f}" for v in p])
    return len(studies)


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def make_figures(probs, labels, classes, task, rep):
    """dict name -> matplotlib Figure: roc, pr, reliability, confusion (multiclass). {} without matplotlib."""
    plt = _plt()
    if plt is None:
        return {}
    onehot = _as_multilabel(labels, len(classes), task)
    C = len(classes)
    cols = min(C, 5)
    rows = math.ceil(C / cols)
    figs = {}
    for kind in ("roc", "pr"):
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for c, name in enumerate(classes):
            ax = axes[c // cols][c % cols]
            y = onehot[:, c]
            known = ~np.isnan(y)
            ax.set_title(name, fontsize=9)
            if rep["per_class"][name]["auc"] is None or rep["per_class"][name]["auc"] != rep["per_class"][name]["auc"]:
                ax.text(0.5, 0.5, "one label value", ha="center")
                continue
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y[known], probs[known, c])
                ax.plot(fpr, tpr, label=f"AUC {rep['auc'][name]:.3f}")
                ax.plot([0, 1], [0, 1], "k:", lw=0.8)
                r = rep["per_class"][name]
                if r["threshold"] is not None:
                    ax.plot(1 - r["specificity"], r["sensitivity"], "o", ms=4, label="operating point")
                ax.set_xlabel("1 - specificity", fontsize=8)
                ax.set_ylabel("sensitivity", fontsize=8)
            else:
                prec, rec, _ = precision_recall_curve(y[known], probs[known, c])
                ax.plot(rec, prec, label=f"AP {rep['ap'][name]:.3f}")
                ax.axhline(y[known].mean(), color="k", ls=":", lw=0.8)
                ax.set_xlabel("recall", fontsize=8)
                ax.set_ylabel("precision", fontsize=8)
            ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
        for c in range(C, rows * cols):
            axes[c // cols][c % cols].axis("off")
        fig.tight_layout()
        figs[kind] = fig
    fig, ax = plt.subplots(figsize=(4, 4))
    tab = [b for b in rep["reliability"] if b["n"] > 0]
    ax.bar([(b["lo"] + b["hi"]) / 2 for b in tab], [b["frac_pos"] for b in tab],
           width=[b["hi"] - b["lo"] for b in tab], edgecolor="k", alpha=0.7)
    ax.plot([0, 1], [0, 1], "k:")
    ax.set_xlabel("predicted probability" if task == "multilabel" else "top-1 confidence")
    ax.set_ylabel("observed frequency" if task == "multilabel" else "accuracy")
    ax.set_title(f"reliability (ECE {rep['ece']:.3f})")
    fig.tight_layout()
    figs["reliability"] = fig
    if task == "multiclass":
        cm = np.array(rep["confusion_matrix"])
        fig, ax = plt.subplots(figsize=(1 + 0.6 * C, 1 + 0.6 * C))
        ax.imshow(cm, cmap="Blues")
        for i in range(C):
            for j in range(C):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(C), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(C), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.tight_layout()
        figs["confusion"] = fig
    return figs


def _tb_writer(out_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed (pip install tensorboard): no TensorBoard curves")
        return None
    return SummaryWriter(os.path.join(out_dir, "tb_eval"))


def _safe(name):
    return "".join(ch if ch.isalnum() else "_" for ch in name)


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)
    if not cfg["ckpt"]:
        raise ValueError("--ckpt is required, e.g. python evaluate.py --ckpt=out/quickstart/best.pt --split=test")
    if cfg["image"] and not os.path.isfile(cfg["image"]):
        raise FileNotFoundError(f"--image={cfg['image']!r} not found: pass the path of a PNG/JPEG/DICOM file")
    import common
    dev = common.resolve_device(cfg["device"])
    net, ck = load_model(cfg["ckpt"], cfg["weights"], dev)
    meta_ck = ck["meta"]
    task, model_classes = meta_ck["task"], list(meta_ck["classes"])
    out_dir = cfg["out_dir"] or os.path.dirname(os.path.abspath(cfg["ckpt"]))
    os.makedirs(out_dir, exist_ok=True)
    if cfg["image"]:
        return _one_image(cfg, net, ck, out_dir, dev)
    return _evaluate_split(cfg, net, ck, out_dir, dev)


def _one_image(cfg, net, ck, out_dir, dev):
    from cam import find_cam_target, heatmaps, load_image, overlay, save_cam_png  # cam imports evaluate: not at the top
    size = ck["model_args"].get("image_size", 224)
    u8 = load_image(cfg["image"], size)
    probs = predict(net, u8[None], ck, 1, cfg["tta"], cfg["tta_seed"], dev)[0]
    classes = ck["meta"]["classes"]
    order = np.argsort(-probs)
    print(f"{cfg['image']} ({ck['model_args']['model']}, {ck['meta']['task']}):")
    for c in order:
        print(f"  {classes[c]:<24} {probs[c]:.4f}")
    cam_dir = os.path.join(out_dir, "cam_image")
    os.makedirs(cam_dir, exist_ok=True)
    x = _input(torch.from_numpy(u8)[None, None].to(dev), ck, size)
    method, target = find_cam_target(net, x)
    top = order[:min(3, len(classes))]
    maps = heatmaps(net, x.expand(len(top), -1, -1, -1), top.tolist(), method, target)
    stem = os.path.splitext(os.path.basename(cfg["image"]))[0]
    paths = []
    for k, c in enumerate(top):
        p = os.path.join(cam_dir, f"{_safe(stem)}_{_safe(classes[c])}.png")
        save_cam_png(p, overlay(u8, maps[k]), method, classes[c], float(probs[c]), os.path.basename(cfg["image"]))
        paths.append(p)
    print(f"heatmaps ({method}) for the top {len(top)} classes: {', '.join(paths)}")
    return {"classes": classes, "probs": probs.tolist(), "method": method, "heatmaps": paths}


def _evaluate_split(cfg, net, ck, out_dir, dev):
    import data
    from cam import write_cams
    meta_ck = ck["meta"]
    task, model_classes = meta_ck["task"], list(meta_ck["classes"])
    own_dir = meta_ck.get("data_dir", "")
    data_dir = cfg["data_dir"] or own_dir
    external = os.path.normpath(data_dir) != os.path.normpath(own_dir)
    meta = data.load_meta(data_dir)
    if meta["task"] != task:
        raise ValueError(f"{data_dir} is {meta['task']} but the model in {cfg['ckpt']} is {task}")
    split = data.PreparedSplit(data_dir, cfg["split"])
    tag = f"{_safe(os.path.basename(os.path.normpath(data_dir)))}_{cfg['split']}" if external else cfg["split"]
    t0 = time.time()
    probs_all = predict(net, split.images, ck, cfg["batch_size"], cfg["tta"], cfg["tta_seed"], dev)
    classes, probs, labels, rows, dropped_m, dropped_d = align_classes(
        model_classes, list(meta["classes"]), task, probs_all, np.asarray(split.labels))
    model_cols = [model_classes.index(c) for c in classes]
    print(f"{cfg['ckpt']} on {data_dir} {cfg['split']}: {len(rows)} images, {len(classes)} classes, "
          f"{'TTA x' + str(cfg['tta']) if cfg['tta'] else 'no TTA'}, inference {time.time() - t0:.1f} s")
    if dropped_m or dropped_d:
        print(f"classes evaluated: the {len(classes)} shared by model and data | dropped (model only): "
              f"{dropped_m or '-'} | dropped (data only): {dropped_d or '-'}")

    # thresholds on the model's own validation split (the operating point must not be tuned on the test set)
    thresholds, thr_source = None, "argmax" if task == "multiclass" else "none (0.5)"
    if task == "multilabel":
        val_dir = own_dir if os.path.exists(os.path.join(own_dir, "meta.json")) else data_dir
        if cfg["split"] == "val" and os.path.normpath(val_dir) == os.path.normpath(data_dir):
            vp, vl = probs_all, np.asarray(split.labels, dtype=np.float32)
        else:
            vs = data.PreparedSplit(val_dir, "val")
            vp = predict(net, vs.images, ck, cfg["batch_size"], cfg["tta"], cfg["tta_seed"], dev)
            vl = np.asarray(vs.labels, dtype=np.float32)
        vclasses = list(data.load_meta(val_dir)["classes"])
        _, vp, vl, _, _, _ = align_classes(model_classes, vclasses, task, vp, vl)
        vshared = [c for c in model_classes if c in vclasses]
        thr = choose_thresholds(vp, vl, cfg["threshold"], cfg["target_sensitivity"])
        thresholds = np.array([thr[vshared.index(c)] if c in vshared else 0.5 for c in classes])
        thr_source = f"{val_dir} val, {cfg['threshold']}" + (
            f" (sensitivity >= {cfg['target_sensitivity']})" if cfg["threshold"] == "sensitivity" else "")

    index = split.index
    groups = _groups_from_index([index[i] for i in rows] if index else [], len(rows))
    rep = evaluation_report(probs, labels, classes, task, groups, thresholds, cfg["n_bootstrap"],
                            cfg["bootstrap_seed"], cfg["n_bins"])
    rep.update({"ckpt": cfg["ckpt"], "split": cfg["split"], "data_dir": data_dir, "weights": cfg["weights"],
                "model": ck["model_args"].get("model"), "iter": ck.get("iter"), "tta": cfg["tta"],
                "threshold_source": thr_source, "dropped_model_classes": dropped_m, "dropped_data_classes": dropped_d})
    print(format_report(rep))
    print(f"thresholds: {thr_source} | AUC CI: {cfg['n_bootstrap']} bootstrap resamples of "
          f"{rep['n_patients']} patients (seed {cfg['bootstrap_seed']})")

    pred_path = os.path.join(out_dir, f"predictions_{tag}.csv")
    write_predictions(pred_path, index, rows, classes, probs, labels, task)
    rep["predictions"] = os.path.basename(pred_path)
    written = [pred_path]
    name = f"{meta.get('name', '')} {meta.get('source', '')}".lower()
    if "chexpert" in name and task == "multilabel" and all(c in classes for c in CHEXPERT_COMPETITION):
        sub = os.path.join(out_dir, f"submission_{tag}.csv")
        n_studies = write_chexpert_submission(sub, index, rows, classes, probs)
        written.append(f"{sub} ({n_studies} studies)")

    tb = _tb_writer(out_dir) if cfg["tensorboard"] else None
    if cfg["figures"] or tb is not None:
        figs = make_figures(probs, labels, classes, task, rep)
        if not figs:
            print("matplotlib is not installed (pip install matplotlib): no PNG figures; the json has every number")
        for kind, fig in figs.items():
            if cfg["figures"]:
                p = os.path.join(out_dir, f"{tag}_{kind}.png")
                fig.savefig(p, dpi=100)
                written.append(p)
            if tb is not None:
                tb.add_figure(f"{tag}/{kind}", fig, 0)
    if tb is not None:
        onehot = _as_multilabel(labels, len(classes), task)
        for c, cname in enumerate(classes):
            known = ~np.isnan(onehot[:, c])
            if known.any():
                tb.add_pr_curve(f"{tag}/pr/{cname}", onehot[known, c].astype(bool), probs[known, c], 0)
            tb.add_scalar(f"{tag}/auc/{cname}", rep["auc"][cname] if rep["auc"][cname] == rep["auc"][cname] else 0.0, 0)

    if cfg["cam"] > 0:
        images = split.images[rows] if len(rows) != len(split.images) else split.images
        cam_dir = os.path.join(out_dir, f"cam_{tag}")
        method, n_cam = write_cams(net, ck, images, probs, labels, classes, model_cols, cfg["cam"], cam_dir, tb, dev)
        rep["cam"] = {"method": method, "dir": cam_dir, "n": n_cam}
        written.append(f"{cam_dir}/ ({n_cam} heatmaps, {method})")
    if tb is not None:
        tb.close()

    json_path = os.path.join(out_dir, f"eval_{tag}.json")
    with open(json_path, "w") as f:
        json.dump(to_json(rep), f, indent=1)
    print("wrote " + ", ".join([json_path] + written))
    return rep


if __name__ == "__main__":
    configurator.cli(main)
