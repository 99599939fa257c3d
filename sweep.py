"""
Hyperparameter search over train.py knobs: grid, random, or Bayesian optimisation (a Gaussian-process
surrogate with a Matern kernel; each trial maximises expected improvement over random candidates).

    python sweep.py config/sweep_convnext_phantom.py                      # bayes, 20 trials of ~2 min on a CPU
    python sweep.py config/sweep_convnext_phantom.py --method=random --n_trials=40 --out_dir=out/sweep_random
    python sweep.py config/sweep_convnext_phantom.py --trial_timeout=300  # kill a trial after 5 min: recorded failed

The search space lives in the config file (see config/sweep_convnext_phantom.py):
    space = {"learning_rate": ("log", 1e-4, 1e-2), "drop_path": ("uniform", 0.0, 0.3),
             "batch_size": ("int", 16, 64), "loss": ("choice", ["bce", "focal", "bce+focal"])}

Each trial is `python train.py <train_config> <train_args> --<knob>=<value> ... --out_dir=<out_dir>/trial_007`;
its objective is the best validation metric (the final record of its metrics.jsonl: best_metric, or --metric=<key>
of the best eval record). Every finished trial is appended to <out_dir>/sweep.jsonl at once, so a killed sweep
started again with the same command skips the finished trials and proposes the same next ones (proposals depend
only on the seed and the results so far). At the end: the leaderboard.

`--objective=module:function` replaces train.py by a Python function params -> float (cheap synthetic
objectives in the tests; an objective that raises is recorded as failed).
"""

import importlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
from scipy import stats

import configurator

# -----------------------------------------------------------------------------
# config: a sweep file (config/sweep_*.py) and --key=value overrides
train_config = ""         # config file given to train.py first ("" = train.py's own defaults)
train_args = ""           # fixed train.py arguments for every trial, space-separated ("--max_iters=300 --device=cpu")
space = {}                # knob -> ("log", lo, hi) | ("uniform", lo, hi) | ("int", lo, hi) | ("choice", [values])
method = "bayes"          # grid | random | bayes
n_trials = 20             # trials in total (grid: the first n_trials grid points)
seed = 0                  # the proposals are a function of (seed, results so far)
grid_points = 3           # grid: values per continuous dimension (log-spaced for "log")
n_init = 5                # bayes: random trials before the GP takes over (~2x the dimensions is usual)
n_candidates = 2000       # bayes: candidates scored by expected improvement per trial (a quarter near the best)
xi = 0.01                 # bayes: EI margin, in units of the normalised objective; larger = more exploration
mode = "max"              # max (auc_macro, auc_comp5, ap_macro, acc) | min (loss)
metric = ""               # "" = the run's best_metric (train.py's select_metric) | a key of its best eval record
trial_timeout = 0         # seconds of wall clock per trial: the run is killed and recorded failed (0 = no limit)
out_dir = "out/sweep"     # trials go to out_dir/trial_NNN, results to out_dir/sweep.jsonl
objective = "train"       # train (a train.py subprocess) | module:function (params dict -> float)
train_script = "train.py"  # the script a trial runs (tests point it at a stand-in)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, dict))}
# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per knob; CHECKS: across knobs)
RANGES = dict(n_init="[0, inf)", grid_points="[1, inf)")

# -----------------------------------------------------------------------------
# the search space: sampling, a grid, and an encoding into [0, 1]^d for the GP


def check_space(space):
    if not space:
        raise ValueError("the search space is empty: set space = {knob: (kind, ...)} in the sweep config file "
                         "(see config/sweep_convnext_phantom.py)")
    for k, d in space.items():
        kind = d[0] if isinstance(d, (tuple, list)) and d else None
        if kind in ("log", "uniform", "int") and len(d) == 3 and d[1] < d[2] and (kind != "log" or d[1] > 0):
            continue
        if kind == "choice" and len(d) == 2 and len(d[1]) > 0:
            continue
        raise ValueError(f"space[{k!r}] = {d!r}: expected ('log', lo>0, hi), ('uniform', lo, hi), ('int', lo, hi) "
                         f"with lo < hi, or ('choice', [values])")


def sample(space, rng):
    p = {}
    for k, d in space.items():
        if d[0] == "log":
            p[k] = float(math.exp(rng.uniform(math.log(d[1]), math.log(d[2]))))
        elif d[0] == "uniform":
            p[k] = float(rng.uniform(d[1], d[2]))
        elif d[0] == "int":
            p[k] = int(rng.integers(d[1], d[2] + 1))
        else:
            p[k] = d[1][int(rng.integers(len(d[1])))]
    return p


def grid(space, points):
    axes = []
    for k, d in space.items():
        if d[0] == "log":
            axes.append([float(v) for v in np.geomspace(d[1], d[2], points)])
        elif d[0] == "uniform":
            axes.append([float(v) for v in np.linspace(d[1], d[2], points)])
        elif d[0] == "int":
            axes.append(sorted({int(round(v)) for v in np.linspace(d[1], d[2], points)}))
        else:
            axes.append(list(d[1]))
    return [dict(zip(space, combo)) for combo in itertools.product(*axes)]


def encode(space, p):
    """params -> a point in [0, 1]^d: log / linear position in the range, one-hot for a choice."""
    x = []
    for k, d in space.items():
        if d[0] == "log":
            x.append((math.log(p[k]) - math.log(d[1])) / (math.log(d[2]) - math.log(d[1])))
        elif d[0] in ("uniform", "int"):
            x.append((p[k] - d[1]) / (d[2] - d[1]))
        else:
            x += [float(p[k] == v) for v in d[1]]
    return x


def mutate(space, p, rng, scale=0.1):
    """A neighbour of p: each dimension moved with probability 1/2 by ~scale of its range (local search)."""
    q = dict(p)
    for k, d in space.items():
        if rng.random() < 0.5:
            continue
        if d[0] == "log":
            lo, hi = math.log(d[1]), math.log(d[2])
            q[k] = float(math.exp(np.clip(math.log(p[k]) + rng.normal(0, scale * (hi - lo)), lo, hi)))
        elif d[0] == "uniform":
            q[k] = float(np.clip(p[k] + rng.normal(0, scale * (d[2] - d[1])), d[1], d[2]))
        elif d[0] == "int":
            q[k] = int(np.clip(round(p[k] + rng.normal(0, max(1.0, scale * (d[2] - d[1])))), d[1], d[2]))
        elif rng.random() < 0.3:
            q[k] = d[1][int(rng.integers(len(d[1])))]
    return q


# -----------------------------------------------------------------------------
# proposals


def expected_improvement(mu, sigma, best, xi):
    """EI for maximisation (Jones et al. 1998): E[max(f - best - xi, 0)] under N(mu, sigma^2)."""
    sigma = np.maximum(sigma, 1e-12)
    imp = mu - best - xi
    z = imp / sigma
    return imp * stats.norm.cdf(z) + sigma * stats.norm.pdf(z)


def propose(cfg, trial, history):
    """The params of trial `trial`, from the seed and the finished trials before it (history)."""
    space = cfg["space"]
    rng = np.random.default_rng([cfg["seed"], trial])
    if cfg["method"] == "grid":
        return grid(space, cfg["grid_points"])[trial]
    if cfg["method"] == "random" or (cfg["method"] == "bayes" and trial < cfg["n_init"]):
        return sample(space, rng)
    if cfg["method"] != "bayes":
        raise ValueError(f"method must be grid, random or bayes, got {cfg['method']!r}")
    ok = [r for r in history if r["status"] == "ok"]
    if len(ok) < 2:
        return sample(space, rng)
    import threadpoolctl
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
    sign = 1.0 if cfg["mode"] == "max" else -1.0
    worst = min(sign * r["value"] for r in ok)
    # failed / timed-out trials count as the worst result seen, so the search moves away from them
    X = np.array([encode(space, r["params"]) for r in history])
    y = np.array([sign * r["value"] if r["status"] == "ok" else worst for r in history])
    d = X.shape[1]
    kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern(np.full(d, 0.3), (1e-2, 1e1), nu=2.5) + WhiteKernel(1e-4, (1e-8, 1e-1))
    gp = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=1, random_state=int(rng.integers(2**31)))
    # a 30-point GP is tiny: multi-threaded BLAS only adds contention; the kernel-bound warnings are expected
    # on a handful of points and say nothing the leaderboard does not
    with threadpoolctl.threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(X, y)
    best = max(ok, key=lambda r: sign * r["value"])
    n_local = cfg["n_candidates"] // 4
    cands = [sample(space, rng) for _ in range(cfg["n_candidates"] - n_local)]
    cands += [mutate(space, best["params"], rng) for _ in range(n_local)]
    mu, sd = gp.predict(np.array([encode(space, c) for c in cands]), return_std=True)
    # EI on the normalised scale, so xi means the same whatever the metric's units
    scale = y.std() if y.std() > 0 else 1.0
    ei = expected_improvement(mu / scale, sd / scale, y.max() / scale, cfg["xi"])
    return cands[int(np.argmax(ei))]


# -----------------------------------------------------------------------------
# objectives


def _arg(v):
    return repr(v) if isinstance(v, float) else str(v)


def read_objective(run_dir, metric):
    """The trial's result: best_metric of the final record, or `metric` of the eval record at best_iter."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    finals = [r for r in recs if r.get("final")]
    if not finals:
        return None
    if not metric:
        v = finals[-1].get("best_metric")
    else:
        at = [r for r in recs if not r.get("final") and r.get("iter") == finals[-1].get("best_iter")]
        v = at[-1].get(metric) if at else None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def run_train_trial(cfg, params, trial_dir):
    """One train.py subprocess. Returns (status, value, note); a run past trial_timeout is killed."""
    os.makedirs(trial_dir, exist_ok=True)
    cmd = [sys.executable, cfg["train_script"]] + ([cfg["train_config"]] if cfg["train_config"] else [])
    cmd += cfg["train_args"].split() + [f"--{k}={_arg(v)}" for k, v in params.items()] + [f"--out_dir={trial_dir}", "--overwrite=True"]
    with open(os.path.join(trial_dir, "sweep_stdout.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=cfg["trial_timeout"] or None)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: torchrun / dataloader children too
            proc.wait()
            return "timeout", None, f"killed after {cfg['trial_timeout']} s"
    if rc != 0:
        with open(os.path.join(trial_dir, "sweep_stdout.log")) as f:
            tail = f.read().strip().splitlines()[-1:]
        return "failed", None, f"exit {rc}: {tail[0] if tail else ''}"
    v = read_objective(trial_dir, cfg["metric"])
    if v is None:
        return "failed", None, f"no result in {trial_dir}/metrics.jsonl (metric {cfg['metric'] or 'best_metric'!r})"
    return "ok", v, ""


def load_function(path):
    if ":" not in path:
        raise ValueError(f"objective={path!r}: use 'train' or 'module:function' (e.g. mysearch:score)")
    mod, fn = path.split(":", 1)
    return getattr(importlib.import_module(mod), fn)


# -----------------------------------------------------------------------------
# the sweep


def read_results(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def leaderboard(records, mode, top=10):
    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: r["value"], reverse=(mode == "max"))
    lines = [f"{'rank':>4} {'trial':>5} {'value':>9} {'sec':>7}  params"]
    for i, r in enumerate(ok[:top]):
        ps = " ".join(f"--{k}={_arg(v) if not isinstance(v, float) else f'{v:.4g}'}" for k, v in r["params"].items())
        lines.append(f"{i + 1:>4} {r['trial']:>5} {r['value']:>9.4f} {r['seconds']:>7.1f}  {ps}")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines.append(f"{len(failed)} trial(s) failed: " + ", ".join(f"{r['trial']} ({r['status']})" for r in failed))
    return "\n".join(lines)


def run_sweep(cfg, objective_fn=None):
    """Run (or resume) the sweep described by cfg; objective_fn(params) -> float replaces train.py."""
    check_space(cfg["space"])
    os.makedirs(cfg["out_dir"], exist_ok=True)
    path = os.path.join(cfg["out_dir"], "sweep.jsonl")
    records = read_results(path)
    signature = {"method": cfg["method"], "seed": cfg["seed"], "space": json.loads(json.dumps(cfg["space"]))}
    for r in records:
        if r.get("signature") != signature:
            raise ValueError(f"{path} holds trials of another sweep ({r.get('signature')}); use a new --out_dir "
                             f"or delete that file to start over")
    n = cfg["n_trials"]
    if cfg["method"] == "grid":
        size = len(grid(cfg["space"], cfg["grid_points"]))
        print(f"grid of {size} points" + (f", running the first {n}" if n < size else ""))
        n = min(n, size)
    done = {r["trial"] for r in records}
    if done:
        print(f"resuming {path}: {len(done)} trial(s) finished, {n - len([t for t in done if t < n])} to go")
    for trial in range(n):
        if trial in done:
            continue
        history = [r for r in records if r["trial"] < trial]
        params = propose(cfg, trial, history)
        trial_dir = os.path.join(cfg["out_dir"], f"trial_{trial:03d}")
        t0 = time.time()
        if objective_fn is None:
            status, value, note = run_train_trial(cfg, params, trial_dir)
        else:
            try:
                status, value, note = "ok", float(objective_fn(params)), ""
            except Exception as e:  # recorded and printed: a failed trial is a result of the sweep
                status, value, note = "failed", None, f"{type(e).__name__}: {e}"
        rec = {"trial": trial, "params": params, "status": status, "value": value, "seconds": round(time.time() - t0, 2),
               "note": note, "out_dir": trial_dir if objective_fn is None else "", "signature": signature}
        records.append(rec)
        with open(path, "a") as f:  # one line per finished trial: a killed sweep loses at most the running one
            f.write(json.dumps(rec) + "\n")
        ps = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"trial {trial:3d} | {status:7s} | {'-' if value is None else f'{value:.4f}':>8} | "
              f"{rec['seconds']:6.1f} s | {ps}{' | ' + note if note else ''}", flush=True)
    print(leaderboard(records, cfg["mode"]))
    return records


def main(argv=None):
    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)
    if cfg["mode"] not in ("max", "min"):
        raise ValueError(f"mode must be max or min, got {cfg['mode']!r}")
    fn = None if cfg["objective"] == "train" else load_function(cfg["objective"])
    return run_sweep(cfg, fn)


if __name__ == "__main__":
    configurator.cli(main)
