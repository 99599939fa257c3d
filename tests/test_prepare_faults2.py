"""Hostile inputs to prepare (issue 31): a full disk, a dead decode worker, a wrong or ambiguous patient rule, a
typo in --data_dir, a folder that is not root/<class>/, a fixed image after a skip, a bad knob value, and a data set
whose images all fail. Each case ends in one sentence naming the thing and the fix, never a hang or a silent run."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import readers  # noqa: E402


def _png(path, value, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (np.add.outer(np.arange(size[1]), np.arange(size[0])) * 5 + value) % 256
    Image.fromarray(a.astype(np.uint8)).save(path)


def _folder(root, n_patients=12, per_patient=2, name="p{p:03d}_img{k}", size=(20, 16)):
    """root/<a|b>/<name>.png: n_patients x per_patient images, a class per patient."""
    for p in range(n_patients):
        for k in range(per_patient):
            _png(root / ("a", "b")[p % 2] / (name.format(p=p, k=k) + ".png"), 13 * p + 5 * k, size)
    return root


def _cfg(root, out, **kw):
    return dict(dict(dataset="folder", root=str(root), out_dir=str(out), image_size=12, chunk_size=4, num_workers=1),
                **kw)


@pytest.fixture
def alarm():
    """alarm(seconds): a hang becomes a TimeoutError (a lock wait in the main thread is interruptible)."""
    def fire(*_):
        raise TimeoutError("prepare hung")
    old = signal.signal(signal.SIGALRM, fire)
    yield signal.alarm
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# -----------------------------------------------------------------------------
# a full disk, a worker that dies


@pytest.fixture
def small_disk(tmp_path):
    """A 300 kB tmpfs: a real full disk (root only; skipped where mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_is_one_sentence_not_a_hang(tmp_path, small_disk, alarm):
    """With worker processes (the default): 40 images at 256 px need 2.6 MB on a 300 kB disk. Before: a worker died
    of SIGBUS on its memmap write and the pool waited forever. Now: refused before anything is written, with a
    sentence naming the folder and the bytes (the command line prints it as one `error:` line, rc 2)."""
    root = _folder(tmp_path / "raw", n_patients=20)
    out = small_disk / "out"
    alarm(30)
    with pytest.raises(ValueError, match=rf"^not enough disk space for {re.escape(str(out))}/: this prepare writes "
                                         rf"about [\d,]+ bytes \([\d.]+ MiB\) more there and [\d,]+ bytes .* are "
                                         rf"free; free some space or choose another --out_dir"):
        data.prepare(_cfg(root, out, image_size=256, num_workers=2, chunk_size=5))
    alarm(0)
    assert not list(out.iterdir()), "files left behind that a rerun could trust"


def test_disk_full_after_the_check_is_the_same_sentence(tmp_path, small_disk, monkeypatch, alarm):
    """Another writer fills the disk between the check and the allocation: the partial image file's blocks are
    reserved up front (posix_fallocate), so that is an ENOSPC here, not a SIGBUS later; no partial is left."""
    root = _folder(tmp_path / "raw", n_patients=20)
    out = small_disk / "out"
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: SimpleNamespace(total=1 << 40, used=0, free=1 << 40))
    alarm(30)
    with pytest.raises(ValueError, match=rf"not enough disk space for {re.escape(str(out))}/: .* bytes"):
        data.prepare(_cfg(root, out, image_size=256, num_workers=2, chunk_size=5))
    alarm(0)
    assert not list(out.glob("*.partial")) and not (out / "meta.json").exists()


_REAL_DECODE = data._decode_chunk


def _dies_on_chunk_1(task):
    if task[0] == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer (or a SIGBUS) ends a worker: no exception, no reply
    return _REAL_DECODE(task)


@pytest.mark.skipif(sys.platform != "linux", reason="the workers must be forked to inherit the patched function")
def test_dead_worker_is_an_error_not_a_hang(tmp_path, monkeypatch, alarm):
    root = _folder(tmp_path / "raw")
    monkeypatch.setattr(data, "_decode_chunk", _dies_on_chunk_1)  # the forked workers inherit it
    alarm(30)
    with pytest.raises(RuntimeError, match="decode worker process died.*rerun the same command to resume"):
        data.prepare(_cfg(root, tmp_path / "out", num_workers=2))
    alarm(0)
    monkeypatch.undo()
    meta = data.prepare(_cfg(root, tmp_path / "out", num_workers=2))  # the rerun resumes and finishes
    assert sum(meta["splits"].values()) == 24


# -----------------------------------------------------------------------------
# folder sets: the patient rule is printed, and refused when ambiguous


def _patients_by_split(out):
    return {s: {r["patient_id"] for r in data.PreparedSplit(out, s).index} for s in data.SPLITS}


def test_patient_rule_is_printed_with_three_examples(tmp_path, capsys):
    root = _folder(tmp_path / "raw")
    data.prepare(_cfg(root, tmp_path / "out"))
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("patients:")]
    assert len(line) == 1 and line[0].startswith("patients: 12 from inferred: p<digits>"), line
    examples = re.findall(r"(?:a|b)/(p\d{3})_img\d\.png -> (p\d{3})", line[0])
    assert len(examples) == 3 and all(f == p for f, p in examples) and len(set(examples)) == 3, line[0]
    data.prepare(_cfg(root, tmp_path / "out"))  # every prepare, also one with nothing to do
    assert "patients: 12 from inferred" in capsys.readouterr().out


def test_site_prefix_taken_as_patient_is_refused(tmp_path):
    """site3_pt007.png: the '<id>_' rule took 'site3' as the patient, so 36 of 40 patients crossed splits, silently."""
    root = tmp_path / "raw"
    for site in range(8):
        for p in range(5):
            _png(root / ("a", "b")[p % 2] / f"site{site}_pt{5 * site + p:03d}.png", 7 * site + 11 * p)
    with pytest.raises(ValueError, match=r"'site\d' one patient with 5 of 40 images \(12%.*--patient_pattern="):
        data.prepare(_cfg(root, tmp_path / "out"))
    assert not (tmp_path / "out" / "meta.json").exists()
    meta = data.prepare(_cfg(root, tmp_path / "out", patient_pattern=r"_(pt\d+)"))  # the knob the error names
    assert meta["patient_id_source"].startswith("patient_pattern")
    pats = _patients_by_split(tmp_path / "out")
    assert sum(len(v) for v in pats.values()) == 40 and not (pats["train"] & (pats["val"] | pats["test"]))


def test_several_patient_rules_that_disagree_are_refused(tmp_path, monkeypatch):
    """The check is on the rules, not on today's two: a third rule that also fits every name but groups them
    otherwise makes the inferred id ambiguous."""
    rules = readers.FOLDER_PATIENT_RULES + [("a last s<digits> token", re.compile(r"^[^_]*_(s\d+)$"))]
    monkeypatch.setattr(readers, "FOLDER_PATIENT_RULES", rules)
    monkeypatch.setattr(data, "FOLDER_PATIENT_RULES", rules)
    root = _folder(tmp_path / "raw", name="p{p:03d}_s{k}")
    with pytest.raises(ValueError, match=r"2 patient-id rules fit .*12 patients.*2 patients.*--patient_pattern="):
        data.prepare(_cfg(root, tmp_path / "out"))


# -----------------------------------------------------------------------------
# a typo in --data_dir is not a phantom


def test_typo_in_data_dir_is_an_error_not_a_phantom(tmp_path):
    (tmp_path / "mylab").mkdir()
    (tmp_path / "mylab" / "meta.json").write_text("{}")  # a prepared folder beside the typo
    cfg = dict(data_dir=str(tmp_path / "my_lab"), dataset="phantom", image_size=16, phantom_images=60)
    dist, log = SimpleNamespace(master=True, ddp=False), SimpleNamespace(line=print)
    with pytest.raises(FileNotFoundError, match=rf"my_lab/meta.json not found \(did you mean {tmp_path}/mylab\?\).*"
                                                rf"python data.py --dataset=phantom --out_dir={tmp_path}/my_lab"):
        data.load_run_data(cfg, dist, log)
    assert not (tmp_path / "my_lab").exists()
    # the quick start's case: a missing folder named phantom* is generated, as before
    meta = data.load_run_data(dict(cfg, data_dir=str(tmp_path / "phantom16")), dist, log)
    assert sum(meta["splits"].values()) == 60


def test_typo_in_gpt_data_dir_is_an_error_not_a_phantom(tmp_path):
    """train_gpt.py generates its phantom (image, report) sets only in a missing folder named phantom*, as train.py."""
    import train_gpt
    dist = SimpleNamespace(master=True, ddp=False)
    cfg = dict(dataset="phantom_reports")
    with pytest.raises(FileNotFoundError, match="my_reports/meta.json not found"):
        train_gpt.ensure_data(cfg, str(tmp_path / "my_reports"), dist)
    assert not (tmp_path / "my_reports").exists()


# -----------------------------------------------------------------------------
# the layout, a fixed file, a knob value, all images bad


def test_folder_with_one_class_is_refused(tmp_path):
    """root/images/*.png prepared as a one-class set (class 'images', 100% positive), with only a patient warning."""
    root = _folder(tmp_path / "raw")
    for f in (root / "b").iterdir():
        f.rename(root / "a" / f.name)
    (root / "b").rmdir()
    with pytest.raises(ValueError, match=r"24 images of 1 class \['a'\]: a classifier needs at least two classes "
                                         r"\(the layout is root/<class>/\*\.png"):
        data.prepare(_cfg(root, tmp_path / "out"))


def test_rerun_after_fixing_a_skipped_image_sees_it(tmp_path):
    root = _folder(tmp_path / "raw")
    victim = root / "a" / "p000_img0.png"
    good = victim.read_bytes()
    victim.write_bytes(b"not a png")
    meta = data.prepare(_cfg(root, tmp_path / "out", on_bad_image="skip"))
    assert meta["bad_images"] == [str(victim)] and sum(meta["splits"].values()) == 23
    victim.write_bytes(good)
    with pytest.raises(FileExistsError, match="prepared from other inputs.*--overwrite=True"):
        data.prepare(_cfg(root, tmp_path / "out", on_bad_image="skip"))  # before: "already prepared; nothing to do"
    meta = data.prepare(_cfg(root, tmp_path / "out", on_bad_image="skip", overwrite=True))
    assert meta["bad_images"] == [] and sum(meta["splits"].values()) == 24


def test_bad_resize_mode_is_a_knob_error_not_bad_images(tmp_path):
    """--resize_mode=crop failed every image as "bad"; the advice (--on_bad_image=skip) then dropped them all, rc 0."""
    root = _folder(tmp_path / "raw")
    with pytest.raises(ValueError, match=r"^--resize_mode=crop is not one of pad, center_crop: did you mean "
                                         r"--resize_mode=center_crop\?$"):
        data.prepare(_cfg(root, tmp_path / "out", resize_mode="crop", on_bad_image="skip"))
    assert not (tmp_path / "out" / "meta.json").exists()
    meta = data.prepare(_cfg(root, tmp_path / "out", resize_mode="center_crop"))
    assert meta["bad_images"] == [] and sum(meta["splits"].values()) == 24


def test_every_image_bad_is_an_error_naming_the_split(tmp_path):
    """All bad with --on_bad_image=skip wrote empty splits, rc 0, and train.py then divided by zero."""
    root = _folder(tmp_path / "raw")
    for f in root.rglob("*.png"):
        f.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"the train and val and test splits are empty after skipping .*train: (\d+) "
                                         r"of \1 failed.*p0\d\d_img\d\.png: "):
        data.prepare(_cfg(root, tmp_path / "out", on_bad_image="skip"))
    assert not (tmp_path / "out" / "meta.json").exists()


def test_folder_whose_name_is_not_utf8_prepares_and_reads_back(tmp_path):
    """A dataset root named in latin-1 bytes (an old archive unpacked as is): prepare hashed the paths with a plain
    .encode() and wrote the index CSV as strict UTF-8, both of which raised on the undecodable name."""
    root = _folder(Path(os.fsdecode(bytes(tmp_path) + b"/r\xe9sum\xe9")))
    out = tmp_path / "out"
    data.prepare(_cfg(root, out))
    rows = data.PreparedSplit(str(out), "train").index
    assert rows and all(os.path.isfile(r["path"]) for r in rows)
