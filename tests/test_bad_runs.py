"""Hostile inputs to a run and to the commands that read it (issue 31): two runs in one folder, a folder holding
only best.pt, a full disk under torch.save, a linear probe on random weights, a missing optional package, files
that are not (or not this kind of) checkpoint, a CI on five patients, a diverged model. Each test fails on the code
before the fix: both runs start, the folder is overwritten, torch's RuntimeError leaves its temp file, a traceback
or scikit-learn's "Input contains NaN" instead of a sentence."""

import contextlib
import json
import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

import common
import configurator
import data
import evaluate
import export
import metrics
import model as models
import model_clip
import tracking
import train

TINY = ["--model=convnext_atto", "--image_size=32", "--batch_size=8", "--eval_batch_size=64", "--log_interval=1",
        "--tensorboard_log=False", "--warmup_iters=1", "--learning_rate=1e-3", "--device=cpu", "--max_iters=2",
        "--eval_interval=2", "--lr_decay_iters=2"]
EVAL = ["--split=test", "--n_bootstrap=0", "--figures=False", "--tensorboard=False", "--device=cpu"]


def classifier_checkpoint(path, data_dir, it=7, nan_head=False):
    """A train.py checkpoint of an untrained convnext_atto at 32 px on the tiny phantom (no training: fast)."""
    meta = data.load_meta(data_dir)
    net = models.build_model("convnext_atto", num_classes=len(meta["classes"]), in_chans=1, image_size=32)
    state = net.state_dict()
    if nan_head:  # what a diverged run leaves: weights that are NaN
        state["head.weight"].fill_(float("nan"))
    ckpt_meta = common.checkpoint_meta(meta, data_dir, ("classes", "task", "mean", "std"), imagenet_norm=False)
    common.save_checkpoint({"model": state, "model_args": net.model_args, "config": {}, "script": "train.py",
                            "iter": it, "meta": ckpt_meta}, str(path))
    return str(path)


def cli(main, argv, monkeypatch, capsys):
    """main run as the command line runs it (configurator.cli): (exit code, stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["x.py", *argv])
    monkeypatch.delenv("NANORAD_TRACEBACK", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        configurator.cli(main)
    return e.value.code, capsys.readouterr().err.strip().splitlines()

# -----------------------------------------------------------------------------
# the run folder: one run at a time, every file a run writes counts, per-process temp files


def test_second_run_into_a_busy_out_dir_is_refused(tmp_path, tiny_phantom, monkeypatch, capsys):
    """While a run holds out_dir (its lock), a second run into it stops at once with the first one's pid and leaves
    the folder alone. Before: both trained, their metrics.jsonl records interleaved and one died on ckpt.pt.tmp."""
    out = tmp_path / "run"
    lock = common.lock_run_dir(str(out))  # the first run (a separate open file: flock refuses it in this process too)
    try:
        (out / "train.log").write_text("the first run's log\n")
        code, err = cli(train.main, [f"--data_dir={tiny_phantom}", f"--out_dir={out}", "--init_from=resume", *TINY],
                        monkeypatch, capsys)
        assert code == 2 and len(err) == 1, err
        assert err[0] == (f"error: out_dir {out} is in use by another run (pid {os.getpid()}): wait for it to end, or "
                          f"choose another --out_dir"), err
        assert sorted(os.listdir(out)) == [".run.lock", "train.log"]  # nothing written, nothing removed
    finally:
        lock.close()
    common.lock_run_dir(str(out)).close()  # released with its file: a crashed run leaves no stale lock


def test_out_dir_holding_only_best_pt_is_a_run(tmp_path):
    """best.pt (+ train.log) without ckpt.pt or metrics.jsonl is still a run: a fresh run is refused, overwrite=True
    removes every file a run writes (and stale temp files) but nothing else. Before: silently overwritten."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("best.pt", "train.log", "ckpt.pt.4242.tmp", "notes.md"):
        (out / name).write_text("x")
    (out / "tb").mkdir()
    cfg = {"out_dir": str(out), "init_from": "scratch", "eval_only": False, "overwrite": False}
    with pytest.raises(FileExistsError, match=rf"{out} already holds a run \(best.pt, tb, train.log\)"):
        common.check_run_dir(cfg)
    common.check_run_dir({**cfg, "overwrite": True})
    assert sorted(os.listdir(out)) == ["notes.md"]


def test_a_save_never_touches_another_writers_temp_file(tmp_path):
    """Two processes saving one path used one temp name (path.tmp): the second truncated the first one's file and
    renamed it away under it. Now each process writes its own temp file."""
    path = str(tmp_path / "ckpt.pt")
    other = tmp_path / "ckpt.pt.tmp"  # another process's save in flight, under the old shared name
    other.write_bytes(b"half of another process's checkpoint")
    common.save_checkpoint({"iter": 1}, path)
    assert other.read_bytes() == b"half of another process's checkpoint"
    assert common.load_checkpoint(path)["iter"] == 1 and str(os.getpid()) in common.temp_path(path)

# -----------------------------------------------------------------------------
# a full disk: torch.save's RuntimeError, the temp file, the resume after it


@contextlib.contextmanager
def small_disk(folder, size="300k"):
    """A real file system of `size` (tmpfs) at folder; skips when this process may not mount (needs root)."""
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()[:200]}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_under_torch_save_says_so_and_removes_the_temp_file(tmp_path):
    """A 300 KB file system and an 800 KB checkpoint: torch's zip writer fails with RuntimeError ("unexpected pos"),
    not OSError. The error names the folder and the bytes, no temp file is left, the previous checkpoint loads."""
    with small_disk(tmp_path / "disk") as disk:
        path = str(disk / "ckpt.pt")
        common.save_checkpoint({"iter": 1, "model": {"w": torch.ones(3)}}, path)
        with pytest.raises(OSError) as e:
            common.save_checkpoint({"iter": 2, "model": {"w": torch.zeros(200_000)}}, path)
        msg = str(e.value)
        assert f"no space left on {disk} while writing {path} (" in msg and "bytes written before the disk filled" in msg
        assert os.listdir(disk) == ["ckpt.pt"], os.listdir(disk)
        assert common.load_checkpoint(path)["iter"] == 1


def test_resume_after_a_full_disk(tmp_path, tiny_phantom):
    """What a full disk leaves: a temp file of a save that never reached its rename and a metrics.jsonl record cut
    short. The resume removes the first, drops the second and continues. Before: it died in truncate_metrics."""
    out = tmp_path / "run"
    args = [f"--data_dir={tiny_phantom}", f"--out_dir={out}", *TINY]
    train.main(args)
    stale = out / f"ckpt.pt.{os.getpid() + 1}.tmp"
    stale.write_bytes(b"\0" * 100_000)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "iter": 3, "lo')
    final = train.main([*args, "--init_from=resume", "--max_iters=3", "--lr_decay_iters=3", "--eval_interval=3"])
    assert final["iters"] == 3 and not stale.exists()
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iter"] for r in records if r.get("split") == "val" and not r.get("final")] == [0, 2, 3]
    log = (out / "train.log").read_text()
    assert f"removed 1 temp file(s) of interrupted saves: {stale.name}" in log and "dropped 1 unreadable line" in log

# -----------------------------------------------------------------------------
# a linear probe needs features


def test_linear_probe_on_random_weights_is_refused(tmp_path, tiny_phantom, monkeypatch, capsys):
    base = [f"--data_dir={tiny_phantom}", *TINY, "--finetune_mode=linear_probe"]
    for extra in (["--init_from=scratch"], ["--init_from=resume"]):  # resume with no ckpt.pt yet starts from scratch
        out = tmp_path / extra[0][-6:]
        code, err = cli(train.main, [*base, f"--out_dir={out}", *extra], monkeypatch, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: finetune_mode='linear_probe'"), err
        assert "random weights" in err[0] and "--init_from=pretrained --pretrained_path=" in err[0], err
        assert not out.exists()  # the fresh folder is removed

# -----------------------------------------------------------------------------
# optional packages: one sentence with the pip command, and what does not need them still runs


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_phantom):
    return classifier_checkpoint(tmp_path_factory.mktemp("tiny_ckpt") / "best.pt", tiny_phantom)


FAST_EXPORT = ["--latency_iters=1", "--latency_warmup=0", "--latency_batch=2", "--max_eval_images=16"]


def test_export_all_without_onnx_still_quantizes_and_prunes(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """--to=all without onnx: one line with the pip command, int8.pt and pruned.pt written. Before: torch's
    OnnxExporterError after a 20-line traceback, and nothing written. --to=onnx alone: exit 2, one line."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    records = export.main([f"--ckpt={tiny_ckpt}", "--to=all", f"--out_dir={tmp_path}", *FAST_EXPORT])
    assert sorted(records) == ["int8", "pruned"]
    assert {"int8.pt", "pruned.pt"} <= set(os.listdir(tmp_path)) and "model.onnx" not in os.listdir(tmp_path)
    out = capsys.readouterr().out
    assert ("onnx: skipped, export.py --to=onnx needs onnx, which is not installed: pip install onnx onnxruntime; "
            "the other exports go on") in out
    code, err = cli(export.main, [f"--ckpt={tiny_ckpt}", "--to=onnx", f"--out_dir={tmp_path}"], monkeypatch, capsys)
    assert code == 2 and err == ["error: export.py --to=onnx needs onnx, which is not installed: pip install onnx "
                                 "onnxruntime"], err


@pytest.mark.parametrize("trackers,module,pip", [("mlflow", "mlflow", "pip install mlflow"),
                                                 ("wandb", "wandb", "pip install wandb"),
                                                 ("ray", "ray", 'pip install "ray[train]"')])
def test_missing_tracker_package_names_the_pip_command(tmp_path, monkeypatch, trackers, module, pip):
    monkeypatch.setitem(sys.modules, module, None)
    for name in [m for m in sys.modules if m.startswith(f"{module}.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=rf"^trackers includes '{trackers}' needs {module}[.\w]*, which is not "
                                          rf"installed: {re.escape(pip)}$"):
        tracking.Logger(str(tmp_path), {"trackers": trackers})


def test_require_tells_missing_from_broken(tmp_path, monkeypatch):
    """tracking.require, the one optional import: a package that is absent says pip install; one that is there but
    whose own import fails (a dependency of its own is missing) says so, with that error."""
    name = f"nanorad_fake_{uuid.uuid4().hex[:8]}"
    with pytest.raises(ImportError, match=rf"^x.py --y needs {name}, which is not installed: pip install {name}$"):
        tracking.require(name, name, "x.py --y")
    (tmp_path / f"{name}.py").write_text("import nanorad_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=rf"{name}, which is installed but does not import \(ModuleNotFoundError: "
                                          rf"No module named 'nanorad_absent_dependency'\)"):
        tracking.require(name, name, "x.py --y")

# -----------------------------------------------------------------------------
# files that are not checkpoints, or not this kind


def test_text_file_as_checkpoint_is_not_a_checkpoint(tmp_path, monkeypatch, capsys):
    """Before: "holds Python objects ... load it only if you trust it" (or KeyError: 101)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("epoch 3: loss 0.41\n")
    code, err = cli(evaluate.main, [f"--ckpt={notes}", *EVAL], monkeypatch, capsys)
    assert code == 2 and err == [f"error: {notes} is not a checkpoint, not a file torch.save wrote (a text file "
                                 f"starting 'epoch 3: loss 0.41'): pass a .pt / .pth file that torch.save wrote, e.g. "
                                 f"out/<run>/best.pt"], err


def test_truncated_pretrained_weights_are_named(tmp_path, tiny_ckpt):
    """Before: torch's "PytorchStreamReader failed reading zip archive: failed finding central directory"."""
    cut = tmp_path / "weights.pth"
    whole = open(tiny_ckpt, "rb").read()
    cut.write_bytes(whole[: len(whole) // 2])
    net = models.build_model("convnext_atto", num_classes=10, in_chans=1, image_size=32)
    with pytest.raises(ValueError, match=rf"^{cut} is corrupt or truncated \({len(whole) // 2} bytes; the zip archive "
                                         rf"has no central directory: cut short\): copy or download it again$"):
        models.load_pretrained(net, str(cut))


def test_clip_checkpoint_as_teacher_names_both_kinds(tmp_path, tiny_phantom):
    """--teacher_ckpt=<a CLIP>: before, TypeError from build_model(**the CLIP's model_args)."""
    clip = model_clip.build_clip(embed_dim=16, image_model="convnext_atto", image_size=32, in_chans=1, vocab_size=64,
                                 context_length=8, text_width=16, text_layers=1, text_heads=2)
    path = str(tmp_path / "clip.pt")
    common.save_checkpoint({"model": clip.state_dict(), "model_args": clip.model_args, "script": "train_clip.py"}, path)
    with pytest.raises(ValueError, match=rf"^--teacher_ckpt={path} is a train_clip.py checkpoint; --teacher_ckpt needs "
                                         rf"a train.py checkpoint \(a train_clip.py checkpoint goes to train_clip.py "
                                         rf"--teacher_ckpt, "):
        train.load_teacher(path, "cpu", data.load_meta(tiny_phantom)["classes"])

# -----------------------------------------------------------------------------
# evaluation: a CI on a handful of patients, a diverged model


def test_ci_on_few_patients_is_flagged(tmp_path):
    """Five test patients, every AUC 1.000 and its CI [1.000, 1.000]: flagged in the table and in the JSON. Forty
    patients with 20 positives and 20 negatives per class: not flagged."""
    rng = np.random.default_rng(0)
    y = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [1, 1]], np.float32)
    rep = metrics.evaluation_report(y * 0.8 + 0.1, y, ["A", "B"], "multilabel", np.arange(5), n_bootstrap=50)
    assert rep["per_class"]["A"]["auc_ci"] == [1.0, 1.0]
    assert rep["per_class"]["A"]["ci_warning"] == "only 3 positives, 2 negatives, 5 patients (< 20): the CI is unreliable"
    assert rep["auc_macro_ci_warning"] == "only 5 patients (< 20): the CI is unreliable"
    table = metrics.format_report(rep)
    assert "[1.000, 1.000]* 1.000" in table and "* small sample: a bootstrap CI on fewer than 20" in table, table
    saved = json.loads(json.dumps(metrics.to_json(rep)))
    assert saved["per_class"]["B"]["ci_warning"].startswith("only 3 positives") and saved["auc_macro_ci_warning"]
    y = np.tile(np.array([[1, 0], [0, 1]], np.float32), (20, 1))
    rep = metrics.evaluation_report(rng.random(y.shape), y, ["A", "B"], "multilabel", np.arange(40), n_bootstrap=50)
    assert not rep["per_class"]["A"]["ci_warning"] and not rep["auc_macro_ci_warning"]
    assert "small sample" not in metrics.format_report(rep)


def test_diverged_model_is_named_with_its_iteration(tmp_path, tiny_phantom, monkeypatch, capsys):
    """NaN weights -> NaN probabilities. Before: scikit-learn's "Input contains NaN" after a traceback."""
    path = classifier_checkpoint(tmp_path / "best.pt", tiny_phantom, it=7, nan_head=True)
    code, err = cli(evaluate.main, [f"--ckpt={path}", *EVAL], monkeypatch, capsys)
    n = len(data.PreparedSplit(tiny_phantom, "test"))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path} (saved at iter 7) outputs NaN or inf for {n} of {n} images: the run "
                             f"diverged. Train it again with a lower --learning_rate, --grad_clip"), err
