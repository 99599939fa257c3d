"""phantom.py: determinism, labels, reports, patients, signal in the pixels, not-linearly-solvable, speed."""

import collections
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import phantom  # noqa: E402


@pytest.fixture(scope="module")
def small():
    return phantom.generate(3000, image_size=32, seed=0)


def test_shapes_dtypes_and_determinism():
    a = phantom.generate(200, image_size=48, seed=3)
    b = phantom.generate(200, image_size=48, seed=3)
    c = phantom.generate(200, image_size=48, seed=4)
    assert a["images"].dtype == np.uint8 and a["images"].shape == (200, 48, 48)
    assert a["labels"].dtype == np.float32 and a["labels"].shape == (200, len(phantom.CLASSES))
    assert a["classes"] == phantom.CLASSES and len(a["records"]) == 200
    assert a["images"].tobytes() == b["images"].tobytes()
    assert a["labels"].tobytes() == b["labels"].tobytes() and a["records"] == b["records"]
    assert a["images"].tobytes() != c["images"].tobytes()
    assert a["images"].std() > 20, "images should use the grey range"
    r = a["records"][0]
    assert set(r) == {"patient_id", "study_id", "view", "age", "sex", "text", "indication"}
    assert r["view"] in ("PA", "AP") and r["sex"] in ("M", "F") and isinstance(r["age"], int)


def test_labels_no_finding_and_prevalence(small):
    Y = small["labels"]
    assert set(np.unique(Y)) <= {0.0, 1.0}
    nf = phantom.CLASSES.index("No Finding")
    np.testing.assert_array_equal(Y[:, nf], (Y[:, :8].max(1) == 0).astype(np.float32))
    prev = Y.mean(0)
    print("prevalence", dict(zip(phantom.CLASSES, prev.round(3))))
    assert ((prev > 0.03) & (prev < 0.6)).all(), dict(zip(phantom.CLASSES, prev))
    # Support Devices do not count against "No Finding" (CheXpert's convention): both happen together
    assert (Y[:, nf] * Y[:, phantom.CLASSES.index("Support Devices")]).sum() > 0


def test_reports_name_every_finding(small):
    Y, recs = small["labels"], small["records"]
    for y, r in zip(Y, recs):
        np.testing.assert_array_equal(phantom.label_report(r["text"]), y, err_msg=r["text"])
        sentences = r["text"].split(". ")
        for c in phantom.PATHOLOGIES:  # positive sentences never start with "No"
            if y[phantom.CLASSES.index(c)]:
                assert any(any(w in s.lower() for w in phantom.KEYWORDS[c]) and not s.startswith("No ") for s in sentences), r["text"]
        assert r["indication"].endswith(".")
    assert np.mean([" No " in " " + r["text"] for r in recs]) > 0.9, "reports should carry explicit negatives"
    texts = [r["text"] for r, y in zip(recs, Y) if y[phantom.CLASSES.index("Pleural Effusion")]]
    assert any("left" in t for t in texts) and any("right" in t for t in texts) and any("bilateral" in t for t in texts)
    assert len(set(r["text"] for r in recs)) > 0.5 * len(recs), "wording should vary"


def test_patients_studies_and_correlations(small):
    Y, recs = small["labels"], small["records"]
    C = {c: Y[:, i] > 0 for i, c in enumerate(phantom.CLASSES)}
    by_patient = collections.defaultdict(list)
    for i, r in enumerate(recs):
        by_patient[r["patient_id"]].append(i)
    n_studies = np.array([len(v) for v in by_patient.values()])
    assert 1.8 < n_studies.mean() < 3.5 and n_studies.max() <= 5 and (n_studies >= 3).sum() > 100
    for idx in by_patient.values():  # sex, chronic cardiomegaly persist; age never goes down
        assert len({recs[i]["sex"] for i in idx}) == 1 and len({C["Cardiomegaly"][i] for i in idx}) == 1
        assert all(recs[a]["age"] <= recs[b]["age"] for a, b in zip(idx, idx[1:]))
        assert len({recs[i]["study_id"] for i in idx}) == len(idx)
    age = np.array([r["age"] for r in recs])
    ap = np.array([r["view"] == "AP" for r in recs])
    assert C["Edema"][C["Cardiomegaly"]].mean() > 2 * C["Edema"][~C["Cardiomegaly"]].mean()
    assert C["Lung Opacity"][C["Consolidation"]].mean() > 2 * C["Lung Opacity"][~C["Consolidation"]].mean()
    assert ap[C["Support Devices"]].mean() > 2 * ap[~C["Support Devices"]].mean()
    assert age[C["Cardiomegaly"]].mean() > age[~C["Cardiomegaly"]].mean() + 5
    fever = np.array(["fever" in r["indication"].lower() or "pneumonia" in r["indication"].lower() for r in recs])
    assert C["Consolidation"][fever].mean() > 2 * C["Consolidation"][~fever].mean()


def test_images_carry_signal():
    # cardiomegaly widens the heart: after per-image standardisation the region just left (image right)
    # of a normal heart border is brighter; an effusion brightens the lung bases
    d = phantom.generate(3000, image_size=64, seed=1)
    x = d["images"].astype(np.float32)
    x = (x - x.mean((1, 2), keepdims=True)) / (x.std((1, 2), keepdims=True) + 1e-6)
    Y = d["labels"] > 0
    heart_border = x[:, 36:44, 42:47].mean((1, 2))
    cm = Y[:, phantom.CLASSES.index("Cardiomegaly")]
    a, b = heart_border[cm], heart_border[~cm]
    t = (a.mean() - b.mean()) / np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert t > 5, t
    bases = np.concatenate([x[:, 38:46, 8:20], x[:, 38:46, 44:56]], 2).mean((1, 2))
    eff = Y[:, phantom.CLASSES.index("Pleural Effusion")]
    assert bases[eff].mean() > bases[~eff].mean() + 0.15


@pytest.mark.slow
@pytest.mark.learning
def test_logistic_regression_on_thumbnails_is_not_enough(learning):
    """The issue's bar: a per-class linear model on 16x16 thumbnails stays <= 0.80 macro AUC (a CNN gets >= 0.90)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    n_train, n_val = 6000, 2000
    d = phantom.generate(n_train + n_val, image_size=64, seed=0)
    X = d["images"].reshape(-1, 16, 4, 16, 4).astype(np.float32).mean((2, 4)).reshape(n_train + n_val, -1)
    scaler = StandardScaler().fit(X[:n_train])
    Xtr, Xva = scaler.transform(X[:n_train]), scaler.transform(X[n_train:])
    Y = d["labels"]
    aucs = [roc_auc_score(Y[n_train:, c], LogisticRegression(max_iter=1000, C=1.0).fit(Xtr, Y[:n_train, c]).decision_function(Xva))
            for c in range(len(phantom.CLASSES))]
    print("logistic AUC", dict(zip(phantom.CLASSES, np.round(aucs, 3))), "macro", round(float(np.mean(aucs)), 3))
    learning("logistic macro AUC (a floor)", np.mean(aucs), 0.6)
    learning("logistic macro AUC (a ceiling)", np.mean(aucs), 0.80, above=False)


@pytest.mark.slow
def test_generation_speed():
    # CPU time of this process (numpy's elementwise work is single-threaded): on a shared machine the
    # wall clock measures the neighbours, not the generator
    phantom.generate(64, image_size=128, seed=0)  # warm-up
    best = 0.0
    for seed in range(2):
        t0, w0 = time.process_time(), time.perf_counter()
        phantom.generate(2000, image_size=128, seed=seed)
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        best = max(best, 2000 / cpu)
        print(f"phantom: {2000 / cpu:.0f} img/s per CPU-second at 128 px ({2000 / wall:.0f} img/s wall clock)")
    assert best >= 1000, f"{best:.0f} img/s: the target is 2000 on one free core (1000 leaves room for busy CI machines)"
