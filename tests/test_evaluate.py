"""evaluate.py: the statistics against sklearn / brute force / a permutation test, then the CLI on a tiny
prepared data set (skips until data.py and model.py exist)."""

import csv
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cam  # noqa: E402
import evaluate  # noqa: E402
import metrics  # noqa: E402


def _multilabel(seed=0, N=400, C=4):
    rng = np.random.default_rng(seed)
    y = (rng.random((N, C)) < 0.3).astype(np.float32)
    probs = np.clip(0.35 * y + 0.65 * rng.random((N, C)), 0, 1)
    y[rng.random((N, C)) < 0.15] = np.nan  # unknown labels
    y[:, C - 1] = np.where(np.isnan(y[:, C - 1]), np.nan, 0.0)  # last class: negatives only
    return probs, y


# -----------------------------------------------------------------------------
# per-class metrics


def test_classification_metrics_multilabel_matches_sklearn():
    probs, y = _multilabel()
    classes = ["a", "b", "c", "never"]
    m = metrics.classification_metrics(probs, y, classes, "multilabel")
    ref_auc, ref_ap = [], []
    for c in range(3):
        known = ~np.isnan(y[:, c])
        ref_auc.append(roc_auc_score(y[known, c], probs[known, c]))
        ref_ap.append(average_precision_score(y[known, c], probs[known, c]))
        assert m["auc"][classes[c]] == pytest.approx(ref_auc[-1], abs=1e-12)
        assert m["ap"][classes[c]] == pytest.approx(ref_ap[-1], abs=1e-12)
    assert np.isnan(m["auc"]["never"]) and np.isnan(m["ap"]["never"])  # one label value -> NaN
    assert m["auc_macro"] == pytest.approx(np.mean(ref_auc), abs=1e-12)  # ... and left out of the macro
    assert m["ap_macro"] == pytest.approx(np.mean(ref_ap), abs=1e-12)


def test_classification_metrics_multiclass_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = metrics.classification_metrics(probs, y, list("abcd"), "multiclass")
    pred = probs.argmax(1)
    assert m["acc"] == pytest.approx((pred == y).mean())
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    for c, name in enumerate("abcd"):
        assert m["auc"][name] == pytest.approx(roc_auc_score(y == c, probs[:, c]), abs=1e-12)
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)


def test_fast_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(2)
    y = rng.random(500) < 0.4
    p = np.round(rng.random(500) + 0.3 * y, 1)  # coarse scores: many ties
    assert metrics.fast_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert np.isnan(metrics.fast_auc(np.zeros(10), np.arange(10)))


# -----------------------------------------------------------------------------
# bootstrap over patients


def test_bootstrap_ci_equals_brute_force():
    probs, y = _multilabel(seed=3, N=240, C=3)
    groups = np.array([f"p{i // 3:03d}" for i in range(240)])  # 3 images per patient
    n_boot, seed = 200, 7
    lo, hi, mlo, mhi = metrics.bootstrap_ci(probs, y, groups, n_boot, seed)
    # brute force: the same random draws (rng.integers(0, G, G) over the sorted patient ids), patients
    # expanded one by one with a Python loop, AUC from sklearn
    uniq = sorted(set(groups))
    members = {g: [i for i in range(len(groups)) if groups[i] == g] for g in uniq}
    rng = np.random.default_rng(seed)
    boot = np.full((n_boot, 3), np.nan)
    for b in range(n_boot):
        idx = [i for g in rng.integers(0, len(uniq), len(uniq)) for i in members[uniq[g]]]
        for c in range(3):
            yc, pc = y[idx, c], probs[idx, c]
            known = ~np.isnan(yc)
            if len(set(yc[known])) == 2:
                boot[b, c] = roc_auc_score(yc[known], pc[known])
    for c in range(2):
        v = boot[:, c][~np.isnan(boot[:, c])]
        assert lo[c] == pytest.approx(np.percentile(v, 2.5), abs=1e-12)
        assert hi[c] == pytest.approx(np.percentile(v, 97.5), abs=1e-12)
    assert np.isnan(lo[2]) and np.isnan(hi[2])  # the all-negative class has no AUC in any resample
    macro = np.nanmean(boot[:, :2], axis=1)
    assert mlo == pytest.approx(np.percentile(macro, 2.5), abs=1e-12)
    assert mhi == pytest.approx(np.percentile(macro, 97.5), abs=1e-12)
    full = metrics.masked_auc(probs, y)
    assert lo[0] < full[0] < hi[0]


def test_patient_bootstrap_is_wider_than_image_bootstrap_for_duplicated_images():
    """Four identical copies of each patient's image carry the information of one: resampling patients
    must see that (and resampling images must not)."""
    rng = np.random.default_rng(4)
    y1 = (rng.random(150) < 0.4).astype(np.float64)
    p1 = np.clip(0.3 * y1 + 0.7 * rng.random(150), 0, 1)
    y, p = np.repeat(y1, 4)[:, None], np.repeat(p1, 4)[:, None]
    patients = np.repeat(np.arange(150), 4)
    lo_p, hi_p, _, _ = metrics.bootstrap_ci(p, y, patients, 300, 0)
    lo_i, hi_i, _, _ = metrics.bootstrap_ci(p, y, np.arange(600), 300, 0)
    assert (hi_p - lo_p)[0] > 1.6 * (hi_i - lo_i)[0]  # ~2x = sqrt(4)


# -----------------------------------------------------------------------------
# DeLong


def _delong_brute(y, scores):
    """DeLong et al. 1988 by definition: placement values psi(X_i, Y_j) over all positive-negative pairs."""
    y = y.astype(bool)
    aucs, v10s, v01s = [], [], []
    for s in scores:
        X, Y = s[y], s[~y]
        psi = (X[:, None] > Y[None, :]) + 0.5 * (X[:, None] == Y[None, :])
        aucs.append(psi.mean())
        v10s.append(psi.mean(1))
        v01s.append(psi.mean(0))
    m, n = y.sum(), (~y).sum()
    return np.array(aucs), np.cov(np.stack(v10s)) / m + np.cov(np.stack(v01s)) / n


def test_delong_fast_equals_definition():
    rng = np.random.default_rng(5)
    y = rng.random(200) < 0.35
    s1 = np.round(y + rng.normal(size=200), 1)  # ties on purpose
    s2 = np.round(0.5 * y + 0.6 * s1 + rng.normal(size=200), 1)
    aucs, cov = metrics.delong_auc_cov(y, np.stack([s1, s2]))
    ref_aucs, ref_cov = _delong_brute(y, [s1, s2])
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    assert aucs[0] == pytest.approx(roc_auc_score(y, s1), abs=1e-12)


@pytest.mark.parametrize("effect", [0.0, 0.25, 0.5])
def test_delong_p_value_agrees_with_paired_permutation_test(effect):
    rng = np.random.default_rng(6)
    n = 300
    y = rng.random(n) < 0.4
    shared = rng.normal(size=n)  # the two models are correlated through a shared component
    s1 = (0.8 + effect) * y + shared + 0.7 * rng.normal(size=n)
    s2 = 0.8 * y + shared + 0.7 * rng.normal(size=n)
    r1, r2 = (np.argsort(np.argsort(s)) / n for s in (s1, s2))  # ranks: exchangeable scales under the null
    res = metrics.delong_test(y, r1, r2)
    observed = abs(metrics.fast_auc(y, r1) - metrics.fast_auc(y, r2))
    n_perm, hits = 2000, 0
    for _ in range(n_perm):
        swap = rng.random(n) < 0.5
        a, b = np.where(swap, r2, r1), np.where(swap, r1, r2)
        hits += abs(metrics.fast_auc(y, a) - metrics.fast_auc(y, b)) >= observed - 1e-12
    p_perm = (hits + 1) / (n_perm + 1)
    assert abs(res["p"] - p_perm) < 0.05 + 0.15 * p_perm, (res, p_perm)
    if effect == 0.5:
        assert res["p"] < 0.01 and p_perm < 0.01


def test_delong_identical_models():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    assert metrics.delong_test(y, p, p)["p"] == 1.0


# -----------------------------------------------------------------------------
# operating points and calibration


def test_thresholds_against_brute_force():
    rng = np.random.default_rng(8)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.clip(0.3 * y + 0.7 * rng.random(300), 0, 1)
    best = max(np.unique(p), key=lambda t: ((p >= t) & (y == 1)).sum() / y.sum() + ((p < t) & (y == 0)).sum() / (y == 0).sum())
    t = metrics.youden_threshold(y, p)
    j = lambda t: metrics.binary_at_threshold(y, p, t)["sensitivity"] + metrics.binary_at_threshold(y, p, t)["specificity"]
    assert j(t) == pytest.approx(j(best), abs=1e-12)
    t9 = metrics.sensitivity_threshold(y, p, 0.9)
    assert metrics.binary_at_threshold(y, p, t9)["sensitivity"] >= 0.9
    above = np.unique(p[p > t9])
    assert all(metrics.binary_at_threshold(y, p, u)["sensitivity"] < 0.9 for u in above)  # the highest such threshold
    f1 = lambda t: metrics.binary_at_threshold(y, p, t)["f1"]  # noqa: E731
    assert f1(metrics.f1_threshold(y, p)) == pytest.approx(max(f1(u) for u in np.unique(p)), abs=1e-12)
    thr = metrics.choose_thresholds(np.stack([p, p], 1), np.stack([y, y], 1).astype(float), "f1")
    assert thr.tolist() == [metrics.f1_threshold(y, p)] * 2


def test_calibration_ece():
    rng = np.random.default_rng(9)
    p = rng.random((20000, 1))
    y_cal = (rng.random((20000, 1)) < p).astype(np.float64)
    ece, table = metrics.calibration(p, y_cal, 10)
    assert ece < 0.02 and len(table) == 10 and sum(b["n"] for b in table) == 20000
    ece_bad, _ = metrics.calibration(np.full((1000, 1), 0.9), np.zeros((1000, 1)), 10)
    assert ece_bad == pytest.approx(0.9)
    # multiclass: top-1 confidence 0.7 and accuracy 0.5 -> ECE 0.2
    probs = np.tile([[0.7, 0.2, 0.1]], (10, 1))
    ece_mc, _ = metrics.calibration(probs, np.array([0] * 5 + [1] * 5), 10, "multiclass")
    assert ece_mc == pytest.approx(0.2)


def test_evaluation_report_and_json():
    probs, y = _multilabel(seed=10, N=200, C=4)
    classes = ["a", "b", "c", "never"]
    groups = np.arange(200) // 2
    rep = metrics.evaluation_report(probs, y, classes, "multilabel", groups, thresholds=np.full(4, 0.5), n_bootstrap=50)
    assert rep["excluded_from_macro"] == ["never"] and rep["n_patients"] == 100
    known = ~np.isnan(y[:, :3])
    assert rep["auc_micro"] == pytest.approx(roc_auc_score(y[:, :3][known], probs[:, :3][known]), abs=0.05)
    r = rep["per_class"]["a"]
    k = ~np.isnan(y[:, 0])
    ref = metrics.binary_at_threshold(y[k, 0], probs[k, 0], 0.5)
    assert r["sensitivity"] == pytest.approx(ref["sensitivity"]) and r["f1"] == pytest.approx(ref["f1"])
    assert r["n_pos"] + r["n_neg"] == k.sum()
    text = json.dumps(metrics.to_json(rep), allow_nan=False)  # strict JSON
    assert "never" in metrics.format_report(rep) and "null" in text


# -----------------------------------------------------------------------------
# heatmaps on hand-built models (no model.py needed)


class _TwoChannelNet(nn.Module):
    """Feature map channel 0 = the image, channel 1 = its negative; logit c = mean of channel c."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.features.bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, x):
        return self.features(x).mean((2, 3))


def test_gradcam_highlights_what_the_class_looks_at():
    net = _TwoChannelNet().eval()
    x = torch.zeros(2, 1, 32, 32)
    x[:, :, :12, :12] = 1.0  # a bright square top-left
    method, target = cam.find_cam_target(net, x)
    assert method == "gradcam" and target is net.features
    maps = cam.heatmaps(net, x, [0, 1], method, target)
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert maps[0, :10, :10].mean() > 0.9 and maps[0, 16:, 16:].max() < 0.1  # class 0: the square
    assert maps[1, :10, :10].max() < 0.1 and maps[1, 16:, 16:].mean() > 0.9  # class 1: everything else


class _TinyViT(nn.Module):
    """cls token + 4x4 patches + two pre-LN blocks with a fused c_attn, like model.py's ViT."""

    def __init__(self, d=16, nh=2):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 8, 8)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.attn = nn.ModuleList([_Attn(d, nh) for _ in range(2)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        for a in self.attn:
            t = t + a(t)
        return self.head(t[:, 0])


class _Attn(nn.Module):
    def __init__(self, d, nh):
        super().__init__()
        self.n_head, self.c_attn, self.c_proj = nh, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        return self.c_proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))


def test_attention_rollout_on_a_vit():
    torch.manual_seed(0)
    net = _TinyViT().eval()
    x = torch.rand(3, 1, 32, 32)
    method, target = cam.find_cam_target(net, x)
    assert method == "rollout" and len(target) == 2
    maps = cam.heatmaps(net, x, [0, 1, 2], method, target)
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all() and maps.max() == pytest.approx(1.0)
    # the hook's recomputed attention reproduces the module: softmax(q k^T / sqrt(hs)) v == SDPA
    a = net.attn[0]
    t = torch.rand(2, 17, 16)
    q, k, v = (u.view(2, 17, 2, 8).transpose(1, 2) for u in a.c_attn(t).split(16, 2))
    att = torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5, -1)
    torch.testing.assert_close(att @ v, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_overlay_and_load_image(tmp_path):
    from PIL import Image
    img = (np.arange(60 * 30) % 255).astype(np.uint8).reshape(60, 30)  # tall: padded left and right
    Image.fromarray(img).save(tmp_path / "x.png")
    u8 = cam.load_image(str(tmp_path / "x.png"), 32)
    assert u8.shape == (32, 32) and u8[:, :7].max() == 0 and u8[:, 9:23].max() > 0
    rgb = cam.overlay(u8, np.random.rand(8, 8))
    assert rgb.shape == (224, 224, 3) and rgb.dtype == np.uint8  # enlarged 7x to be readable
    assert cam.overlay(np.zeros((256, 256), np.uint8), np.random.rand(8, 8)).shape == (256, 256, 3)


# -----------------------------------------------------------------------------
# the CLI on a tiny prepared data set with a randomly initialised model


def _prepare(d, classes, n=48, size=32, name="tiny", seed=0, task="multilabel"):
    """A prepared data set in the CONTRACT.md layout, written without data.py's prepare."""
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    C = len(classes)
    meta = {"name": name, "source": name, "task": task, "classes": classes, "image_size": size,
            "splits": {s: n for s in ("train", "val", "test")}, "mean": 0.5, "std": 0.25,
            "pos_counts": {}, "label_policy": {}, "input_hash": "x", "bad_images": [],
            "index_columns": ["row", "path", "patient_id", "study_id", "view", "age", "sex", "text", "indication"],
            "created": "now"}
    for s in ("train", "val", "test"):
        imgs = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        if task == "multilabel":
            labels = (rng.random((n, C)) < 0.4).astype(np.float32)
            labels[rng.random((n, C)) < 0.1] = np.nan
            imgs[:, :8, :8] = np.where(labels[:, :1, None] == 1, 255, imgs[:, :8, :8])
        else:
            labels = rng.integers(0, C, n).astype(np.int64)
        imgs.tofile(os.path.join(d, f"{s}_images.u8"))
        np.save(os.path.join(d, f"{s}_labels.npy"), labels)
        with open(os.path.join(d, f"{s}_index.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(meta["index_columns"])
            for i in range(n):
                path = f"CheXpert-v1.0-small/{s}/patient{i // 4:05d}/study{i % 2 + 1}/view{(i // 2) % 2 + 1}_frontal.jpg"
                w.writerow([i, path, f"patient{i // 4:05d}", f"study{i // 2}", "PA", 50, "M", "report", ""])
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)


def _fake_run(tmp_path, classes, data_dir, task="multilabel", arch="convnext_atto"):
    models = pytest.importorskip("model")
    pytest.importorskip("data")
    torch.manual_seed(0)
    net = models.build_model(arch, num_classes=len(classes), in_chans=1, image_size=32)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    ck = {"model": net.state_dict(), "model_args": net.model_args, "config": {}, "iter": 0, "best_metric": 0.5,
          "optimizer": {}, "ema": None,
          "meta": {"classes": classes, "task": task, "mean": 0.5, "std": 0.25, "imagenet_norm": False,
                   "data_dir": str(data_dir)}}
    torch.save(ck, run / "best.pt")
    return run


CHEX = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "No Finding"]


def test_main_on_a_tiny_dataset(tmp_path):
    dd = tmp_path / "chexpert_tiny"
    _prepare(str(dd), CHEX, name="chexpert")
    run = _fake_run(tmp_path, CHEX, dd)
    rep = evaluate.main([f"--ckpt={run / 'best.pt'}", "--split=test", "--n_bootstrap=30", "--cam=1", "--tta=1",
                         "--tensorboard=False", "--device=cpu"])
    saved = json.load(open(run / "eval_test.json"))
    assert saved["auc_macro"] == pytest.approx(rep["auc_macro"]) and set(saved["per_class"]) == set(CHEX)
    assert all(r["auc_ci"][0] <= r["auc_ci"][1] for r in saved["per_class"].values())
    with open(run / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 48 and "Edema" in rows[0] and "true_Edema" in rows[0] and "text" not in rows[0]
    with open(run / "submission_test.csv") as f:
        sub = list(csv.reader(f))
    assert sub[0] == ["Study"] + metrics.CHEXPERT_COMPETITION and len(sub) - 1 == 24  # 2 views per study
    p1 = {r["path"]: float(r["Edema"]) for r in rows}
    study = sub[1][0]
    assert float(sub[1][4]) == pytest.approx(max(v for k, v in p1.items() if os.path.dirname(k) == study), abs=1e-5)
    cams = os.listdir(run / "cam_test")
    assert saved["cam"]["method"] == "gradcam" and any(c.startswith("Atelectasis_tp0") for c in cams)
    assert all((run / f"test_{k}.png").exists() for k in ("roc", "pr", "reliability"))  # matplotlib is a dependency
    # another data set sharing 3 classes: evaluated on those, the others reported as dropped
    other = tmp_path / "nih_tiny"
    _prepare(str(other), ["Edema", "Cardiomegaly", "Atelectasis", "Hernia"], name="nih", seed=1)
    rep2 = evaluate.main([f"--ckpt={run / 'best.pt'}", f"--data_dir={other}", "--n_bootstrap=0", "--figures=False",
                          "--tensorboard=False", "--device=cpu"])
    assert rep2["classes"] == ["Atelectasis", "Cardiomegaly", "Edema"]
    assert rep2["dropped_data_classes"] == ["Hernia"] and "No Finding" in rep2["dropped_model_classes"]
    assert (run / "eval_nih_tiny_test.json").exists()
    # one image
    from PIL import Image
    Image.fromarray(np.full((40, 20), 128, np.uint8)).save(tmp_path / "one.png")
    one = evaluate.main([f"--ckpt={run / 'best.pt'}", f"--image={tmp_path / 'one.png'}", "--device=cpu"])
    assert len(one["probs"]) == len(CHEX) and all(os.path.exists(p) for p in one["heatmaps"])


def test_main_multiclass(tmp_path):
    dd = tmp_path / "mc"
    classes = ["normal", "cnv", "dme"]
    _prepare(str(dd), classes, task="multiclass")
    run = _fake_run(tmp_path, classes, dd, task="multiclass")
    rep = evaluate.main([f"--ckpt={run / 'best.pt'}", "--n_bootstrap=20", "--tensorboard=False", "--device=cpu"])
    assert np.array(rep["confusion_matrix"]).sum() == 48 and 0 <= rep["balanced_acc"] <= 1
    assert all((run / f"test_{k}.png").exists() for k in ("roc", "pr", "reliability", "confusion"))
    with open(run / "predictions_test.csv") as f:
        assert list(csv.reader(f))[0][-5:] == ["label", "pred"] + classes
    rows, cls, probs, labels, task = metrics.read_predictions(str(run / "predictions_test.csv"))
    assert task == "multiclass" and cls == classes and np.allclose(probs.sum(1), 1, atol=1e-4)


# -----------------------------------------------------------------------------
# issue 15: the CheXpert competition AUC, decisions at 0.5 against sklearn, raw test labels, challenge inference


def test_auc_comp5_is_the_mean_of_the_five_sklearn_aucs():
    rng = np.random.default_rng(3)
    classes = ["No Finding", "Edema", "Atelectasis", "Cardiomegaly", "Pleural Effusion", "Consolidation", "Nodule"]
    y = (rng.random((300, 7)) < 0.3).astype(np.float32)
    probs = np.clip(0.3 * y + 0.7 * rng.random((300, 7)), 0, 1)
    y[rng.random((300, 7)) < 0.2] = np.nan
    m = metrics.classification_metrics(probs, y, classes, "multilabel")
    ref = []
    for name in metrics.CHEXPERT_COMPETITION:
        c = classes.index(name)
        known = ~np.isnan(y[:, c])
        ref.append(roc_auc_score(y[known, c], probs[known, c]))
    assert m["auc_comp5"] == pytest.approx(np.mean(ref), abs=1e-12)
    assert m["auc_comp5"] != pytest.approx(m["auc_macro"], abs=1e-6)  # not the 7-class macro
    assert "auc_comp5" not in metrics.classification_metrics(probs[:, :4], y[:, :4], classes[:4], "multilabel")


def test_decisions_at_one_half_equal_sklearn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    rng = np.random.default_rng(4)
    y = (rng.random((200, 4)) < 0.35).astype(np.float32)
    y[:, 3] = 0  # a class with no positive: precision / recall / F1 0 (sklearn's zero_division=0)
    probs = np.clip(0.4 * y + 0.6 * rng.random((200, 4)), 0, 1)
    m = metrics.classification_metrics(probs, y, list("abcd"), "multilabel")
    pred = (probs >= 0.5).astype(int)
    p, r, f, _ = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    for c, name in enumerate("abcd"):
        assert (m["precision"][name], m["recall"][name], m["f1"][name]) == pytest.approx((p[c], r[c], f[c]), abs=1e-12)
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert m["f1_micro"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0), abs=1e-12)
    assert m["exact_match"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)  # subset accuracy
    assert m["acc_elementwise"] == pytest.approx((y == pred).mean(), abs=1e-12)
    # unknown labels: each class is scored on its known cells, as sklearn on that subset
    y[rng.random(y.shape) < 0.2] = np.nan
    m = metrics.classification_metrics(probs, y, list("abcd"), "multilabel")
    for c, name in enumerate("abc"):
        k = ~np.isnan(y[:, c])
        p, r, f, _ = precision_recall_fscore_support(y[k, c], pred[k, c], average="binary", zero_division=0)
        assert (m["precision"][name], m["recall"][name], m["f1"][name]) == pytest.approx((p, r, f), abs=1e-12)
    k = ~np.isnan(y)
    assert m["f1_micro"] == pytest.approx(f1_score(y[k], pred[k], zero_division=0), abs=1e-12)
    # multi-class: per-class precision / recall / F1 of the argmax, micro F1 = accuracy
    yc = rng.integers(0, 3, 150)
    pc = rng.dirichlet(np.ones(3), 150)
    mc = metrics.classification_metrics(pc, yc, list("xyz"), "multiclass")
    p, r, f, _ = precision_recall_fscore_support(yc, pc.argmax(1), labels=[0, 1, 2], zero_division=0)
    assert [mc["precision"][n] for n in "xyz"] == pytest.approx(p) and [mc["f1"][n] for n in "xyz"] == pytest.approx(f)
    assert mc["f1_micro"] == pytest.approx(f1_score(yc, pc.argmax(1), average="micro"), abs=1e-12)


def test_eval_labels_masks_uncertain_and_follows_the_blank_policy():
    raw = np.array([[1, 0, -1, np.nan]], dtype=np.float32)
    ones = np.array([[1, 0, 1, 0]], dtype=np.float32)  # U-Ones, blank -> zeros
    np.testing.assert_array_equal(metrics.eval_labels(ones, raw, "mask", "zeros"), [[1, 0, np.nan, 0]])
    np.testing.assert_array_equal(metrics.eval_labels(ones, raw, "mask", "ignore"), [[1, 0, np.nan, np.nan]])
    np.testing.assert_array_equal(metrics.eval_labels(ones, raw, "as_policy", "zeros"), ones)
    np.testing.assert_array_equal(metrics.eval_labels(ones, None), ones)  # no raw file: the policy labels
    with pytest.raises(ValueError, match="eval_uncertain"):
        metrics.eval_labels(ones, raw, "drop")


def _add_uncertain(d, rng):
    """Turn the folder into a U-Ones CheXpert folder: raw codes beside the policy labels, 20% uncertain (-1 -> 1)."""
    meta = json.load(open(os.path.join(d, "meta.json")))
    for s in ("train", "val", "test"):
        y = np.load(os.path.join(d, f"{s}_labels.npy"))
        raw = y.copy()
        unc = (rng.random(y.shape) < 0.2) & ~np.isnan(y)
        raw[unc] = -1
        y[unc] = 1
        np.save(os.path.join(d, f"{s}_labels.npy"), y)
        np.save(os.path.join(d, f"{s}_labels_raw.npy"), raw)
    meta.update(raw_labels=True, label_policy={"uncertain": "ones", "blank": "ignore"})
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"))


def test_uncertain_test_cells_are_excluded_from_every_test_metric(tmp_path):
    dd = tmp_path / "chexpert_u"
    _prepare(str(dd), CHEX, name="chexpert")
    _add_uncertain(str(dd), np.random.default_rng(5))
    run = _fake_run(tmp_path, CHEX, dd)
    args = [f"--ckpt={run / 'best.pt'}", "--n_bootstrap=0", "--figures=False", "--tensorboard=False", "--device=cpu"]
    masked = evaluate.main(args)
    policy = evaluate.main(args + ["--eval_uncertain=as_policy", f"--out_dir={tmp_path / 'policy'}"])
    raw = np.load(dd / "test_labels_raw.npy")
    y_policy = np.load(dd / "test_labels.npy")
    y_mask = np.where(raw == -1, np.nan, raw)
    rows = list(csv.DictReader(open(run / "predictions_test.csv")))
    probs = np.array([[float(r[c]) for c in CHEX] for r in rows])
    for rep, y in ((masked, y_mask), (policy, y_policy)):
        ref = metrics.classification_metrics(probs, y, CHEX, "multilabel")
        for c, name in enumerate(CHEX):
            k = ~np.isnan(y[:, c])
            assert rep["per_class"][name]["n_pos"] + rep["per_class"][name]["n_neg"] == k.sum()
            assert rep["auc"][name] == pytest.approx(ref["auc"][name], abs=1e-9)
        assert rep["auc_comp5"] == pytest.approx(ref["auc_comp5"], abs=1e-9)
        assert rep["at_0.5"]["f1_micro"] == pytest.approx(ref["f1_micro"], abs=1e-9)
    n_unc = int((raw == -1).sum())
    assert n_unc > 0 and sum(r["n_pos"] for r in masked["per_class"].values()) == \
        sum(r["n_pos"] for r in policy["per_class"].values()) - n_unc
    saved = json.load(open(run / "eval_test.json"))
    assert saved["eval_uncertain"] == "mask" and "uncertain masked" in saved["labels_used"]
    assert json.load(open(tmp_path / "policy" / "eval_test.json"))["eval_uncertain"] == "as_policy"
    # the masked labels are the truth columns of the predictions file: an uncertain cell is blank there
    assert sum(r["true_Edema"] == "" for r in rows) == int(np.isnan(y_mask[:, CHEX.index("Edema")]).sum())


def test_predict_csv_equals_the_test_split(tmp_path):
    from PIL import Image
    dd = tmp_path / "chexpert_tiny"
    _prepare(str(dd), CHEX, name="chexpert")
    run = _fake_run(tmp_path, CHEX, dd)
    rep = evaluate.main([f"--ckpt={run / 'best.pt'}", "--n_bootstrap=0", "--figures=False", "--tensorboard=False",
                         "--device=cpu"])
    # the challenge input: the test images as files under a root, listed in a Path column
    images = np.fromfile(dd / "test_images.u8", dtype=np.uint8).reshape(-1, 32, 32)
    index = list(csv.DictReader(open(dd / "test_index.csv")))
    root = tmp_path / "root"
    for r, img in zip(index, images):
        os.makedirs(root / os.path.dirname(r["path"]), exist_ok=True)
        Image.fromarray(img).save(root / r["path"], format="PNG")  # lossless under the .jpg name: same pixels
    with open(tmp_path / "paths.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path"])
        w.writerows([r["path"]] for r in index)
    out = tmp_path / "challenge"
    got = evaluate.main([f"--ckpt={run / 'best.pt'}", f"--predict_csv={tmp_path / 'paths.csv'}", f"--root={root}",
                         f"--out_dir={out}", "--device=cpu"])
    want = {r["path"]: [float(r[c]) for c in CHEX] for r in csv.DictReader(open(run / "predictions_test.csv"))}
    pred = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["Path"] for r in pred] == [r["path"] for r in index]
    np.testing.assert_array_equal([[float(r[c]) for c in CHEX] for r in pred], [want[r["Path"]] for r in pred])
    assert open(out / "submission.csv").read() == open(run / "submission_test.csv").read()  # study level, 5 columns
    assert got["probs"].shape == (len(index), len(CHEX)) and rep["n_images"] == len(index)
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("Image\nx.png\n")
    with pytest.raises(ValueError, match="Path"):
        evaluate.main([f"--ckpt={run / 'best.pt'}", f"--predict_csv={tmp_path / 'bad.csv'}", "--device=cpu"])


@pytest.mark.slow
@pytest.mark.learning
def test_quickstart_evaluation_writes_the_figures(quickstart_run, tmp_path, learning):
    """python evaluate.py --ckpt=out/quickstart/best.pt --split=test, on the session's quick-start run: the ROC,
    PR and reliability PNGs (matplotlib is in requirements.txt) and a real AUC."""
    rep = evaluate.main([f"--ckpt={quickstart_run['best']}", "--split=test", "--n_bootstrap=50", "--tensorboard=False",
                         f"--out_dir={tmp_path}"])
    for kind in ("roc", "pr", "reliability"):
        assert os.path.getsize(tmp_path / f"test_{kind}.png") > 10_000, kind
    learning("quick start test auc_macro", rep["auc_macro"], 0.85)  # the quick start's test AUC is ~0.9
    # the phantom draws the 5 competition findings, so its reports carry the competition number too
    assert rep["auc_comp5"] == pytest.approx(np.mean([rep["auc"][c] for c in metrics.CHEXPERT_COMPETITION]))
