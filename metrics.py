"""
The statistics of nanorad, as plain functions on arrays: every command that scores predictions imports them
(train.py's per-eval record, evaluate.py's test report, compare.py's p-values, export.py's metric, train_gpt.py's
thresholds). Arrays: probs (N, C); labels (N, C) float with NaN = unknown (multi-label) or (N,) int (multi-class).

    classification_metrics   the per-eval record: AUC / AP per class and macro, auc_comp5 (CheXpert), precision /
                             recall / F1 at 0.5 per class, macro and micro F1, exact-match and element-wise accuracy
    eval_labels              raw CheXpert codes (1 / 0 / -1 / blank) -> the labels a model is scored on
    bootstrap_ci             percentile CIs that resample patients (cluster bootstrap)
    delong_test              two correlated AUCs on the same cases (DeLong 1988, Sun & Xu 2014)
    choose_thresholds        per-class operating points on validation (Youden, sensitivity, F1)
    calibration              ECE + reliability table (Guo et al. 2017)
    evaluation_report        everything evaluate.py prints for one split; format_report, to_json
    write_predictions, read_predictions, write_chexpert_submission, make_figures (matplotlib)

Every number equals scikit-learn's on the same arrays (tests/test_evaluate.py).
"""

import csv
import math
import os

import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

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


def as_multilabel(labels, num_classes, task):
    """Multiclass int labels -> one-vs-rest float (N, C) so both tasks share the per-class code."""
    if task == "multiclass":
        labels = np.asarray(labels, dtype=np.int64)
        return np.eye(num_classes, dtype=np.float32)[labels]
    return np.asarray(labels, dtype=np.float64)


def masked_auc(probs, labels, task="multilabel"):
    """Per-class ROC AUC (C,), NaN labels masked, NaN for a class with one label value."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = as_multilabel(labels, probs.shape[1], task)
    return np.array([_one_class_stats(labels[:, c], probs[:, c])[0] for c in range(probs.shape[1])])


def masked_ap(probs, labels, task="multilabel"):
    """Per-class average precision (C,), same masking as masked_auc."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = as_multilabel(labels, probs.shape[1], task)
    return np.array([_one_class_stats(labels[:, c], probs[:, c])[1] for c in range(probs.shape[1])])


def _nanmean(x):
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def classification_metrics(probs, labels, classes, task):
    """The per-eval metrics train.py logs. probs: (N, C) sigmoid (multilabel) or softmax (multiclass).
    Returns {"auc_macro", "auc": {cls: v}, "ap_macro", "ap": {cls: v}}, "auc_comp5" when the classes include the 5
    CheXpert competition tasks, and the decisions at 0.5 (multi-label) or the argmax (multi-class): "precision",
    "recall", "f1" ({cls: v}), "f1_macro", "f1_micro", and "exact_match" + "acc_elementwise" (multi-label) or
    "acc" + "balanced_acc" (multi-class). A class without both label values gets a NaN AUC and is left out of the
    macro; precision / recall / F1 are 0 where undefined, as sklearn's (zero_division=0)."""
    probs = np.asarray(probs, dtype=np.float64)
    assert probs.ndim == 2 and probs.shape[1] == len(classes), \
        f"classification_metrics: probs {probs.shape} vs {len(classes)} classes"
    onehot = as_multilabel(labels, len(classes), task)
    auc, ap = [], []
    for c in range(len(classes)):
        a, b = _one_class_stats(onehot[:, c], probs[:, c])
        auc.append(a)
        ap.append(b)
    out = {"auc_macro": _nanmean(auc), "auc": dict(zip(classes, auc)),
           "ap_macro": _nanmean(ap), "ap": dict(zip(classes, ap))}
    comp5 = auc_comp5(out["auc"])
    if comp5 is not None:
        out["auc_comp5"] = comp5
    if task == "multiclass":
        y = np.asarray(labels, dtype=np.int64)
        pred = probs.argmax(1)
        recall, precision, f1 = _per_class_prf(y, pred, len(classes))
        present = np.bincount(y, minlength=len(classes)) > 0
        out["acc"] = float((pred == y).mean()) if y.size else float("nan")
        out["balanced_acc"] = float(recall[present].mean()) if present.any() else float("nan")
        out["f1_macro"] = float(f1[present].mean()) if present.any() else float("nan")
        out["f1_micro"] = out["acc"]  # single-label: micro precision = micro recall = accuracy
        out.update(precision=dict(zip(classes, precision.tolist())), recall=dict(zip(classes, recall.tolist())),
                   f1=dict(zip(classes, f1.tolist())))
    else:
        out.update(multilabel_decisions(onehot, probs >= 0.5, classes))
    return out


def auc_comp5(auc):
    """The CheXpert competition number (Irvin et al. 2019): the mean AUC over Atelectasis, Cardiomegaly,
    Consolidation, Edema and Pleural Effusion; {class: AUC} -> float, None when a class is missing. A task with one
    label value in this split (NaN) is left out of the mean, as in the macro."""
    if not all(c in auc for c in CHEXPERT_COMPETITION):
        return None
    return _nanmean([auc[c] for c in CHEXPERT_COMPETITION])


def multilabel_decisions(onehot, decisions, classes):
    """Precision / recall / F1 per class, macro and micro F1, exact-match and element-wise accuracy of boolean
    decisions (N, C) against labels (N, C) with NaN = unknown. Each class is scored on its known labels; micro
    pools every known cell; exact match counts the images whose known cells are all right (images with no known
    cell are left out). With no NaN the numbers equal sklearn's precision_recall_fscore_support(zero_division=0),
    f1_score(average='micro'/'macro') and accuracy_score."""
    known = ~np.isnan(onehot)
    y = np.where(known, onehot, 0).astype(bool)
    d = np.asarray(decisions, dtype=bool)
    tp = (d & y & known).sum(0).astype(np.float64)
    fp = (d & ~y & known).sum(0).astype(np.float64)
    fn = (~d & y & known).sum(0).astype(np.float64)
    div = lambda a, b: np.divide(a, b, out=np.zeros_like(a), where=b > 0)  # noqa: E731
    precision, recall, f1 = div(tp, tp + fp), div(tp, tp + fn), div(2 * tp, 2 * tp + fp + fn)
    scored = known.any(0)  # a class with no known label in this split has no precision / recall / F1
    nan_unscored = lambda v: np.where(scored, v, np.nan)  # noqa: E731
    T, P, N = tp.sum(), fp.sum(), fn.sum()
    right = (d == y) | ~known
    rows = known.any(1)
    return {"precision": dict(zip(classes, nan_unscored(precision).tolist())),
            "recall": dict(zip(classes, nan_unscored(recall).tolist())),
            "f1": dict(zip(classes, nan_unscored(f1).tolist())),
            "f1_macro": float(f1[scored].mean()) if scored.any() else float("nan"),
            "f1_micro": float(2 * T / (2 * T + P + N)) if 2 * T + P + N > 0 else 0.0,
            "exact_match": float(right[rows].all(1).mean()) if rows.any() else float("nan"),
            "acc_elementwise": float((d == y)[known].mean()) if known.any() else float("nan")}


def eval_labels(labels, labels_raw=None, mode="mask", blank_policy="ignore"):
    """The labels a multi-label model is scored on. labels: the policy labels training used ({split}_labels.npy);
    labels_raw: the source's codes ({split}_labels_raw.npy: 1 positive, 0 negative, -1 uncertain, NaN blank).
    mode='mask' (the default, what papers report): uncertain cells are unknown (NaN) and blank cells follow
    blank_policy (ignore -> NaN, zeros -> 0, ones -> 1), whatever policy training used for uncertain labels.
    mode='as_policy': the policy labels as they are (for ablations). Without a raw file: the policy labels."""
    if mode not in ("mask", "as_policy"):
        raise ValueError(f"eval_uncertain must be 'mask' or 'as_policy', got {mode!r}")
    if mode == "as_policy" or labels_raw is None:
        return np.asarray(labels, dtype=np.float32)
    raw = np.asarray(labels_raw, dtype=np.float32)
    assert raw.shape == np.shape(labels), f"raw labels {raw.shape} vs policy labels {np.shape(labels)}"
    blank = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}
    if blank_policy not in blank:
        raise ValueError(f"blank_policy must be one of {sorted(blank)}, got {blank_policy!r} (meta.json label_policy)")
    out = raw.copy()
    out[raw == -1] = np.nan
    out[np.isnan(raw)] = blank[blank_policy]
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


def bootstrap_aucs(probs, labels, groups, n_bootstrap=1000, seed=0, task="multilabel"):
    """(n_bootstrap, C) per-class AUCs of the resamples of bootstrap_indices (NaN where a class has one label value
    in a resample); bootstrap_ci's percentiles and the subgroup differences (subgroups.py) are read from it."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = as_multilabel(labels, probs.shape[1], task)
    C = probs.shape[1]
    boot = np.full((n_bootstrap, C), np.nan)
    for b, idx in enumerate(bootstrap_indices(groups, n_bootstrap, seed)):
        for c in range(C):
            y = labels[idx, c]
            known = ~np.isnan(y)
            boot[b, c] = fast_auc(y[known], probs[idx, c][known])
    return boot


def macro_of(boot):
    """The macro (mean over the classes with an AUC) of each row of a (B, C) array: NaN for a row without any."""
    return np.array([_nanmean(row) for row in np.asarray(boot, dtype=np.float64)])


def bootstrap_ci(probs, labels, groups, n_bootstrap=1000, seed=0, alpha=0.05, task="multilabel"):
    """Percentile CI of each class's AUC and of the macro AUC, resampling groups (patients).
    Returns (lo (C,), hi (C,), macro_lo, macro_hi). A resample where a class has one label value is
    skipped for that class (and the class left out of that resample's macro)."""
    return percentile_ci(bootstrap_aucs(probs, labels, groups, n_bootstrap, seed, task), alpha)


def percentile_ci(boot, alpha=0.05):
    """bootstrap_ci's intervals from a (B, C) array of resampled AUCs: (lo (C,), hi (C,), macro_lo, macro_hi)."""
    C = boot.shape[1]
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    lo, hi = np.full(C, np.nan), np.full(C, np.nan)
    for c in range(C):
        v = boot[:, c][~np.isnan(boot[:, c])]
        if v.size:
            lo[c], hi[c] = np.percentile(v, q)
    macro = macro_of(boot)
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


def groups_from_index(index, n):
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


# A bootstrap CI of an AUC on fewer positives, negatives or patients than this is flagged as unreliable: the
# percentile bootstrap's nominal 95% CI covered the true AUC (0.85, binormal) in 54% of 300 simulated test sets with
# 3 positives + 3 negatives, 79% with 5 + 5, 90% with 10 + 10 and 91% with 20 + 20 (96% with 40 + 40).
MIN_CI_COUNT = 20


def ci_warning(n_pos, n_neg, n_patients):
    """'' or the sentence saying which count is under MIN_CI_COUNT, for a bootstrap CI that rests on too few."""
    few = [f"{n} {what}" for n, what in ((n_pos, "positives"), (n_neg, "negatives"), (n_patients, "patients"))
           if n is not None and n < MIN_CI_COUNT]
    return f"only {', '.join(few)} (< {MIN_CI_COUNT}): the CI is unreliable" if few else ""


def evaluation_report(probs, labels, classes, task, groups, thresholds=None, n_bootstrap=1000, seed=0, n_bins=15):
    """Everything evaluate.py prints for one split, as a dict of plain types (NaN -> None when saved)."""
    probs = np.asarray(probs, dtype=np.float64)
    C = len(classes)
    onehot = as_multilabel(labels, C, task)
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
        per_class[name]["precision"], per_class[name]["recall"] = per_class[name]["ppv"], per_class[name]["sensitivity"]
        n_patients = int(np.unique(np.asarray(groups)[known].astype(str)).size) if len(groups) else 0
        per_class[name]["ci_warning"] = ci_warning(tp + fn, tn + fp, n_patients) if n_bootstrap > 0 else ""
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
        "f1_macro": rep["f1_macro"] if task == "multiclass" else macro("f1"),
        "sensitivity_micro": tp_all / (tp_all + fn_all) if tp_all + fn_all else float("nan"),
        "specificity_micro": tn_all / (tn_all + fp_all) if tn_all + fp_all else float("nan"),
        "f1_micro": 2 * tp_all / (2 * tp_all + fp_all + fn_all) if tp_all + fp_all + fn_all else float("nan"),
        "excluded_from_macro": [n for n in classes if n not in scored],
        "n_bootstrap": n_bootstrap, "bootstrap_seed": seed,
    }
    out["auc_macro_ci_warning"] = ci_warning(None, None, out["n_patients"]) if n_bootstrap > 0 else ""
    if "auc_comp5" in rep:
        out["auc_comp5"] = rep["auc_comp5"]
    if task == "multilabel":  # the same decisions' accuracies at the thresholds, and every decision metric at 0.5
        at_thr = multilabel_decisions(onehot, decisions, classes)
        out["exact_match"], out["acc_elementwise"] = at_thr["exact_match"], at_thr["acc_elementwise"]
        out["at_0.5"] = {k: rep[k] for k in ("precision", "recall", "f1", "f1_macro", "f1_micro", "exact_match",
                                             "acc_elementwise")}
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
        ci, mark = f"[{f(r['auc_ci'][0])}, {f(r['auc_ci'][1])}]", "*" if r.get("ci_warning") else " "
        lines.append(f"{name[:20]:<20} {r['n_pos']:>6} {r['n_neg']:>6}  {f(r['auc'])} {ci:>15}{mark} {f(r['ap'])}  "
                     f"{f(r['threshold'])} {f(r['sensitivity'])} {f(r['specificity'])} {f(r['f1'])}")
    ci = f"[{f(rep['auc_macro_ci'][0])}, {f(rep['auc_macro_ci'][1])}]"
    mark = "*" if rep.get("auc_macro_ci_warning") else " "
    lines.append(f"{'macro':<20} {'':>6} {'':>6}  {f(rep['auc_macro'])} {ci:>15}{mark} {f(rep['ap_macro'])}  {'':>5} "
                 f"{f(rep['sensitivity_macro'])} {f(rep['specificity_macro'])} {f(rep['f1_macro'])}")
    lines.append(f"{'micro':<20} {'':>6} {'':>6}  {f(rep['auc_micro'])} {'':>15}  {f(rep['ap_micro'])}  {'':>5} "
                 f"{f(rep['sensitivity_micro'])} {f(rep['specificity_micro'])} {f(rep['f1_micro'])}")
    if rep.get("auc_comp5") is not None:
        lines.append(f"CheXpert competition AUC (mean of {', '.join(CHEXPERT_COMPETITION)}): {f(rep['auc_comp5'])}")
    if rep["task"] == "multilabel":
        a = rep["at_0.5"]
        lines.append(f"at the thresholds: exact match {f(rep['exact_match'])} | element-wise accuracy "
                     f"{f(rep['acc_elementwise'])} || at 0.5: F1 macro {f(a['f1_macro'])} micro {f(a['f1_micro'])} | "
                     f"exact match {f(a['exact_match'])} | element-wise accuracy {f(a['acc_elementwise'])}")
    if rep["task"] == "multiclass":
        lines.append(f"accuracy {f(rep['acc'])} | balanced accuracy {f(rep['balanced_acc'])}")
        lines.append("confusion matrix (rows = true, columns = predicted):")
        lines += ["  " + " ".join(f"{v:>6d}" for v in row) for row in rep["confusion_matrix"]]
    lines.append(f"calibration: ECE {f(rep['ece'])} over {len(rep['reliability'])} bins")
    flagged = [(n, r["ci_warning"]) for n, r in rep["per_class"].items() if r.get("ci_warning")]
    if rep.get("auc_macro_ci_warning"):
        flagged.append(("macro", rep["auc_macro_ci_warning"]))
    if flagged:
        lines.append(f"* small sample: a bootstrap CI on fewer than {MIN_CI_COUNT} positives, negatives or patients "
                     f"covers the true AUC far less often than 95%: " + "; ".join(f"{n}: {w}" for n, w in flagged))
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


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; imported on first use (it adds ~0.5 s to every start)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the figures need matplotlib, a nanorad dependency: pip install -r requirements.txt "
                          "(or pip install matplotlib); --figures=False --tensorboard=False skips them") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def make_figures(probs, labels, classes, task, rep):
    """dict name -> matplotlib Figure: roc, pr, reliability, confusion (multiclass: rows true, columns predicted).
    Each figure's title names the model, the split and n; each ROC / PR panel its class, n_pos and the AUC with its
    CI; PR panels span precision [0, 1] with the prevalence (a chance model's precision) drawn and labelled; the
    reliability figure has one panel per class (multi-label; all predictions together first) with each bin's count."""
    plt = pyplot()
    onehot = as_multilabel(labels, len(classes), task)
    C = len(classes)
    cols = min(C, 5)
    rows = math.ceil(C / cols)
    title = (f"{rep.get('model') or 'model'} | {rep.get('split') or 'split'} | n = {rep['n_images']} images, "
             f"{rep['n_patients']} patients")
    figs = {}
    for kind in ("roc", "pr"):
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.4), squeeze=False)
        for c, name in enumerate(classes):
            ax = axes[c // cols][c % cols]
            y = onehot[:, c]
            known = ~np.isnan(y)
            r = rep["per_class"][name]
            ax.set_title(f"{name} (n_pos {r['n_pos']})", fontsize=9)
            if r["auc"] is None or r["auc"] != r["auc"]:
                ax.text(0.5, 0.5, "one label value", ha="center")
                continue
            lo, hi = r["auc_ci"]
            ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and lo == lo else ""
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y[known], probs[known, c])
                ax.plot(fpr, tpr, label=f"AUC {r['auc']:.3f}{ci}")
                ax.plot([0, 1], [0, 1], "k:", lw=0.8)
                if r["threshold"] is not None:
                    ax.plot(1 - r["specificity"], r["sensitivity"], "o", ms=4, label="operating point")
                ax.set_xlabel("1 - specificity", fontsize=8)
                ax.set_ylabel("sensitivity", fontsize=8)
            else:
                prec, rec, _ = precision_recall_curve(y[known], probs[known, c])
                ax.plot(rec, prec, label=f"AP {r['ap']:.3f} (AUC {r['auc']:.3f}{ci})")
                prevalence = float(y[known].mean())
                ax.axhline(prevalence, color="k", ls=":", lw=0.8, label=f"prevalence {prevalence:.3f}")
                ax.set_ylim(0, 1)
                ax.set_xlim(0, 1)
                ax.set_xlabel("recall", fontsize=8)
                ax.set_ylabel("precision", fontsize=8)
            ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "upper right")
        for c in range(C, rows * cols):
            axes[c // cols][c % cols].axis("off")
        fig.suptitle(f"{kind.upper()} | {title}", fontsize=10)
        fig.tight_layout()
        figs[kind] = fig
    figs["reliability"] = _reliability_figure(plt, probs, labels, classes, task, rep, title)
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
        ax.set_title(title, fontsize=7)
        fig.tight_layout()
        figs["confusion"] = fig
    return figs


def _reliability_figure(plt, probs, labels, classes, task, rep, title):
    """Observed frequency against the mean prediction per bin, the bin's count written on its bar: one panel for
    every prediction together (the ECE's table), then one per class (multi-label)."""
    panels = [("all classes" if task == "multilabel" else "top-1", rep["reliability"], rep["ece"])]
    if task == "multilabel":
        n_bins = len(rep["reliability"])
        for c, name in enumerate(classes):
            ece, table = calibration(probs[:, c:c + 1], np.asarray(labels)[:, c:c + 1], n_bins, task)
            panels.append((name, table, ece))
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.4), squeeze=False)
    for k, (name, table, ece) in enumerate(panels):
        ax = axes[k // cols][k % cols]
        tab = [b for b in table if b["n"] > 0]
        x = [(b["lo"] + b["hi"]) / 2 for b in tab]
        ax.bar(x, [b["frac_pos"] for b in tab], width=[b["hi"] - b["lo"] for b in tab], edgecolor="k", alpha=0.7)
        for xi, b in zip(x, tab):
            ax.text(xi, min(b["frac_pos"] + 0.02, 0.93), str(b["n"]), ha="center", fontsize=5, rotation=90)
        ax.plot([0, 1], [0, 1], "k:")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name} (ECE {ece:.3f})" if ece == ece else f"{name} (no known label)", fontsize=8)
        ax.set_xlabel("predicted probability" if task == "multilabel" else "top-1 confidence", fontsize=7)
        ax.set_ylabel("observed frequency" if task == "multilabel" else "accuracy", fontsize=7)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"reliability (bar labels: predictions per bin) | {title}", fontsize=9)
    fig.tight_layout()
    return fig


def safe_name(name):
    """A class or file name as a file-name-safe string."""
    return "".join(ch if ch.isalnum() else "_" for ch in name)


