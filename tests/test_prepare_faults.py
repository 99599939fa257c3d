"""Off the happy path of prepare (issue 13): a kill inside finalization, damaged files, empty splits, classes
absent from a split, paths that leave the dataset root, and the content hash (data_hash)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import readers  # noqa: E402

FILES = [f"{s}_{x}" for s in data.SPLITS for x in ("images.u8", "labels.npy", "index.csv")]
SAME_META = ("splits", "mean", "std", "pos_counts", "bad_images", "input_hash", "data_hash", "split_hashes")


def _png(path, value, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (np.add.outer(np.arange(size[1]), np.arange(size[0])) * 5 + value) % 256
    Image.fromarray(a.astype(np.uint8)).save(path)


def _raw(tmp_path, n_per_class=8, broken=True):
    root = tmp_path / "raw"
    for j, cls in enumerate(("covid", "normal", "opacity")):
        for i in range(n_per_class):
            _png(root / cls / f"p{j}{i:02d}_img0.png", 30 * i + 70 * j)
    if broken:
        (root / "covid" / "p099_img0.png").write_bytes(b"not a png")  # a skipped row: the copy path of finalization
    return root


def _cfg(root, out, **kw):
    return dict(dict(dataset="folder", root=str(root), out_dir=str(out), image_size=12, chunk_size=5, num_workers=1,
                     on_bad_image="skip"), **kw)


def _assert_same(out, ref):
    for name in FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    m, r = json.load(open(out / "meta.json")), json.load(open(ref / "meta.json"))
    for k in SAME_META:
        assert m[k] == r[k], k
    assert not (out / "prepare_state.json").exists()


class Killed(Exception):
    pass


@pytest.mark.parametrize("broken", [False, True])
@pytest.mark.parametrize("kill_after", ["train_images.u8", "val_images.u8", "test_images.u8", "train_labels.npy",
                                        "_finish_meta"])
def test_kill_inside_finalization_then_rerun_gives_the_uninterrupted_bytes(tmp_path, monkeypatch, kill_after, broken):
    root = _raw(tmp_path, broken=broken)
    ref = tmp_path / "ref"
    data.prepare(_cfg(root, ref))
    out = tmp_path / "out"
    real_replace = os.replace

    def replace(src, dst):  # the move happens, then the process "dies" before anything else
        real_replace(src, dst)
        if str(dst).endswith(kill_after):
            raise Killed(dst)

    def finish(*a, **k):
        raise Killed("before meta.json")

    monkeypatch.setattr(data.os, "replace", replace)
    if kill_after == "_finish_meta":
        monkeypatch.setattr(data, "_finish_meta", finish)
    with pytest.raises(Killed):
        data.prepare(_cfg(root, out))
    monkeypatch.undo()
    assert not (out / "meta.json").exists()
    assert (out / "train_images.u8").exists()  # the interrupted run had moved at least train into place
    data.prepare(_cfg(root, out))
    _assert_same(out, ref)
    train = data.PreparedSplit(out, "train").images
    assert train.reshape(len(train), -1).max(1).min() > 0, "an all-zero image in train"


def test_os_exit_inside_finalization_subprocess(tmp_path):
    """A real process death (os._exit: no finally, no cleanup) right after val's image file was moved into place."""
    root = _raw(tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "out"
    data.prepare(_cfg(root, ref))
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import data
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if str(dst).endswith("val_images.u8"):
                os._exit(9)
        os.replace = replace
        data.prepare({_cfg(root, out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 9, proc.stderr
    assert (out / "val_images.u8").exists() and not (out / "meta.json").exists()
    data.prepare(_cfg(root, out))
    _assert_same(out, ref)


def test_a_damaged_final_file_is_an_error_not_meta_json(tmp_path, monkeypatch):
    """What the rerun used to do (a zero file over a finished split) is now caught by the sums check."""
    root = _raw(tmp_path, broken=False)
    out = tmp_path / "out"
    monkeypatch.setattr(data, "_finish_meta", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        data.prepare(_cfg(root, out))
    monkeypatch.undo()
    size = os.path.getsize(out / "train_images.u8")
    with open(out / "train_images.u8", "wb") as f:
        f.truncate(size)  # same size, all zeros
    with pytest.raises(ValueError, match="pixel sums.*overwrite=True"):
        data.prepare(_cfg(root, out))
    assert not (out / "meta.json").exists()
    assert data.prepare(_cfg(root, out, overwrite=True))["splits"]["train"] > 0


# -----------------------------------------------------------------------------
# data_hash: a content hash of images and labels, per split and combined


def test_data_hash_same_data_same_hash_one_pixel_differs(tmp_path):
    root = _raw(tmp_path, broken=False)
    a = data.prepare(_cfg(root, tmp_path / "a"))
    b = data.prepare(_cfg(root, tmp_path / "b", num_workers=2, chunk_size=3))  # other chunking, same content
    assert len(a["data_hash"]) == 64 and a["data_hash"] == b["data_hash"] and a["split_hashes"] == b["split_hashes"]
    assert a["input_hash"] == b["input_hash"]
    # the hash is the sha256 of what is on disk: recompute it independently from the files
    import hashlib
    for s in data.SPLITS:
        img = hashlib.sha256((tmp_path / "a" / f"{s}_images.u8").read_bytes()).hexdigest()
        y = np.load(tmp_path / "a" / f"{s}_labels.npy")
        lab = hashlib.sha256(f"{y.dtype.str}{y.shape}".encode() + y.tobytes()).hexdigest()
        assert a["split_hashes"][s] == hashlib.sha256(f"images:{img}\nlabels:{lab}".encode()).hexdigest()
    # one changed pixel in one source image -> another data_hash (and another split hash for that split only)
    victim = root / "normal" / "p103_img0.png"
    arr = np.array(Image.open(victim))
    arr[5, 5] ^= 1
    Image.fromarray(arr).save(victim)
    c = data.prepare(_cfg(root, tmp_path / "c"))
    assert c["data_hash"] != a["data_hash"]
    assert sum(c["split_hashes"][s] != a["split_hashes"][s] for s in data.SPLITS) == 1
    # the phantom / write_prepared path hashes the same way
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    recs = [data.index_record(f"x{i}", i) for i in range(2)]
    m1 = data.write_prepared(tmp_path / "w1", {"train": (images, np.zeros((2, 1), np.float32), recs)},
                             dict(task="multilabel", classes=["x"]))
    images[1, 3, 3] += 1
    m2 = data.write_prepared(tmp_path / "w2", {"train": (images, np.zeros((2, 1), np.float32), recs)},
                             dict(task="multilabel", classes=["x"]))
    assert m1["data_hash"] != m2["data_hash"]


# -----------------------------------------------------------------------------
# folder data sets: patient ids are an explicit decision


def _patients_by_split(out):
    return {s: {r["patient_id"] for r in data.PreparedSplit(out, s).index} for s in data.SPLITS}


@pytest.mark.parametrize("fmt,expect", [("p{p:03d}_img{k}", "p{p:03d}"), ("patient{p}-view{k}", "patient{p}"),
                                        ("{p:08d}_{k:03d}", "{p:08d}"), ("person{p}_bacteria_{k}", "person{p}")])
def test_folder_patient_id_inferred_from_file_names_no_overlap(tmp_path, fmt, expect):
    root = tmp_path / "raw"
    for p in range(24):  # 24 patients x 3 images, a class per patient
        for k in range(3):
            _png(root / ("a", "b", "c")[p % 3] / (fmt.format(p=p, k=k) + ".png"), 11 * p + 3 * k)
    src = readers.read_folder(root)
    assert src.patient_id_source.startswith("inferred") and not src.warnings
    assert sorted({r["patient_id"] for r in src.records}) == sorted(expect.format(p=p) for p in range(24))
    meta = data.prepare(_cfg(root, tmp_path / "out"))
    assert meta["patient_id_source"].startswith("inferred")
    pats = _patients_by_split(tmp_path / "out")
    assert all(pats[s] for s in data.SPLITS) and not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) \
        and not (pats["val"] & pats["test"])
    for s in data.SPLITS:  # every image of a patient is in that patient's split
        for r in data.PreparedSplit(tmp_path / "out", s).index:
            assert Path(r["path"]).stem.startswith(r["patient_id"])


def test_folder_without_patient_ids_warns_and_records_file(tmp_path):
    root = tmp_path / "raw"
    for i in range(12):  # no id rule fits: one name without a prefix breaks "every stem matches"
        _png(root / ("a", "b")[i % 2] / (f"p{i // 2:03d}_img{i % 2}.png" if i else "scan.png"), 9 * i)
    with pytest.warns(UserWarning, match="every FILE is its own patient.*patient_pattern"):
        src = readers.read_folder(root)
    assert src.patient_id_source == "file" and src.records[0]["patient_id"] == Path(src.records[0]["path"]).stem
    with pytest.warns(UserWarning, match="its own patient"):
        meta = data.prepare(_cfg(root, tmp_path / "out"))
    saved = json.load(open(tmp_path / "out" / "meta.json"))
    assert saved["patient_id_source"] == "file" == meta["patient_id_source"]
    assert any("its own patient" in w for w in saved["warnings"])
    # the explicit pattern is the fix, and changes the input hash (a folder prepared without it is not reused)
    meta2 = data.prepare(_cfg(root, tmp_path / "out2", patient_pattern=r"^(p\d+|scan)"))
    assert meta2["patient_id_source"].startswith("patient_pattern")
    assert all("own patient" not in w for w in meta2["warnings"])
    assert meta2["input_hash"] != meta["input_hash"]


# -----------------------------------------------------------------------------
# empty splits are refused; classes absent from a split are warned about


def test_empty_split_refused_with_a_sentence(tmp_path):
    root = tmp_path / "raw"
    for i in range(20):
        _png(root / ("a", "b")[i % 2] / f"img{i}.png", 20 * i)
    with pytest.raises(ValueError, match=r"the test split is empty .*--test_frac"):
        with pytest.warns(UserWarning):
            data.prepare(_cfg(root, tmp_path / "out", test_frac=0.0))
    assert not (tmp_path / "out" / "meta.json").exists()


def test_class_absent_from_a_split_is_named(tmp_path):
    root = tmp_path / "raw"
    for i in range(30):
        _png(root / "common" / f"p{i:03d}_0.png", 7 * i)
        _png(root / "common" / f"p{i:03d}_1.png", 7 * i + 1)
    _png(root / "rare" / "p900_0.png", 5)  # one patient: the class can be in one split only
    _png(root / "rare" / "p900_1.png", 6)
    with pytest.warns(UserWarning, match=r"class 'rare' has no images in the (train|val|test) split"):
        meta = data.prepare(_cfg(root, tmp_path / "out"))
    absent = [w for w in meta["warnings"] if "'rare'" in w]
    assert len(absent) == 2 and {s for s in data.SPLITS if meta["pos_counts"][s]["rare"] == 0} == \
        {s for s in data.SPLITS if any(f"the {s} split" in w for w in absent)}


# -----------------------------------------------------------------------------
# paths read from a dataset's files must stay inside its root


CHEX_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + readers.CHEXPERT_CLASSES


def _chexpert_csv(base, rows):
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "train.csv", "w") as f:
        f.write(",".join(CHEX_HEADER) + "\n")
        for path in rows:
            f.write(f"{path},Male,50,Frontal,AP" + ",1.0" + ",0.0" * 13 + "\n")


def _outside(dataset, root):
    cfg = dict(data.DEFAULTS, dataset=dataset, root=str(root))
    with pytest.raises(ValueError, match=r"leave the dataset root .*allow_outside_root=True"):
        readers.read_dataset(cfg)
    src = readers.read_dataset(dict(cfg, allow_outside_root=True))
    assert any("allow_outside_root=True" in w for w in src.warnings)
    return src


def test_chexpert_path_leaving_root_refused(tmp_path):
    base = tmp_path / "chex" / "CheXpert-v1.0-small"
    _png(base / "train/patient00001/study1/view1_frontal.jpg", 3)
    _chexpert_csv(base, ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                         "CheXpert-v1.0-small/../../../../etc/patient00002/study1/view1_frontal.jpg"])
    assert len(readers.read_chexpert(base).records) == 2  # the reader alone reads; read_dataset (prepare) checks
    _outside("chexpert", base)
    _chexpert_csv(base, ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"])
    readers.read_dataset(dict(data.DEFAULTS, dataset="chexpert", root=str(base)))  # inside: fine


def test_covidx_absolute_name_refused(tmp_path):
    cx = tmp_path / "covidx"
    cx.mkdir()
    (cx / "train.txt").write_text("p1 a.png positive sirm\np2 /etc/passwd negative rsna\n")
    (cx / "test.txt").write_text("p3 c.png positive bimcv\n")
    src = _outside("covidx", cx)
    assert "/etc/passwd" in [r["path"] for r in src.records]
    (cx / "train.txt").write_text("p1 a.png positive sirm\np2 ../../b.png negative rsna\n")
    _outside("covidx", cx)


def test_nih_image_index_leaving_root_refused(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
    (root / "Data_Entry_2017_v2020.csv").write_text(header + "00000001_000.png,No Finding,0,1,58,M,PA\n"
                                                    "../../../x/00000002_000.png,Hernia,0,2,60,F,PA\n")
    _png(root / "images" / "00000001_000.png", 1)
    _outside("nih", root)
