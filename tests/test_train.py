"""train.py end to end through its real entry point, train.main([...]), on the phantom."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import configurator
import losses
import train
from conftest import ROOT

TINY = ["--model=convnext_atto", "--image_size=32", "--batch_size=8", "--eval_batch_size=64",
        "--log_interval=5", "--tensorboard_log=False", "--warmup_iters=2", "--learning_rate=1e-3"]


def run(tmp_path, data_dir, *extra, name="run"):
    out = str(tmp_path / name)
    final = train.main([f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, *extra])
    return out, final


def weights(out, name="ckpt.pt"):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)["model"]


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_run_folder_explains_itself(tmp_path, tiny_phantom):
    out, final = run(tmp_path, tiny_phantom, "--max_iters=6", "--eval_interval=3", "--lr_decay_iters=6", "--keep_last=1")
    for f in ("config.json", "train.log", "metrics.jsonl", "ckpt.pt", "best.pt"):
        assert os.path.exists(os.path.join(out, f)), f
    assert len([f for f in os.listdir(out) if f.startswith("ckpt_")]) == 1  # keep_last=1 deleted the older one
    recs = records(out)
    # the eval records, and a step record per log line (log_interval=5 and the last step)
    assert [(r["split"], r["iter"]) for r in recs if not r.get("final")] == \
        [("val", 0), ("val", 3), ("train", 5), ("train", 6), ("val", 6)]
    assert recs[-1]["final"] and recs[-1]["best_iter"] in (0, 3, 6)
    assert set(recs[0]["auc"]) == set(json.load(open(os.path.join(tiny_phantom, "meta.json")))["classes"])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)  # plain types only
    assert ckpt["iter"] == 6 and ckpt["model_args"]["model"] == "convnext_atto"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert json.load(open(os.path.join(out, "config.json")))["max_iters"] == 6


def test_resume_is_exact(tmp_path, tiny_phantom):
    common = ["--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10", "--drop_path=0.1", "--mixup_alpha=0.2",
              "--augment=True"]
    straight, _ = run(tmp_path, tiny_phantom, *common, name="straight")
    half, _ = run(tmp_path, tiny_phantom, *common[1:], "--max_iters=10", name="resumed")
    run(tmp_path, tiny_phantom, *common, "--init_from=resume", name="resumed")
    a, b = weights(straight), weights(half)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, tiny_phantom):
    out, final = run(tmp_path, tiny_phantom, "--max_iters=2", "--eval_interval=2", "--init_from=resume")
    assert final["iters"] == 2


def test_linear_probe_leaves_backbone_unchanged(tmp_path, tiny_phantom):
    out, _ = run(tmp_path, tiny_phantom, "--max_iters=0", name="init")
    probe, _ = run(tmp_path, tiny_phantom, "--max_iters=5", "--finetune_mode=linear_probe", "--init_from=pretrained",
                   f"--pretrained_path={out}/ckpt.pt", "--weight_decay=0.1", name="probe")
    before, after = weights(out), weights(probe)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("head") for k in changed), changed


@pytest.mark.parametrize("loss", ["bce", "focal", "bce+focal"])
def test_multilabel_losses_train(tmp_path, tiny_phantom, loss):
    out, final = run(tmp_path, tiny_phantom, "--max_iters=4", "--eval_interval=4", f"--loss={loss}", "--pos_weight=auto")
    assert np.isfinite(records(out)[-2]["loss"])


def test_losses_mask_unknown_labels():
    logits = torch.randn(4, 3)
    y = torch.tensor([[1.0, 0.0, float("nan")], [0.0, float("nan"), 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    known = ~torch.isnan(y)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], y[known])
    assert torch.allclose(losses.masked_bce(logits, y), ref)
    # focal with gamma=0 and alpha=0.5 is half the BCE
    assert torch.allclose(losses.masked_focal(logits, y, 0.5, 0.0), 0.5 * ref)
    assert torch.isfinite(losses.masked_focal(logits, y, 0.25, 2.0))


def test_multiclass_ce(tmp_path):
    import data
    rng = np.random.default_rng(0)
    n, classes = 120, ["a", "b", "c"]
    y = rng.integers(0, 3, n)
    imgs = (rng.random((n, 32, 32)) * 60).astype(np.uint8)
    for c in range(3):  # class c: a bright square at a class-specific place
        imgs[y == c, 4 + 8 * c: 12 + 8 * c, 8:16] = 220
    records_ = [{"path": f"x{i}.png", "patient_id": f"p{i}", "study_id": f"s{i}"} for i in range(n)]
    splits = {"train": (imgs[:80], y[:80], records_[:80]), "val": (imgs[80:100], y[80:100], records_[80:100]),
              "test": (imgs[100:], y[100:], records_[100:])}
    d = str(tmp_path / "mc")
    data.write_prepared(d, splits, {"name": "toy", "task": "multiclass", "classes": classes, "image_size": 32, "source": "test"})
    out, final = run(tmp_path, d, "--max_iters=30", "--eval_interval=30", "--loss=ce", "--label_smoothing=0.1",
                     "--augment=False", "--learning_rate=2e-3")
    rec = records(out)[-2]
    assert rec["acc"] > 0.8 and "f1_macro" in rec


def test_bad_config_key_names_the_key(tmp_path, tiny_phantom):
    with pytest.raises(configurator.ConfigError, match="learning_rat.*learning_rate"):
        run(tmp_path, tiny_phantom, "--learning_rat=0.1")
    with pytest.raises(configurator.ConfigError, match="max_iters"):
        run(tmp_path, tiny_phantom, "--max_iters=ten")


def test_nan_guard_stops_and_keeps_checkpoint(tmp_path, tiny_phantom, monkeypatch):
    # the first optimizer step leaves NaN weights, as a diverging run's do, so the loss of iteration 1 is NaN (no knob
    # makes a run diverge now: learning_rate=1e30 is refused before the run, issue 31)
    import common
    step = common.optimizer_step

    def diverging_step(optimizer, *args):
        norm = step(optimizer, *args)
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.fill_(float("nan"))
        return norm
    monkeypatch.setattr(common, "optimizer_step", diverging_step)
    with pytest.raises(FloatingPointError, match="iter 1"):
        run(tmp_path, tiny_phantom, "--max_iters=50", "--eval_interval=1000", "--warmup_iters=0", "--grad_clip=0")
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_missing_data_dir_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.py"):
        train.main([f"--data_dir={tmp_path}/nope", "--dataset=chexpert", f"--out_dir={tmp_path}/o", "--tensorboard_log=False"])


def test_other_model_family_is_refused(tmp_path, tiny_phantom):
    out, _ = run(tmp_path, tiny_phantom, "--max_iters=0", name="atto")
    with pytest.raises(ValueError, match="convnext_atto.*vit_tiny|vit_tiny.*convnext_atto"):
        run(tmp_path, tiny_phantom, "--model=vit_tiny", "--init_from=pretrained", f"--pretrained_path={out}/ckpt.pt", name="vit")


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path, tiny_phantom):
    """2 gloo processes x accumulation 1 == 1 process x accumulation 2: same weights, same eval AUC."""
    args = [f"--data_dir={tiny_phantom}", *TINY, "--max_iters=10", "--lr_decay_iters=10", "--eval_interval=10",
            "--gradient_accumulation_steps=2", "--augment=False", "--dropout=0.0", "--drop_path=0.0", "--device=cpu"]
    single = str(tmp_path / "single")
    train.main([*args, f"--out_dir={single}"])
    ddp = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), *args, f"--out_dir={ddp}"], cwd=ROOT, env=env, timeout=600,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Grad strides do not match" not in run.stderr, run.stderr[-4000:]  # DDP's layout warning (ConvNeXtBlock)
    a, b = weights(single), weights(ddp)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst
    ra, rb = records(single)[-2], records(ddp)[-2]
    assert abs(ra["auc_macro"] - rb["auc_macro"]) < 1e-6


@pytest.mark.slow
@pytest.mark.learning
def test_phantom_run_learns(quickstart_run, learning):
    """The quick start itself (python train.py's defaults): the phantom must be learnable. The issue's bar for this
    test is macro AUC >= 0.85; the quick start's own target is >= 0.90 (measured 0.913 and 0.920)."""
    final = quickstart_run["final"]
    learning("quick start val auc_macro", final["best_metric"], 0.90)


def test_focal_is_torchvisions_under_the_nan_mask():
    """model.masked_focal (torchvision.ops.sigmoid_focal_loss on the known cells) equals the hand-written
    focal loss train.py had before (Lin et al. 2017, eq. 5), soft mixup targets included."""
    torch.manual_seed(0)
    logits = torch.randn(16, 5) * 3
    y = (torch.rand(16, 5) < 0.4).float()
    y[torch.rand(16, 5) < 0.2] = float("nan")
    y[:4] = torch.where(torch.isnan(y[:4]), y[:4], torch.rand(4, 5))  # soft targets, as after mixup
    for alpha, gamma in ((0.25, 2.0), (0.5, 0.0), (0.75, 1.5)):
        mask = ~torch.isnan(y)
        t = torch.where(mask, y, torch.zeros_like(y))
        ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * t + (1 - p) * (1 - t)
        old = ((alpha * t + (1 - alpha) * (1 - t)) * (1 - p_t) ** gamma * ce * mask).sum() / mask.sum()
        torch.testing.assert_close(losses.masked_focal(logits, y, alpha, gamma), old, rtol=1e-6, atol=1e-7)
