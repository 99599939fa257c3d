"""sweep.py: bayes beats random on a cheap synthetic objective, grid, resume, the per-trial timeout and a
train.py stand-in subprocess, and the shipped sweep config."""

import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import configurator  # noqa: E402
import sweep  # noqa: E402

SPACE = {"learning_rate": ("log", 1e-5, 1e-1), "weight_decay": ("uniform", 0.0, 0.2),
         "loss": ("choice", ["bce", "focal", "bce+focal"])}
CALLS = []


def synthetic(p):
    """Maximum 1.0 at lr = 3e-3, wd = 0.05, loss = focal (a smooth bowl in log-lr, a step for the choice)."""
    CALLS.append(p)
    return 1.0 - (math.log10(p["learning_rate"]) - math.log10(3e-3)) ** 2 / 4 - ((p["weight_decay"] - 0.05) / 0.2) ** 2 \
        - (0.0 if p["loss"] == "focal" else 0.3)


def _cfg(tmp_path, **kw):
    cfg = dict(sweep.DEFAULTS, space=SPACE, out_dir=str(tmp_path), n_trials=30, n_candidates=500)
    cfg.update(kw)
    return cfg


def _trials_to_reach(records, target):
    for r in records:
        if r["status"] == "ok" and r["value"] >= target:
            return r["trial"] + 1
    return len(records) + 1


def test_bayes_needs_fewer_trials_than_random():
    import tempfile
    results = {}
    for method in ("random", "bayes"):
        n = []
        for seed in (0, 1):
            with tempfile.TemporaryDirectory() as d:
                recs = sweep.run_sweep(_cfg(d, method=method, seed=seed, n_trials=25), synthetic)
            n.append(_trials_to_reach(recs, 0.97))
        results[method] = n
    assert sum(results["bayes"]) < sum(results["random"]), results
    assert max(results["bayes"]) <= 25, results  # bayes reached 0.97 within the budget on both seeds


def test_proposals_are_deterministic_and_resume(tmp_path):
    full = sweep.run_sweep(_cfg(tmp_path / "a", method="bayes", n_trials=8, n_init=3), synthetic)
    sweep.run_sweep(_cfg(tmp_path / "b", method="bayes", n_trials=5, n_init=3), synthetic)  # "killed" after 5
    CALLS.clear()
    resumed = sweep.run_sweep(_cfg(tmp_path / "b", method="bayes", n_trials=8, n_init=3), synthetic)
    assert len(CALLS) == 3  # only trials 5, 6, 7 ran again
    assert [r["params"] for r in resumed] == [r["params"] for r in full]
    assert len(sweep.read_results(str(tmp_path / "b" / "sweep.jsonl"))) == 8
    with pytest.raises(ValueError, match="another sweep"):
        sweep.run_sweep(_cfg(tmp_path / "b", method="random", n_trials=9), synthetic)


def test_grid_and_failures(tmp_path):
    space = {"learning_rate": ("log", 1e-4, 1e-2), "drop_path": ("choice", [0.0, 0.1])}
    recs = sweep.run_sweep(_cfg(tmp_path, space=space, method="grid", n_trials=100, grid_points=3),
                           lambda p: 1 / 0 if p["drop_path"] == 0.1 else -abs(math.log10(p["learning_rate"]) + 3))
    assert len(recs) == 6 and [r["params"]["learning_rate"] for r in recs[::2]] == pytest.approx([1e-4, 1e-3, 1e-2])
    assert sum(r["status"] == "failed" for r in recs) == 3 and "ZeroDivisionError" in recs[1]["note"]
    best = max((r for r in recs if r["status"] == "ok"), key=lambda r: r["value"])
    assert best["params"]["learning_rate"] == pytest.approx(1e-3)


def test_check_space_errors():
    with pytest.raises(ValueError, match="empty"):
        sweep.check_space({})
    with pytest.raises(ValueError, match="learning_rate"):
        sweep.check_space({"learning_rate": ("log", 0.0, 1.0)})


def test_main_with_a_module_objective(tmp_path):
    recs = sweep.main([f"--out_dir={tmp_path}", "--method=random", "--n_trials=4",
                       f"--space={SPACE!r}", "--objective=test_sweep:synthetic"])
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs)


FAKE_TRAIN = """
import json, os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
lr = float(args["learning_rate"])
if lr > 3e-2:
    time.sleep(60)  # a hung run: the sweep must kill it
os.makedirs(args["out_dir"], exist_ok=True)
with open(os.path.join(args["out_dir"], "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"iter": 10, "split": "val", "auc_macro": 0.9 - abs(lr - 1e-3), "loss": lr}) + "\\n")
    f.write(json.dumps({"final": True, "best_iter": 10, "best_metric": 0.9 - abs(lr - 1e-3)}) + "\\n")
"""


def test_train_subprocess_objective_and_timeout(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    space = {"learning_rate": ("choice", [1e-3, 1e-1, 1e-2])}
    cfg = _cfg(tmp_path / "sw", space=space, method="grid", train_script=str(script), trial_timeout=3,
               train_args="--max_iters=10")
    recs = sweep.run_sweep(cfg)
    assert [r["status"] for r in recs] == ["ok", "timeout", "ok"]
    assert recs[0]["value"] == pytest.approx(0.9) and recs[1]["seconds"] < 30
    assert recs[2]["value"] == pytest.approx(0.9 - 9e-3)
    assert sweep.read_objective(recs[0]["out_dir"], "loss") == pytest.approx(1e-3)


def test_shipped_sweep_configs_load():
    import glob
    files = glob.glob(os.path.join(ROOT, "config", "sweep_*.py"))
    assert files
    for f in files:
        cfg = configurator.load(sweep.DEFAULTS, [f])
        sweep.check_space(cfg["space"])
        rng = np.random.default_rng(0)
        p = sweep.sample(cfg["space"], rng)
        assert set(p) == set(cfg["space"]) and len(sweep.encode(cfg["space"], p)) >= len(p)
