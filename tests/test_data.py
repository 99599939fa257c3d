"""data.py: readers on small files in each real format, the real CSVs (skipped when ../shared is absent),
prepare (bad images, resume, hash), patient-level splits, the sampler, the loader and augmentation."""

import csv
import gzip
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} absent (reference files live outside the repo)")


def _img(path, size=(40, 30), mode="L", value=None, fmt=None):
    """A small image with structure (a gradient plus a bright block) so resizing is not trivial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    a = (np.add.outer(np.arange(h), np.arange(w)) * 3 % 256).astype(np.uint8)
    a[h // 4:h // 2, w // 4:w // 2] = 250 if value is None else value
    img = Image.fromarray(a)
    if mode != "L":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


# -----------------------------------------------------------------------------
# readers on small files in the real formats

CHEX_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + data.CHEXPERT_CLASSES


def _chexpert_tree(tmp_path):
    root = tmp_path / "chex"
    base = root / "CheXpert-v1.0-small"
    rows = [  # path, sex, age, F/L, AP/PA, then 14 cells
        ("train/patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP", "1.0", "", "", "", "", "", "", "", "", "0.0", "", "", "", "1.0"),
        ("train/patient00002/study2/view1_frontal.jpg", "Male", "87", "Frontal", "PA", "", "", "-1.0", "1.0", "", "-1.0", "", "", "", "", "", "", "", ""),
        ("train/patient00002/study2/view2_lateral.jpg", "Male", "87", "Lateral", "", "", "", "-1.0", "1.0", "", "", "", "", "", "", "", "", "", ""),
        ("train/patient00003/study1/view1_frontal.jpg", "Female", "40", "Frontal", "AP", "", "", "0.0", "", "", "", "1.0", "", "", "", "", "", "", ""),
    ]
    valid = [("valid/patient64541/study1/view1_frontal.jpg", "Male", "73", "Frontal", "AP") + ("0.0",) * 14]
    for name, rs in (("train.csv", rows), ("valid.csv", valid)):
        base.mkdir(parents=True, exist_ok=True)
        with open(base / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CHEX_HEADER)
            for r in rs:
                w.writerow(["CheXpert-v1.0-small/" + r[0]] + list(r[1:]))
                _img(base / r[0], fmt="JPEG")
    return root


def test_chexpert_reader_policies_views_and_valid(tmp_path):
    root = _chexpert_tree(tmp_path)
    src = data.read_chexpert(root)  # defaults: uncertain ignore, blank zeros
    assert len(src.records) == 5 and src.task == "multilabel" and src.classes == data.CHEXPERT_CLASSES
    r0 = src.records[0]
    assert r0["patient_id"] == "patient00001" and r0["study_id"] == "patient00001/study1"
    assert r0["sex"] == "F" and r0["age"] == "68" and r0["view"] == "AP" and Path(r0["path"]).is_file()
    c = {k: j for j, k in enumerate(data.CHEXPERT_CLASSES)}
    y = src.labels
    assert y[0, c["No Finding"]] == 1 and y[0, c["Pneumothorax"]] == 0 and y[0, c["Edema"]] == 0  # blank -> 0
    assert np.isnan(y[1, c["Cardiomegaly"]]) and y[1, c["Lung Opacity"]] == 1  # -1 -> NaN
    assert [r["split"] for r in src.records] == ["", "", "", "", "val"]
    y = data.read_chexpert(root, uncertain_policy="ones", blank_policy="ignore").labels
    assert y[1, c["Cardiomegaly"]] == 1 and np.isnan(y[0, c["Edema"]]) and y[3, c["Cardiomegaly"]] == 0
    y = data.read_chexpert(root, uncertain_policy="zeros").labels
    assert y[1, c["Cardiomegaly"]] == 0
    assert len(data.read_chexpert(root, views="frontal").records) == 4
    assert len(data.read_chexpert(root, views="lateral").records) == 1
    assert len(data.read_chexpert(root, views="PA").records) == 1
    assert len(data.read_chexpert(root, official_split=False).records) == 4
    with pytest.raises(ValueError, match="unknown view"):
        data.read_chexpert(root, views="sideways")


def test_nih_reader_finds_images_and_official_test(tmp_path):
    root = tmp_path / "nih"
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    rows = [("00000001_000.png", "Cardiomegaly", 0, 1, "058Y", "M", "PA"),
            ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, "58", "M", "PA"),
            ("00000002_000.png", "No Finding", 0, 2, "81", "F", "AP"),
            ("00000003_000.png", "Hernia|Effusion", 0, 3, "30", "F", "PA")]
    root.mkdir()
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(list(r) + [2500, 2048, 0.143, 0.143])
    _img(root / "images_001" / "images" / rows[0][0])
    _img(root / "images_001" / "images" / rows[1][0])
    _img(root / "images_002" / rows[2][0])
    _img(root / "images_002" / rows[3][0])
    (root / "test_list.txt").write_text("00000003_000.png\n")
    src = data.read_nih(root)
    assert all(Path(r["path"]).is_file() for r in src.records)
    c = {k: j for j, k in enumerate(data.NIH_CLASSES)}
    assert src.labels[1, c["Emphysema"]] == 1 and src.labels[1, c["Cardiomegaly"]] == 1
    assert src.labels[2].sum() == 0 and not np.isnan(src.labels).any()  # No Finding = all negative
    assert src.records[0]["age"] == "58" and src.records[1]["study_id"] == "1_1"
    assert [r["split"] for r in src.records] == ["", "", "", "test"]
    assert len(data.read_nih(root, views="AP").records) == 1


def test_vinbigdata_aggregates_radiologists(tmp_path):
    root = tmp_path / "vin"
    rows = [("a", "No finding", 14, "R1"), ("a", "No finding", 14, "R2"), ("a", "No finding", 14, "R3"),
            ("b", "Cardiomegaly", 3, "R1"), ("b", "No finding", 14, "R2"), ("b", "Aortic enlargement", 0, "R3"),
            ("b", "Cardiomegaly", 3, "R3")]
    root.mkdir()
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"])
        for r in rows:
            w.writerow(list(r) + (["", "", "", ""] if r[2] == 14 else [1, 2, 3, 4]))
    _img(root / "train" / "a.png")
    _img(root / "train" / "b.png")
    src = data.read_vinbigdata(root)
    assert src.classes == ["Aortic enlargement", "Cardiomegaly", "No finding"]
    np.testing.assert_array_equal(src.labels, [[0, 0, 1], [1, 1, 0]])
    assert all(Path(r["path"]).is_file() for r in src.records)
    src = data.read_vinbigdata(root, binary=True)
    assert src.classes == ["Abnormal"] and src.labels[:, 0].tolist() == [0, 1]


def test_folder_covidx_roco_readers(tmp_path):
    for cls in ("lung-covid", "lung-oct-cnv"):
        for i in range(3):
            _img(tmp_path / "f" / cls / f"CNV-{i}-{i}.png")
    src = data.read_folder(tmp_path / "f")
    assert src.task == "multiclass" and src.classes == ["lung-covid", "lung-oct-cnv"]
    assert src.labels.dtype == np.int64 and src.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert src.records[0]["patient_id"] == "CNV-0-0"
    assert data.read_folder(tmp_path / "f", patient_pattern=r"-(\d+)-").records[1]["patient_id"] == "1"

    cx = tmp_path / "covidx"
    cx.mkdir()
    (cx / "train.txt").write_text("p1 a.png positive sirm\np2 b.png negative rsna\n")
    (cx / "test.txt").write_text("p3 c.png positive bimcv\n")
    src = data.read_covidx(cx)
    assert src.classes == ["negative", "positive"] and src.labels.tolist() == [1, 0, 1]
    assert src.records[2]["split"] == "test" and src.records[2]["path"].endswith("test/c.png")

    roco = tmp_path / "roco"
    for name, ids in (("train", [1, 2]), ("validation", [3])):
        d = roco / name / "radiology"
        d.mkdir(parents=True)
        (d / "captions.txt").write_text("".join(f"ROCO_{i:05d}\t caption {i} of a CT\n" for i in ids))
    src = data.read_roco(roco)
    assert [r["text"] for r in src.records] == ["caption 1 of a CT", "caption 2 of a CT", "caption 3 of a CT"]
    assert src.labels.shape == (3, 0) and src.records[2]["split"] == "val"
    assert src.records[0]["path"].endswith("train/radiology/images/ROCO_00001.jpg")


# -----------------------------------------------------------------------------
# the real reference CSVs: counts equal an independent count with the csv module


def _count_chexpert_cells(path):
    """Independent count: how often each raw cell value occurs per (class, frontal?)."""
    counts = Counter()
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        cols = [(c, header.index(c)) for c in data.CHEXPERT_CLASSES]
        ifl = header.index("Frontal/Lateral")
        for row in reader:
            frontal = row[ifl] == "Frontal"
            for c, i in cols:
                counts[c, frontal, row[i]] += 1
    return counts


@needs_real
def test_real_chexpert_counts():
    path = REAL / "chexpert_train.csv.gz"
    cells = _count_chexpert_cells(path)
    for uncertain, blank, views in (("ignore", "zeros", "all"), ("ones", "ignore", "frontal")):
        t0 = time.process_time()  # CPU time: robust to other jobs sharing the cores
        src = data.read_chexpert(path, uncertain_policy=uncertain, blank_policy=blank, views=views)
        seconds = time.process_time() - t0
        assert seconds < 10, f"parsing the CheXpert csv took {seconds:.1f}s of CPU"
        fr = (True, False) if views == "all" else (True,)
        assert len(src.records) == {"all": 223414, "frontal": 191027}[views]
        for j, c in enumerate(data.CHEXPERT_CLASSES):
            n = lambda v: sum(cells[c, f, v] for f in fr)  # noqa: E731
            pos = n("1.0") + (n("-1.0") if uncertain == "ones" else 0)
            nan = n("-1.0") if uncertain == "ignore" else n("") if blank == "ignore" else 0
            assert int((src.labels[:, j] == 1).sum()) == pos, (uncertain, blank, c)
            assert int(np.isnan(src.labels[:, j]).sum()) == nan, (uncertain, blank, c)
        if views == "all":
            assert len({r["patient_id"] for r in src.records}) == 64540
        else:
            assert {r["view"] for r in src.records} <= {"AP", "PA", "LL", "RL", "Frontal"}


@needs_real
def test_real_nih_counts():
    path = REAL / "nih_Data_Entry_2017_v2020.csv.gz"
    src = data.read_nih(path)
    counts, pids = Counter(), set()
    with gzip.open(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            counts.update(x for x in row["Finding Labels"].split("|") if x != "No Finding")
            pids.add(row["Patient ID"])
    assert len(src.records) == 112120 and len({r["patient_id"] for r in src.records}) == len(pids)
    assert {c: int(src.labels[:, j].sum()) for j, c in enumerate(data.NIH_CLASSES)} == dict(counts)


@needs_real
def test_real_vinbigdata_aggregation():
    path = REAL / "vinbigdata_train.csv.gz"
    src = data.read_vinbigdata(path)
    per_image = {}
    with gzip.open(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            per_image.setdefault(row["image_id"], set()).add(row["class_name"])
    assert len(src.records) == len(per_image) == 15000
    for j, c in enumerate(src.classes):
        expect = sum(s == {"No finding"} for s in per_image.values()) if c == "No finding" else \
            sum(c in s for s in per_image.values())
        assert int(src.labels[:, j].sum()) == expect, c


@needs_real
def test_real_roco_captions(tmp_path):
    d = tmp_path / "validation" / "radiology"
    d.mkdir(parents=True)
    os.symlink(REAL / "roco_validation_radiology_captions.txt", d / "captions.txt")
    src = data.read_roco(tmp_path)
    assert len(src.records) == 8180 and all(r["text"] for r in src.records)


@needs_real
@pytest.mark.parametrize("name", ["nih_00000001_000.png", "tbx11k_h0001.png", "padchest_or_other_16747_3_1.jpg",
                                  "siim_sample.dcm"])
def test_real_images_decode(name):
    if name.endswith(".dcm"):
        pytest.importorskip("pydicom")
    for mode in ("pad", "center_crop"):
        a = data.decode_image(REAL / "images" / name, 64, mode)
        assert a.shape == (64, 64) and a.dtype == np.uint8 and a.std() > 10


# -----------------------------------------------------------------------------
# decoding modes and resizing


def test_decode_modes_and_resize(tmp_path):
    a16 = (np.arange(30 * 60, dtype=np.uint16).reshape(30, 60) * 2)  # 12-bit-like range
    Image.fromarray(a16).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    out = data.decode_image(tmp_path / "i16.png", 32, "pad")
    assert out.shape == (32, 32) and out.max() >= 240  # min-max scaled, not divided by 65535
    assert (out[:8] == 0).all() and (out[-8:] == 0).all()  # 2:1 wide image padded top and bottom
    crop = data.decode_image(tmp_path / "i16.png", 32, "center_crop")
    assert (crop > 0).mean() > 0.9
    for mode in ("RGB", "RGBA", "LA", "P"):
        p = _img(tmp_path / f"{mode}.png", size=(50, 50), mode=mode)
        ref = data.decode_image(_img(tmp_path / "L.png", size=(50, 50)), 25)
        assert np.abs(data.decode_image(p, 25).astype(int) - ref).max() <= 2, mode


# -----------------------------------------------------------------------------
# splits


def test_split_patient_disjoint_and_stratified():
    rng = np.random.default_rng(0)
    records, labels = [], []
    for p in range(600):
        for _ in range(rng.integers(1, 5)):
            records.append(data.index_record("x", f"p{p}"))
            labels.append((rng.random(4) < [0.5, 0.2, 0.05, 0.01]).astype(np.float32))
    labels = np.array(labels)
    labels[rng.random(labels.shape) < 0.1] = np.nan
    out = data.split_patients(records, labels, "multilabel", 0.15, 0.15, seed=1)
    assert sorted(np.concatenate(list(out.values())).tolist()) == list(range(len(records)))
    pats = {s: {records[i]["patient_id"] for i in r} for s, r in out.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    n = len(records)
    for s, f in (("val", 0.15), ("test", 0.15)):
        assert abs(len(out[s]) / n - f) < 0.03, (s, len(out[s]) / n)
        for c in range(3):
            share = (labels[out[s], c] == 1).sum() / (labels[:, c] == 1).sum()
            assert abs(share - f) < 0.05, (s, c, share)
    # the dataset's own split is kept and a patient split across official files is an error
    records[0]["split"] = "test"
    out = data.split_patients(records, labels, "multilabel", 0.15, 0.15)
    assert {records[i]["patient_id"] for i in out["test"]} == {"p0"}
    assert records[1]["patient_id"] == "p0"  # p0 has several images
    records[1]["split"] = "val"
    with pytest.raises(ValueError, match="official_split=False"):
        data.split_patients(records, labels, "multilabel", 0.15, 0.15)


# -----------------------------------------------------------------------------
# prepare: layout, bad images, resume, stale cache


def _folder_dataset(root, n_per_class=20):
    for j, cls in enumerate(("covid", "normal", "opacity")):
        for i in range(n_per_class):
            _img(root / cls / f"{cls}{i:03d}.png", size=(30 + i, 24 + j), value=(40 * i + 60 * j) % 256)
    return root


def test_prepare_layout_and_loading(tmp_path):
    root = _folder_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    meta = data.prepare(dict(dataset="folder", root=str(root), out_dir=str(out), image_size=16, num_workers=1,
                             chunk_size=7))
    assert meta["task"] == "multiclass" and meta["classes"] == ["covid", "normal", "opacity"]
    assert sum(meta["splits"].values()) == 60 and meta["image_size"] == 16
    assert set(json.load(open(out / "meta.json"))) >= {"name", "source", "task", "classes", "image_size", "splits",
                                                         "mean", "std", "pos_counts", "label_policy", "input_hash",
                                                         "bad_images", "index_columns", "created"}
    assert not (out / "prepare_state.json").exists()
    pats = {}
    for s in data.SPLITS:
        sp = data.PreparedSplit(out, s)
        assert sp.images.shape == (meta["splits"][s], 16, 16) and sp.labels.dtype == np.int64
        assert [int(r["row"]) for r in sp.index] == list(range(len(sp)))
        pats[s] = {r["patient_id"] for r in sp.index}
        for k in range(0, len(sp), 5):  # each row is its decoded source image
            np.testing.assert_array_equal(sp.images[k], data.decode_image(sp.index[k]["path"], 16))
        assert sp.meta["pos_counts"][s] == {c: int((sp.labels == j).sum()) for j, c in enumerate(meta["classes"])}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"])
    train = data.PreparedSplit(out, "train").images
    assert abs(meta["mean"] - train.mean() / 255) < 1e-6 and abs(meta["std"] - (train / 255).std()) < 1e-6


def test_prepare_bad_image_error_and_skip(tmp_path):
    root = _folder_dataset(tmp_path / "raw", n_per_class=6)
    bad = root / "normal" / "broken.png"
    bad.write_bytes(b"\x89PNG not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        data.prepare(dict(dataset="folder", root=str(root), out_dir=str(tmp_path / "o1"), image_size=16, num_workers=1))
    assert not (tmp_path / "o1" / "meta.json").exists()
    meta = data.prepare(dict(dataset="folder", root=str(root), out_dir=str(tmp_path / "o2"), image_size=16,
                             num_workers=1, on_bad_image="skip"))
    assert meta["bad_images"] == [str(bad)] and sum(meta["splits"].values()) == 18
    idx_paths = [r["path"] for s in data.SPLITS for r in data.PreparedSplit(tmp_path / "o2", s).index]
    assert str(bad) not in idx_paths and len(idx_paths) == 18


def test_prepare_resume_is_identical_and_stale_cache_refused(tmp_path):
    root = _folder_dataset(tmp_path / "raw", n_per_class=10)
    cfg = dict(dataset="folder", root=str(root), image_size=16, chunk_size=4, on_bad_image="skip")
    (root / "covid" / "zz_broken.png").write_bytes(b"garbage")
    ref = data.prepare(dict(cfg, out_dir=str(tmp_path / "ref"), num_workers=1))
    out = tmp_path / "resumed"
    assert data.prepare(dict(cfg, out_dir=str(out), num_workers=2, _stop_after_chunks=3)) is None  # "killed"
    assert not (out / "meta.json").exists() and (out / "prepare_state.json").exists()
    assert len(json.load(open(out / "prepare_state.json"))["done"]) == 3
    with pytest.raises(FileNotFoundError, match="meta.json"):
        data.PreparedSplit(out, "train")
    meta = data.prepare(dict(cfg, out_dir=str(out), num_workers=2))
    for k in ("splits", "mean", "std", "pos_counts", "bad_images", "input_hash"):
        assert meta[k] == ref[k], k
    for s in data.SPLITS:
        for name in (f"{s}_images.u8", f"{s}_labels.npy", f"{s}_index.csv"):
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    # same inputs: nothing to do; other inputs: refused unless overwrite
    assert data.prepare(dict(cfg, out_dir=str(out)))["created"] == meta["created"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        data.prepare(dict(cfg, out_dir=str(out), image_size=8))
    assert data.prepare(dict(cfg, out_dir=str(out), image_size=8, overwrite=True))["image_size"] == 8


def test_prepare_cli_main(tmp_path):
    root = _folder_dataset(tmp_path / "raw", n_per_class=4)
    meta = data.main(["--dataset=folder", f"--root={root}", f"--out_dir={tmp_path / 'o'}", "--image_size=12",
                      "--num_workers=1", "--resize_mode=center_crop"])
    assert data.load_meta(tmp_path / "o")["resize_mode"] == "center_crop" == meta["resize_mode"]


def test_load_meta_missing_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python data.py --dataset=phantom"):
        data.load_meta(tmp_path / "phantom")


def test_prepare_phantom(tmp_path):
    pytest.importorskip("phantom")
    meta = data.prepare_phantom(tmp_path / "ph", n_images=300, image_size=32, seed=3)
    assert sum(meta["splits"].values()) == 300 and meta["image_size"] == 32 and meta["task"] == "multilabel"
    sp = data.PreparedSplit(tmp_path / "ph", "val")
    assert sp.labels.shape == (meta["splits"]["val"], len(meta["classes"])) and sp.index[0]["text"]
    pats = {s: {r["patient_id"] for r in data.PreparedSplit(tmp_path / "ph", s).index} for s in data.SPLITS}
    assert not (pats["train"] & pats["val"]) and not (pats["val"] & pats["test"]) and not (pats["train"] & pats["test"])
    again = data.prepare_phantom(tmp_path / "ph", n_images=300, image_size=32, seed=3)
    assert again["created"] == meta["created"]  # cached: same inputs are not prepared twice


# -----------------------------------------------------------------------------
# sampler, loader, eval shards


def test_sampler_pure_epochs_and_ranks():
    n, B = 103, 16
    steps = [data.global_batch_indices(n, B, 7, s) for s in range(40)]
    data._epoch_permutation.cache_clear()  # a "resumed" process has no cache
    assert all(np.array_equal(steps[s], data.global_batch_indices(n, B, 7, s)) for s in (0, 6, 7, 39))
    stream = np.concatenate(steps)
    for e in range(len(stream) // n):  # every epoch visits each index exactly once
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(steps[0], data.global_batch_indices(n, B, 8, 0))
    g = steps[3]
    one = data.rank_micro_indices(g, 0, 1, 4)  # 1 rank x accum 4 == 2 ranks x accum 2 == 4 ranks x accum 1
    for world, accum in ((2, 2), (4, 1)):
        parts = [m for r in range(world) for m in data.rank_micro_indices(g, r, world, accum)]
        assert all(np.array_equal(a, b) for a, b in zip(parts, one))
    assert np.array_equal(np.concatenate(one), g)
    with pytest.raises(AssertionError, match="divisible"):
        data.rank_micro_indices(g, 0, 3, 1)


def _tiny_prepared(tmp_path, n=50, S=8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, S, S), dtype=np.uint8)
    labels = (rng.random((n, 3)) < 0.3).astype(np.float32)
    recs = [data.index_record(f"r{i}", f"p{i}") for i in range(n)]
    data.write_prepared(tmp_path / "tiny", {"train": (images, labels, recs)}, dict(task="multilabel", classes=list("abc")))
    return data.PreparedSplit(tmp_path / "tiny", "train"), images, labels


def test_loader_any_step_any_order(tmp_path):
    split, images, labels = _tiny_prepared(tmp_path)
    loader = data.Loader(split, 4, 2, seed=1, rank=1, world=2, device="cpu", start_step=3)
    for step in (3, 4, 9, 2, 5):
        micro = loader.get(step)
        expect = data.rank_micro_indices(data.global_batch_indices(50, 16, 1, step), 1, 2, 2)
        assert len(micro) == 2
        for (x, y, idx), e in zip(micro, expect):
            assert x.dtype == torch.uint8 and x.shape == (4, 1, 8, 8)
            assert sorted(idx.tolist()) == sorted(e.tolist())
            np.testing.assert_array_equal(x[:, 0].numpy(), images[idx])
            np.testing.assert_array_equal(y.numpy(), labels[idx])
    fresh = data.Loader(split, 4, 2, seed=1, rank=1, world=2, device="cpu", start_step=9)  # "resume" at step 9
    for (a, _, ia), (b, _, ib) in zip(fresh.get(9), loader.get(9)):
        assert torch.equal(a, b) and np.array_equal(ia, ib)
    loader.close()
    fresh.close()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_cover_each_index_once(tmp_path, world):
    split, images, labels = _tiny_prepared(tmp_path)
    seen = []
    for rank in range(world):
        for idx, x, y in data.eval_shards(split, 7, rank, world):
            assert x.shape == (len(idx), 1, 8, 8) and len(y) == len(idx)
            np.testing.assert_array_equal(x[:, 0].numpy(), images[idx])
            seen += idx.tolist()
    assert sorted(seen) == list(range(50))


# -----------------------------------------------------------------------------
# to_float and augment


def test_to_float_norms():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    y = data.to_float(x, 0.2, 0.5, 1)
    torch.testing.assert_close(y.flatten(), torch.tensor([-0.4, 0.0, 1.6]))
    y3 = data.to_float(x, 0.2, 0.5, 3)
    assert y3.shape == (1, 3, 1, 3) and torch.equal(y3[:, 0], y3[:, 2])
    yi = data.to_float(x, 0.2, 0.5, 3, imagenet_norm=True)
    torch.testing.assert_close(yi[0, :, 0, 2], (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD))


def test_augment_deterministic_and_no_flip_by_default():
    B, S = 16, 32
    x = torch.zeros(B, 1, S, S)
    x[:, :, 4:28, 3:12] = 1.0  # a bright block on the left side
    x = data.to_float((x * 200 + 20).to(torch.uint8), 0.4, 0.3, 3)  # normalized, 3 channels, as train.py does
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = data.augment(x, g1), data.augment(x, g2)
    assert torch.equal(a, b) and not torch.equal(a, x) and a.shape == x.shape
    assert not torch.equal(a, data.augment(x, torch.Generator().manual_seed(6)))
    assert torch.equal(a[:, 0], a[:, 2])  # channels stay identical
    left, right = a[..., : S // 2].mean((1, 2, 3)), a[..., S // 2:].mean((1, 2, 3))
    assert (left > right).all()  # never mirrored by default
    f = data.augment(x, torch.Generator().manual_seed(0), hflip=True)
    flipped = f[..., : S // 2].mean((1, 2, 3)) < f[..., S // 2:].mean((1, 2, 3))
    assert 0 < flipped.sum() < B
    ident = data.augment(x, torch.Generator().manual_seed(0), rot=0, scale=(1, 1), translate=0, crop_scale=(1, 1),
                         brightness=0, contrast=0, gamma=0, noise=0)
    torch.testing.assert_close(ident, x)


def _write_dicom(path, arr, photometric, center=None, width=None):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(str(path))
    return path


def test_dicom_monochrome1_and_window(tmp_path):
    a = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))  # 12-bit ramp, left dark
    m2 = data.decode_image(_write_dicom(tmp_path / "m2.dcm", a, "MONOCHROME2"), 64)
    m1 = data.decode_image(_write_dicom(tmp_path / "m1.dcm", a, "MONOCHROME1"), 64)
    assert m2[:, 0].mean() < 5 and m2[:, -1].mean() > 250
    np.testing.assert_array_equal(m1, 255 - m2)  # MONOCHROME1 inverted so that high attenuation is bright
    w = data.decode_image(_write_dicom(tmp_path / "w.dcm", a, "MONOCHROME2", center=1024, width=1024), 64)
    assert (w[:, a[0] <= 512] == 0).all() and (w[:, a[0] >= 1536] == 255).all()  # window clips


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_loader_and_augment_on_cuda(tmp_path):
    split, images, _ = _tiny_prepared(tmp_path)
    loader = data.Loader(split, 4, 1, seed=0, rank=0, world=1, device="cuda")
    x, y, idx = loader.get(0)[0]
    assert x.is_cuda and y.is_cuda and torch.equal(x[:, 0].cpu(), torch.from_numpy(images[idx]))
    xf = data.to_float(x, 0.5, 0.25, 1)
    g1, g2 = torch.Generator(device="cuda").manual_seed(1), torch.Generator(device="cuda").manual_seed(1)
    assert torch.equal(data.augment(xf, g1), data.augment(xf, g2))
    loader.close()
