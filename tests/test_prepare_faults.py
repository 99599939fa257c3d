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
    real_replace, real_finish = os.replace, data._finish_meta

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
    recs = [data._record(f"x{i}", i) for i in range(2)]
    m1 = data.write_prepared(tmp_path / "w1", {"train": (images, np.zeros((2, 1), np.float32), recs)},
                             dict(task="multilabel", classes=["x"]))
    images[1, 3, 3] += 1
    m2 = data.write_prepared(tmp_path / "w2", {"train": (images, np.zeros((2, 1), np.float32), recs)},
                             dict(task="multilabel", classes=["x"]))
    assert m1["data_hash"] != m2["data_hash"]
