"""
Many runs -> tables, mean +- 95% CI, p-values. Reads what train.py and evaluate.py leave in each run folder:
config.json, metrics.jsonl (the best validation eval + the final record) and eval_<tag>.json / predictions_<tag>.csv.

Two arms (e.g. scratch vs fine-tuned, 10 seeds each):
    python compare.py --runs 'out/scratch_s*' --vs 'out/pretrained_s*'          # -> out/comparison.{md,csv}
  per metric and per class: mean +- std and the t-based 95% CI of each arm, Welch's t-test and Mann-Whitney U
  across runs, a paired t-test and Wilcoxon signed-rank when the runs pair by seed (same _s<seed> suffix), and,
  for two single models scored on the same test set, DeLong's test on each class's ROC AUC.

Every run group (data set x model x init) in one performance table:
    python compare.py --table 'out/*'                                            # -> out/table.{md,csv}
    python compare.py --table 'out/*' --group_by=data_dir,model,init_from,finetune_mode

Ablation over any config key, p-values against a baseline row:
    python compare.py --ablation 'out/fusion_*' --group_by=modalities --baseline=vision   # -> ablation.{md,csv}

Launching seeds: train.py for seeds 0..9 into out/<name>_s<seed> (sequential; torchrun when --nproc > 1),
then evaluate.py on the test split; a finished seed is skipped, an interrupted one resumes:
    python compare.py --launch --seeds=10 --name=scratch --evaluate -- config/convnext_chexpert.py --max_iters=5000
"""

import argparse
import csv
import glob
import json
import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
from scipy import stats

import configurator
import metrics

HERE = os.path.dirname(os.path.abspath(__file__))
# auc_comp5 (the CheXpert competition AUC, Irvin et al. 2019) exists only for CheXpert runs: there it is the first row
HEADLINE = ("auc_comp5", "auc_macro", "ap_macro", "acc", "balanced_acc", "f1_macro", "f1_micro", "exact_match",
            "auc_micro", "ap_micro", "sensitivity_macro", "specificity_macro", "ece", "loss")

# -----------------------------------------------------------------------------
# reading run folders


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _flatten(prefix, rec):
    """{'auc_macro': .8, 'auc': {'Edema': .9}} -> {'<prefix>_auc_macro': .8, '<prefix>_auc/Edema': .9}."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and k in HEADLINE:
            out[f"{prefix}_{k}"] = float(v)
        elif k in ("auc", "ap") and isinstance(v, dict):
            for cls, x in v.items():
                out[f"{prefix}_{k}/{cls}"] = float("nan") if x is None else float(x)
    return out


def load_run(path):
    """One run folder -> {dir, name, seed, config, metrics (flat dict of floats), predictions {tag: csv path},
    data_hash (of the prepared data the run used; None when unknown)}."""
    name = os.path.basename(os.path.normpath(path))
    cfg = {}
    if os.path.exists(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    values, preds = {}, {}
    mpath = os.path.join(path, "metrics.jsonl")
    if os.path.exists(mpath):
        recs = read_jsonl(mpath)
        finals = [r for r in recs if r.get("final")]
        evals = [r for r in recs if not r.get("final") and r.get("split", "val") == "val"]
        best = None
        if finals and finals[-1].get("best_iter") is not None:
            at = [r for r in evals if r.get("iter") == finals[-1]["best_iter"]]
            best = at[-1] if at else None
        if best is None and evals:  # no final record (still running / killed): the best eval so far
            key = (finals[-1].get("select_metric") if finals else None) or "auc_macro"
            scored = [r for r in evals if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            best = (min if key == "loss" else max)(scored, key=lambda r: r[key]) if scored else evals[-1]
        if best is not None:
            values.update(_flatten("val", best))
        if finals:
            best_iter = finals[-1].get("best_iter")
            values["best_iter"] = float("nan") if best_iter is None else float(best_iter)  # iteration 0 is a real 0
            if isinstance(finals[-1].get("time_s"), (int, float)):
                values["time_s"] = float(finals[-1]["time_s"])
    hashes = []
    for ep in sorted(glob.glob(os.path.join(path, "eval_*.json"))):
        tag = os.path.basename(ep)[len("eval_"):-len(".json")]
        with open(ep) as f:
            rep = json.load(f)
        values.update(_flatten(tag, rep))
        hashes.append(rep.get("data_hash"))
        if rep.get("predictions") and os.path.exists(os.path.join(path, rep["predictions"])):
            preds[tag] = os.path.join(path, rep["predictions"])
    m = re.search(r"_s(\d+)$", name)
    seed = int(m.group(1)) if m else cfg.get("seed")
    return {"dir": path, "name": name, "seed": seed, "config": cfg, "metrics": values, "predictions": preds,
            "data_hash": next((h for h in hashes if h), None) or run_data_hash(cfg)}


def run_data_hash(cfg):
    """The data_hash of a run's prepared data: its config's (checkpointed runs), else its data_dir's meta.json."""
    if cfg.get("data_hash"):
        return cfg["data_hash"]
    meta_path = os.path.join(str(cfg.get("data_dir", "")), "meta.json")
    if cfg.get("data_dir") and os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f).get("data_hash")
    return None


def data_hash_warning(arms):
    """A sentence when the arms of a comparison ({name: runs}) were trained or evaluated on different prepared data
    (different data_hash), "" otherwise: their numbers then differ by the data as well as by the method."""
    seen = {name: sorted({r["data_hash"] for r in runs if r.get("data_hash")}) for name, runs in arms.items()}
    distinct = {h for hs in seen.values() for h in hs}
    if len(distinct) <= 1:
        return ""
    parts = "; ".join(f"{name}: {', '.join(h[:12] for h in hs) or 'unknown'}" for name, hs in seen.items())
    return (f"warning: the runs used different prepared data (data_hash {parts}); the comparison mixes data "
            f"differences with method differences: prepare once and train every arm on that folder")


def find_runs(pattern):
    dirs = sorted(d for d in glob.glob(pattern) if os.path.isdir(d) and (
        os.path.exists(os.path.join(d, "metrics.jsonl")) or glob.glob(os.path.join(d, "eval_*.json"))))
    if not dirs:
        raise FileNotFoundError(f"no run folders match {pattern!r} (a run folder holds metrics.jsonl from train.py "
                                f"or eval_*.json from evaluate.py)")
    return [load_run(d) for d in dirs]


# -----------------------------------------------------------------------------
# statistics across runs


def summarize(values, alpha=0.05):
    """n, mean, std (ddof=1) and the t-based CI of the mean over runs; NaNs dropped."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = v.size
    if n == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "ci_lo": float("nan"), "ci_hi": float("nan")}
    mean = float(v.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": float("nan"), "ci_lo": float("nan"), "ci_hi": float("nan")}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_lo": mean - half, "ci_hi": mean + half}


def _finite(x):
    return [v for v in x if v is not None and math.isfinite(v)]


def _varies(v):
    """Whether values differ by more than float rounding (1e-12 relative): a t statistic over a spread of ~1e-16,
    e.g. runs that all scored 0.7, is rounding noise divided by rounding noise (scipy: p = 0 or 1e-16)."""
    v = np.asarray(v, dtype=np.float64)
    return v.size > 1 and float(np.ptp(v)) > 1e-12 * max(1.0, float(np.abs(v).max()))


def two_arm_tests(a, b, pairs=None):
    """p-values for 'arm A and arm B have the same metric': Welch's t-test and Mann-Whitney U (unpaired), and
    with pairs = [(a_i, b_i)] matched by seed, the paired t-test and the Wilcoxon signed-rank test. The t-tests
    are NaN (not run) where their variance is zero: every run of both arms alike, or every paired difference."""
    a, b = _finite(a), _finite(b)
    out = {"welch_p": float("nan"), "mwu_p": float("nan"), "paired_t_p": float("nan"), "wilcoxon_p": float("nan"),
           "n_pairs": 0}
    if len(a) >= 2 and len(b) >= 2 and (_varies(a) or _varies(b)):  # Welch needs a spread within some arm
        with warnings.catch_warnings():  # an arm of equal runs has variance 0, exactly what scipy warns about
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            out["welch_p"] = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    if a and b:
        out["mwu_p"] = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    pairs = [(x, y) for x, y in (pairs or []) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) >= 2:
        x, y = np.array(pairs).T
        out["n_pairs"] = len(pairs)
        if _varies(x - y):  # paired t needs varying differences; Wilcoxon some non-zero difference
            out["paired_t_p"] = float(stats.ttest_rel(x, y).pvalue)
        if np.any(x != y):
            out["wilcoxon_p"] = float(stats.wilcoxon(x, y).pvalue)
    return out


def delong_by_class(pred_a, pred_b):
    """DeLong p per class for two prediction CSVs of the same images (joined on the row column)."""
    ra, ca, pa, la, task = metrics.read_predictions(pred_a)
    rb, cb, pb, lb, _ = metrics.read_predictions(pred_b)
    common = np.intersect1d(ra, rb)
    if common.size == 0:
        raise ValueError(f"{pred_a} and {pred_b} share no images (row column): DeLong needs the same test set")
    ia = np.searchsorted(ra, common) if np.all(np.diff(ra) > 0) else np.array([list(ra).index(r) for r in common])
    ib = np.searchsorted(rb, common) if np.all(np.diff(rb) > 0) else np.array([list(rb).index(r) for r in common])
    out = {}
    for c in [c for c in ca if c in cb]:
        ja, jb = ca.index(c), cb.index(c)
        y = (la[ia] == ja).astype(float) if task == "multiclass" else la[ia, ja]
        yb = (lb[ib] == jb).astype(float) if task == "multiclass" else lb[ib, jb]
        known = ~np.isnan(y) & ~np.isnan(yb)
        yk = y[known]
        if not np.array_equal(yk, yb[known]):
            raise ValueError(f"{pred_a} and {pred_b} disagree on the labels of {c}: not the same test set")
        if yk.size == 0 or yk.min() == yk.max():
            continue
        out[c] = metrics.delong_test(yk, pa[ia][known, ja], pb[ib][known, jb])
    return out


# -----------------------------------------------------------------------------
# formatting


def _fmt(x, d=4):
    return "-" if x is None or not math.isfinite(x) else f"{x:.{d}f}"


def _fmt_p(p):
    if p is None or not math.isfinite(p):
        return "-"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def _mean_sd(s, d=4):
    if s["n"] == 0:
        return "-"
    if s["n"] == 1:
        return _fmt(s["mean"], d)
    return f"{_fmt(s['mean'], d)} ± {_fmt(s['std'], d)} [{_fmt(s['ci_lo'], d)}, {_fmt(s['ci_hi'], d)}]"


def _md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _write(out_dir, stem, md, header, rows):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return os.path.join(out_dir, f"{stem}.md"), os.path.join(out_dir, f"{stem}.csv")


def _metric_order(keys, split):
    """The primary split first (headline metrics, per-class AUC, per-class AP), then the other splits, then the rest."""
    splits = [split] + sorted({k.split("_", 1)[0] for k in keys if k.split("_", 1)[0] != split and "_" in k})
    order = []
    for s in splits:
        order += [f"{s}_{k}" for k in HEADLINE if f"{s}_{k}" in keys]
        order += sorted(k for k in keys if k.startswith(f"{s}_auc/"))
        order += sorted(k for k in keys if k.startswith(f"{s}_ap/"))
    return order + sorted(k for k in keys if k not in order)


def _primary_split(runs):
    keys = set.intersection(*[set(r["metrics"]) for r in runs])
    return "test" if "test_auc_macro" in keys else "val"


def _default_out(runs):
    return os.path.commonpath([os.path.dirname(os.path.abspath(r["dir"])) for r in runs])


# -----------------------------------------------------------------------------
# the three reports


def compare_arms(runs_a, runs_b, name_a, name_b, out_dir, alpha=0.05):
    split = _primary_split(runs_a + runs_b)
    keys = set.union(*[set(r["metrics"]) for r in runs_a + runs_b])
    names = _metric_order(keys, split)
    warning = data_hash_warning({name_a: runs_a, name_b: runs_b})
    if warning:
        print(warning)
    by_seed_b = {r["seed"]: r for r in runs_b if r["seed"] is not None}
    paired = [(r, by_seed_b[r["seed"]]) for r in runs_a if r["seed"] in by_seed_b]
    delong = {}
    if len(runs_a) == 1 and len(runs_b) == 1:
        tag = split if split in runs_a[0]["predictions"] else next(iter(runs_a[0]["predictions"]), None)
        if tag and tag in runs_b[0]["predictions"]:
            delong = delong_by_class(runs_a[0]["predictions"][tag], runs_b[0]["predictions"][tag])
    header = ["metric", f"{name_a} n", f"{name_a} mean", f"{name_a} std", f"{name_a} ci_lo", f"{name_a} ci_hi",
              f"{name_b} n", f"{name_b} mean", f"{name_b} std", f"{name_b} ci_lo", f"{name_b} ci_hi",
              "diff", "welch_p", "mwu_p", "paired_t_p", "wilcoxon_p", "n_pairs", "delong_p"]
    rows, md_rows = [], []
    for m in names:
        a = [r["metrics"].get(m, float("nan")) for r in runs_a]
        b = [r["metrics"].get(m, float("nan")) for r in runs_b]
        sa, sb = summarize(a, alpha), summarize(b, alpha)
        if sa["n"] == 0 and sb["n"] == 0:
            continue
        t = two_arm_tests(a, b, [(x["metrics"].get(m, float("nan")), y["metrics"].get(m, float("nan"))) for x, y in paired])
        cls = m.split("/", 1)[1] if m.startswith(f"{split}_auc/") else None
        dp = delong[cls]["p"] if cls in delong else (float("nan"))
        diff = sb["mean"] - sa["mean"]
        rows.append([m, sa["n"], sa["mean"], sa["std"], sa["ci_lo"], sa["ci_hi"], sb["n"], sb["mean"], sb["std"],
                     sb["ci_lo"], sb["ci_hi"], diff, t["welch_p"], t["mwu_p"], t["paired_t_p"], t["wilcoxon_p"],
                     t["n_pairs"], dp])
        md_rows.append([m, _mean_sd(sa), _mean_sd(sb), _fmt(diff), _fmt_p(t["welch_p"]), _fmt_p(t["mwu_p"]),
                        _fmt_p(t["paired_t_p"]), _fmt_p(t["wilcoxon_p"])] + ([_fmt_p(dp)] if delong else []))
    md_header = ["metric", f"{name_a} (n={len(runs_a)})", f"{name_b} (n={len(runs_b)})", "diff (B-A)",
                 "Welch t p", "Mann-Whitney p", "paired t p", "Wilcoxon p"] + (["DeLong p"] if delong else [])
    md = (f"# {name_a} vs {name_b}\n\n"
          f"Metrics on the **{split}** split ({'evaluate.py' if split != 'val' else 'best validation eval'}); "
          f"mean ± std [t-based {100 * (1 - alpha):.0f}% CI] over runs. "
          f"{len(paired)} runs pair by seed (paired tests use those).\n\n" + (f"**{warning}**\n\n" if warning else "") +
          _md_table(md_header, md_rows))
    return _write(out_dir, "comparison", md, header, rows), rows


def _group_value(cfg, key):
    v = cfg.get(key, "-")
    if key == "data_dir" and isinstance(v, str):
        return os.path.basename(os.path.normpath(v)) or v
    if isinstance(v, (list, tuple)):
        return "+".join(str(x) for x in v)
    return str(v)


def group_runs(runs, keys):
    groups = {}
    for r in runs:
        groups.setdefault(tuple(_group_value(r["config"], k) for k in keys), []).append(r)
    return groups


def performance_table(runs, keys, out_dir, stem="table", baseline=None, alpha=0.05):
    """One row per group of runs: n, headline metrics mean ± std, per-class AUROC means; with a baseline
    group, Welch / Mann-Whitney p-values of the macro AUROC against it."""
    split = _primary_split(runs)
    groups = group_runs(runs, keys)
    allkeys = set.union(*[set(r["metrics"]) for r in runs])
    head = [k for k in (f"{split}_{h}" for h in HEADLINE) if k in allkeys]
    classes = sorted({k.split("/", 1)[1] for k in allkeys if k.startswith(f"{split}_auc/")})
    base = None
    if baseline is not None:
        match = [g for g in groups if "+".join(g) == baseline or baseline in g]
        if not match:
            raise ValueError(f"baseline {baseline!r} is not among the groups {['+'.join(g) for g in groups]}")
        base = groups[match[0]]
    primary = f"{split}_auc_macro"
    # an ablation's groups are arms of one comparison; a plain table may group different data sets, but the runs
    # of one group are always meant to share their data
    checks = [{"+".join(g): rs for g, rs in groups.items()}] if base is not None else []
    checks += [{r["name"]: [r] for r in rs} for rs in groups.values()]
    warning = " ".join(w for w in (data_hash_warning(c) for c in checks) if w)
    if warning:
        print(warning)
    header = list(keys) + ["n"] + [f"{h} mean" for h in head] + [f"{h} std" for h in head] + \
        [f"{split}_auc/{c}" for c in classes] + (["welch_p", "mwu_p"] if base is not None else [])
    rows, md_rows = [], []
    for g, rs in groups.items():
        s = {h: summarize([r["metrics"].get(h, float("nan")) for r in rs], alpha) for h in head}
        cm = [summarize([r["metrics"].get(f"{split}_auc/{c}", float("nan")) for r in rs])["mean"] for c in classes]
        row = list(g) + [len(rs)] + [s[h]["mean"] for h in head] + [s[h]["std"] for h in head] + cm
        md = list(g) + [len(rs)] + [_fmt(s[h]["mean"]) + ("" if s[h]["n"] < 2 else f" ± {_fmt(s[h]['std'])}") for h in head] + \
            [_fmt(v, 3) for v in cm]
        if base is not None:
            if rs is base:
                t = {"welch_p": float("nan"), "mwu_p": float("nan")}
            else:
                t = two_arm_tests([r["metrics"].get(primary, float("nan")) for r in base],
                                  [r["metrics"].get(primary, float("nan")) for r in rs])
            row += [t["welch_p"], t["mwu_p"]]
            md += ["(baseline)" if rs is base else _fmt_p(t["welch_p"]), "" if rs is base else _fmt_p(t["mwu_p"])]
        rows.append(row)
        md_rows.append(md)
    if primary in head:  # best group first
        col = len(keys) + 1 + head.index(primary)
        order = sorted(range(len(rows)), key=lambda i: -rows[i][col] if math.isfinite(rows[i][col]) else math.inf)
        rows, md_rows = [rows[i] for i in order], [md_rows[i] for i in order]
    md_header = list(keys) + ["n"] + [h[len(split) + 1:] for h in head] + [c for c in classes] + \
        (["p vs baseline (Welch)", "Mann-Whitney p"] if base is not None else [])
    title = "Ablation" if base is not None else "Performance"
    md = (f"# {title} ({split} split, mean ± std over runs; per-class columns: mean AUROC)\n\n" +
          (f"**{warning}**\n\n" if warning else "") + _md_table(md_header, md_rows))
    return _write(out_dir, stem, md, header, rows), rows


# -----------------------------------------------------------------------------
# launching seeds


def launch(name, seeds, seed_start, train_args, out_root="out", nproc=1, evaluate=False, eval_args=()):
    """Run train.py once per seed into <out_root>/<name>_s<seed>; a seed whose metrics.jsonl has a final
    record is skipped, one with a ckpt.pt but no final record is resumed."""
    done = []
    for s in range(seed_start, seed_start + seeds):
        run = os.path.join(out_root, f"{name}_s{s}")
        mpath = os.path.join(run, "metrics.jsonl")
        finished = os.path.exists(mpath) and any(r.get("final") for r in read_jsonl(mpath))
        if finished:
            print(f"[launch] {run}: finished before, skipping")
        else:
            extra = (["--init_from=resume"] if os.path.exists(os.path.join(run, "ckpt.pt")) else
                     ["--overwrite=True"] if os.path.exists(mpath) else [])  # a start killed before its first ckpt.pt
            if nproc > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            else:
                cmd = [sys.executable]
            cmd += [os.path.join(HERE, "train.py")] + list(train_args) + [f"--seed={s}", f"--out_dir={run}"] + extra
            print("[launch] " + " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        if evaluate and not os.path.exists(os.path.join(run, "eval_test.json")):
            cmd = [sys.executable, os.path.join(HERE, "evaluate.py"), f"--ckpt={run}/best.pt", "--split=test"] + list(eval_args)
            print("[launch] " + " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        done.append(run)
    return done


# -----------------------------------------------------------------------------


# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per argument; CHECKS: across)
RANGES = dict(alpha="(0, 1)", seeds="[1, inf)", seed_start="[0, 9999999]", nproc="[1, 1024]")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description="compare runs / launch seeds (see the docstring of compare.py)")
    p.add_argument("--runs", help="glob of arm A's run folders, e.g. 'out/scratch_s*'")
    p.add_argument("--vs", help="glob of arm B's run folders")
    p.add_argument("--table", help="glob of run folders: one row per group (--group_by)")
    p.add_argument("--ablation", help="glob of run folders: one row per value of --group_by, p-values vs --baseline")
    p.add_argument("--group_by", default=None, help="comma-separated config keys (table: data_dir,model,init_from; "
                                                    "ablation: modalities)")
    p.add_argument("--baseline", default="vision", help="ablation: the group the others are tested against")
    p.add_argument("--out_dir", default="", help="where the .md/.csv go (default: the runs' parent folder)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level of the CIs")
    p.add_argument("--launch", action="store_true", help="train seeds: ... --launch --seeds=10 --name=x -- <train.py args>")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--seed_start", type=int, default=0)
    p.add_argument("--name", default="run")
    p.add_argument("--out_root", default="out")
    p.add_argument("--nproc", type=int, default=1, help="> 1: torchrun --standalone --nproc_per_node=N")
    p.add_argument("--evaluate", action="store_true", help="launch: run evaluate.py --split=test after each seed")
    p.add_argument("--eval_args", default="", help="launch: extra evaluate.py arguments, space-separated")
    a = configurator.parse_args(p, argv, RANGES)
    if a.launch:
        if not train_args:
            p.error("--launch needs the train.py arguments after --, e.g. -- config/quickstart.py --max_iters=200")
        return launch(a.name, a.seeds, a.seed_start, train_args, a.out_root, a.nproc, a.evaluate, a.eval_args.split())
    if a.runs and a.vs:
        ra, rb = find_runs(a.runs), find_runs(a.vs)
        name_a = re.sub(r"_s\d*$", "", os.path.commonprefix([r["name"] for r in ra])) or "A"
        name_b = re.sub(r"_s\d*$", "", os.path.commonprefix([r["name"] for r in rb])) or "B"
        if name_a == name_b:
            name_a, name_b = name_a + " (A)", name_b + " (B)"
        (md, csv_path), rows = compare_arms(ra, rb, name_a, name_b, a.out_dir or _default_out(ra + rb), a.alpha)
    elif a.table:
        runs = find_runs(a.table)
        keys = (a.group_by or "data_dir,model,init_from").split(",")
        (md, csv_path), rows = performance_table(runs, keys, a.out_dir or _default_out(runs), "table", None, a.alpha)
    elif a.ablation:
        runs = find_runs(a.ablation)
        keys = (a.group_by or "modalities").split(",")
        (md, csv_path), rows = performance_table(runs, keys, a.out_dir or _default_out(runs), "ablation", a.baseline, a.alpha)
    else:
        p.error("choose one of: --runs A --vs B | --table GLOB | --ablation GLOB | --launch ... -- <train args>")
    with open(md) as f:
        print(f.read())
    print(f"wrote {md} and {csv_path}")
    return rows


if __name__ == "__main__":
    configurator.cli(main)
