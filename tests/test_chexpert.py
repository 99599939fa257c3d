"""CheXpert as a publishable study (issue 15, data side): the test split is exactly valid.csv (or the 500-study test
labels CSV), validation is carved from training patients, and the raw labels (1, 0, -1, blank) are kept beside the
policy labels. On a synthetic fixture in the real layout, and on the real train.csv when ../shared is present."""

import csv
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import readers  # noqa: E402

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + readers.CHEXPERT_CLASSES
CODES = ["1.0", "0.0", "-1.0", ""]


def _jpeg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(30, 220, (20, 16), dtype=np.uint8)
    Image.fromarray(a).save(path, format="JPEG")


def _rows(split, patients, rng):
    """CSV rows in the real format: CheXpert-v1.0-small/<split>/patientNNNNN/studyN/viewN_frontal.jpg, cells 1/0/-1/blank."""
    rows = []
    for p in patients:
        for study in range(1, 1 + int(rng.integers(1, 3))):
            for view, fl, ap in ((1, "Frontal", str(rng.choice(["AP", "PA"]))), (2, "Lateral", ""))[:int(rng.integers(1, 3))]:
                path = f"CheXpert-v1.0-small/{split}/patient{p:05d}/study{study}/view{view}_{fl.lower()}.jpg"
                codes = rng.choice(CODES, size=14, p=[0.3, 0.3, 0.15, 0.25]) if split == "train" else \
                    rng.choice(CODES[:2], size=14)  # valid.csv / test labels: radiologist consensus, 1 or 0
                rows.append([path, str(rng.choice(["Male", "Female"])), str(int(rng.integers(20, 90))), fl, ap] + list(codes))
    return rows


def chexpert_fixture(tmp_path, n_train=40, valid_patients=(64541, 64542, 64543), test_patients=()):
    """root/CheXpert-v1.0-small/{train,valid}.csv + tiny JPEGs; test_patients -> also test_labels.csv (Path + 14)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "chexpert"
    base = root / "CheXpert-v1.0-small"
    tables = dict(train=_rows("train", range(1, n_train + 1), rng), valid=_rows("valid", valid_patients, rng))
    if test_patients:
        tables["test"] = _rows("test", test_patients, rng)
    for split, rows in tables.items():
        base.mkdir(parents=True, exist_ok=True)
        name = "test_labels.csv" if split == "test" else f"{split}.csv"
        with open(base / name, "w", newline="") as f:
            w = csv.writer(f)
            if split == "test":  # the test labels file: Path + the 14 observations only
                w.writerow(["Path"] + readers.CHEXPERT_CLASSES)
                w.writerows([[r[0]] + r[5:] for r in rows])
            else:
                w.writerow(HEADER)
                w.writerows(rows)
        for i, r in enumerate(rows):
            _jpeg(root / r[0], hash(r[0]) % 1000 + i)
    return root, tables


def _cells(rows):
    """Independent of the reader: the 14 cells as float32, blank -> NaN."""
    a = np.array([r[-14:] for r in rows], dtype=str).reshape(-1, 14)
    return np.where(a == "", "nan", a).astype(np.float32)


def _prepare(root, out, **kw):
    return data.prepare(dict(dict(dataset="chexpert", root=str(root), out_dir=str(out), image_size=8, num_workers=1,
                                  chunk_size=16), **kw))


def test_test_split_is_valid_csv_and_raw_labels_are_the_cells(tmp_path):
    root, tables = chexpert_fixture(tmp_path)
    out = tmp_path / "out"
    meta = _prepare(root, out, uncertain_policy="ones")  # default test_source=auto: valid.csv exists -> valid
    assert meta["label_policy"]["test_source"] == "valid" and meta["label_policy"]["official_test"] == "valid.csv"
    assert meta["raw_labels"] is True and meta["label_policy"]["uncertain"] == "ones"
    assert meta["label_policy"]["blank"] == "zeros"
    assert json.load(open(out / "meta.json"))["raw_labels"] is True
    by_path = {str(root / r[0]): r for rows in tables.values() for r in rows}
    test = data.PreparedSplit(out, "test")
    assert [r["path"] for r in test.index] == [str(root / r[0]) for r in tables["valid"]]  # exactly, in file order
    assert meta["splits"]["test"] == len(tables["valid"])
    train_patients = {r[0].split("/")[2] for r in tables["train"]}
    pats = {}
    for s in data.SPLITS:
        sp = data.PreparedSplit(out, s)
        raw = sp.labels_raw
        assert raw.dtype == np.float32 and raw.shape == sp.labels.shape == (len(sp), 14)
        np.testing.assert_array_equal(raw, _cells([by_path[r["path"]] for r in sp.index]))  # NaN == blank
        np.testing.assert_array_equal(np.load(out / f"{s}_labels_raw.npy"), raw)
        # the policy labels come from the raw ones: U-Ones, blank -> 0
        np.testing.assert_array_equal(sp.labels, np.where(np.isnan(raw), 0, np.where(raw == -1, 1, raw)))
        pats[s] = {r["patient_id"] for r in sp.index}
    assert pats["val"] and pats["val"] <= train_patients and pats["train"] <= train_patients
    assert not (pats["train"] & pats["val"]) and not (pats["test"] & (pats["train"] | pats["val"]))
    assert pats["test"] == {"patient64541", "patient64542", "patient64543"}


def test_carve_and_test_csv(tmp_path):
    root, tables = chexpert_fixture(tmp_path, test_patients=(64741, 64742, 64743, 64744))
    meta = _prepare(root, tmp_path / "carve", test_source="carve")
    assert meta["label_policy"]["test_source"] == "carve"
    val = [r["path"] for r in data.PreparedSplit(tmp_path / "carve", "val").index]
    assert val == [str(root / r[0]) for r in tables["valid"]]  # valid.csv is the val split, test is carved
    test_csv = root / "CheXpert-v1.0-small" / "test_labels.csv"
    meta = _prepare(root, tmp_path / "tcsv", test_csv=str(test_csv))
    assert meta["label_policy"]["test_source"] == "test_csv" and meta["label_policy"]["official_test"] == str(test_csv)
    test = data.PreparedSplit(tmp_path / "tcsv", "test")
    assert [r["path"] for r in test.index] == [str(root / r[0]) for r in tables["test"]]
    np.testing.assert_array_equal(test.labels_raw, _cells(tables["test"]))
    assert {r["view"] for r in test.index} <= {"Frontal", "Lateral"} and test.index[0]["view"] == "Frontal"
    assert [r["path"] for r in data.PreparedSplit(tmp_path / "tcsv", "val").index] == \
        [str(root / r[0]) for r in tables["valid"]]
    # the knobs are part of the input hash: a folder prepared with another test source is not silently reused
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _prepare(root, tmp_path / "tcsv")


def test_test_source_errors_are_sentences(tmp_path):
    root, tables = chexpert_fixture(tmp_path, n_train=6)
    csv_file = root / "CheXpert-v1.0-small" / "train.csv"
    with pytest.raises(ValueError, match="drop one of them"):
        readers.read_chexpert(root, test_source="valid", test_csv=str(csv_file))
    with pytest.raises(FileNotFoundError, match="test_csv=.*not found"):
        readers.read_chexpert(root, test_csv=str(root / "nope.csv"))
    with pytest.raises(ValueError, match="test_source='x' must be one of"):
        readers.read_chexpert(root, test_source="x")
    os.remove(root / "CheXpert-v1.0-small" / "valid.csv")
    with pytest.raises(FileNotFoundError, match="test_source=valid needs .*valid.csv.*test_source=carve"):
        readers.read_chexpert(root, test_source="valid")
    assert readers.read_chexpert(root, test_source="auto").label_policy["test_source"] == "carve"
    # a patient in train.csv and in the held-out CSV would move training images into the test set: refused
    with open(root / "CheXpert-v1.0-small" / "valid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerow([tables["train"][0][0].replace("/train/", "/valid/")] + tables["train"][0][1:])
    with pytest.raises(ValueError, match="patient00001.*patient-disjoint"):
        readers.read_chexpert(root, test_source="valid")


# -----------------------------------------------------------------------------
# the real train.csv (223,414 rows): labels and split logic, no images


@pytest.mark.slow  # ~8 s of CPU: 223k rows parsed twice (reader + an independent csv pass) and split
def test_real_train_csv_raw_labels_and_valid_test_split(real_dir, tmp_path):
    real = real_dir / "chexpert_train.csv.gz"
    with gzip.open(real, "rt", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == HEADER
        rows = list(reader)
    # valid.csv beside it: 200 held-out patients (ids after the training ones, as in the real valid.csv) with cells
    # of real rows; the real train.csv is used as it is
    base = tmp_path / "CheXpert-v1.0-small"
    base.mkdir()
    os.symlink(real, base / "train.csv.gz")
    rng = np.random.default_rng(0)
    valid = []
    for k, i in enumerate(rng.choice(len(rows), 234, replace=False)):
        r = list(rows[i])
        r[0] = f"CheXpert-v1.0-small/valid/patient{64541 + k % 200:05d}/study1/view{1 + k // 200}_frontal.jpg"
        r[5:] = ["1.0" if c == "1.0" else "0.0" for c in r[5:]]
        valid.append(r)
    with open(base / "valid.csv", "w", newline="") as f:
        csv.writer(f).writerows([HEADER] + valid)
    t0 = time.process_time()
    src = readers.read_dataset(dict(data.DEFAULTS, dataset="chexpert", root=str(tmp_path)))
    assert src.label_policy["test_source"] == "valid"
    n = len(rows)
    assert len(src.records) == n + 234
    np.testing.assert_array_equal(src.labels_raw, _cells(rows + valid))  # raw file == the CSV cells, NaN = blank
    split = data.split_patients(src.records, src.labels, src.task, 0.15, 0.15, seed=0)
    seconds = time.process_time() - t0
    assert split["test"].tolist() == list(range(n, n + 234))  # test == the valid.csv rows
    pats = {s: {src.records[i]["patient_id"] for i in r} for s, r in split.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["val"] & pats["test"]) and not (pats["train"] & pats["test"])
    assert len(pats["train"] | pats["val"]) == 64540
    assert abs(len(split["val"]) / n - 0.15) < 0.01
    pool = np.concatenate([split["train"], split["val"]])
    for j, c in enumerate(readers.CHEXPERT_CLASSES):  # stratified: each class's positives ~15% in val
        share = (src.labels[split["val"], j] == 1).sum() / (src.labels[pool, j] == 1).sum()
        assert abs(share - 0.15) < 0.02, (c, share)
    assert seconds < 30, f"reading + splitting the real CSV took {seconds:.1f}s of CPU"


def test_train_eval_scores_raw_labels_with_uncertain_masked(tmp_path):
    """train.py's val evals (checkpoint selection) use the raw labels with uncertain cells unknown, whatever policy
    training used (U-Ones here); eval_uncertain=as_policy scores the policy labels (issue 15)."""
    import torch

    import common
    import metrics
    import train
    root, _ = chexpert_fixture(tmp_path, n_train=60)
    out = tmp_path / "out"
    _prepare(root, out, uncertain_policy="ones", test_source="carve")  # val = valid.csv: no uncertain cells there
    val = data.PreparedSplit(out, "train")  # the train split has uncertain cells: score it as a val split would be
    assert (val.labels_raw == -1).any()

    class Net(torch.nn.Module):  # fixed, input-dependent scores: a different mean pixel gives a different logit
        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)) * (k + 1) - k * 0.1 for k in range(14)], 1)

    dist = common.Dist(False, 0, 0, 1, "cpu", True)
    meta = dict(val.meta, task="multilabel")
    cfg = dict(eval_batch_size=16, in_chans=1, norm="dataset", channels_last=False, dtype="float32")
    loss_fn = lambda logits, y: torch.zeros(())  # noqa: E731
    masked, probs = train.run_eval(Net(), val, dict(cfg, eval_uncertain="mask"), meta, dist, loss_fn)
    policy, _ = train.run_eval(Net(), val, dict(cfg, eval_uncertain="as_policy"), meta, dist, loss_fn)
    y = metrics.eval_labels(val.labels, val.labels_raw, "mask", meta["label_policy"]["blank"])
    assert np.isnan(y[val.labels_raw == -1]).all() and (val.labels[val.labels_raw == -1] == 1).all()
    want = metrics.classification_metrics(probs.numpy(), y, meta["classes"], "multilabel")
    assert masked["auc_macro"] == pytest.approx(want["auc_macro"])
    want_policy = metrics.classification_metrics(probs.numpy(), val.labels, meta["classes"], "multilabel")
    assert policy["auc_macro"] == pytest.approx(want_policy["auc_macro"])
    assert not np.array_equal(np.nan_to_num(y, nan=-9), val.labels)  # two different label sets, each pinned above
