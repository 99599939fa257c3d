"""compare.py on fake run folders: p-values equal scipy's, seeds pair, DeLong from two predictions CSVs,
group tables, ablation, the seed launcher; then (slow, needs train.py) a tiny 2-arm x 3-seed phantom study."""

import csv
import json
import math
import os
import sys
import warnings

import numpy as np
import pytest
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import compare  # noqa: E402
import metrics  # noqa: E402

CLASSES = ["Edema", "Nodule"]


def _fake_run(d, seed, val_auc, test_auc=None, cfg=None, per_class=(0.8, 0.7), best_iter=20, data_hash=None):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"seed": seed, "model": "convnext_atto", "data_dir": "data/phantom", "init_from": "scratch",
                   **(cfg or {})}, f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for it, auc in ((0, 0.5), (best_iter, val_auc), (best_iter + 10, val_auc - 0.01)):
            rec = {"iter": it, "split": "val", "loss": 0.5, "auc_macro": auc, "ap_macro": auc - 0.1,
                   "auc": dict(zip(CLASSES, per_class)), "ap": dict(zip(CLASSES, per_class))}
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps({"final": True, "best_iter": best_iter, "best_metric": val_auc,
                            "select_metric": "auc_macro", "best_auc_macro": val_auc, "time_s": 3.0}) + "\n")
    if test_auc is not None:
        with open(os.path.join(d, "eval_test.json"), "w") as f:
            json.dump({"auc_macro": test_auc, "ap_macro": test_auc - 0.2, "ece": 0.05,
                       "auc": {"Edema": test_auc + 0.01, "Nodule": test_auc - 0.01}, "ap": {"Edema": 0.5, "Nodule": None},
                       "per_class": {}, "data_hash": data_hash}, f)


def test_summarize_t_interval():
    v = [0.81, 0.84, 0.79, 0.83, 0.82]
    s = compare.summarize(v)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert s["mean"] == pytest.approx(np.mean(v)) and s["std"] == pytest.approx(np.std(v, ddof=1))
    assert s["ci_lo"] == pytest.approx(lo, abs=1e-12) and s["ci_hi"] == pytest.approx(hi, abs=1e-12)
    assert compare.summarize([0.8])["n"] == 1 and np.isnan(compare.summarize([0.8])["std"])


def test_compare_arms_p_values_equal_scipy(tmp_path):
    a = [0.71, 0.74, 0.69, 0.73, 0.70]
    b = [0.78, 0.75, 0.80, 0.77, 0.79]
    ta = [0.70, 0.72, 0.68, 0.71, 0.69]
    tb = [0.76, 0.74, 0.79, 0.75, 0.78]
    for s in range(5):
        _fake_run(tmp_path / f"scratch_s{s}", s, a[s], ta[s])
        _fake_run(tmp_path / f"pretrained_s{s}", s, b[s], tb[s], cfg={"init_from": "pretrained"})
    rows = compare.main(["--runs", str(tmp_path / "scratch_s*"), "--vs", str(tmp_path / "pretrained_s*")])
    by = {r[0]: r for r in rows}
    h = ["metric", "an", "amean", "astd", "alo", "ahi", "bn", "bmean", "bstd", "blo", "bhi", "diff",
         "welch_p", "mwu_p", "paired_t_p", "wilcoxon_p", "n_pairs", "delong_p"]
    test = dict(zip(h, by["test_auc_macro"]))
    assert test["welch_p"] == pytest.approx(stats.ttest_ind(ta, tb, equal_var=False).pvalue, abs=1e-6)
    assert test["mwu_p"] == pytest.approx(stats.mannwhitneyu(ta, tb, alternative="two-sided").pvalue, abs=1e-6)
    assert test["paired_t_p"] == pytest.approx(stats.ttest_rel(ta, tb).pvalue, abs=1e-6)
    assert test["wilcoxon_p"] == pytest.approx(stats.wilcoxon(ta, tb).pvalue, abs=1e-6)
    assert test["n_pairs"] == 5 and test["diff"] == pytest.approx(np.mean(tb) - np.mean(ta))
    val = dict(zip(h, by["val_auc_macro"]))  # the best eval (iter 20), not the last one
    assert val["amean"] == pytest.approx(np.mean(a)) and val["welch_p"] == pytest.approx(
        stats.ttest_ind(a, b, equal_var=False).pvalue, abs=1e-6)
    assert "test_auc/Edema" in by and "test_ap/Edema" in by and "test_ap/Nodule" not in by  # all None: no row
    md = open(tmp_path / "comparison.md").read()
    assert "scratch (n=5)" in md and "pretrained (n=5)" in md and "test_auc_macro" in md
    with open(tmp_path / "comparison.csv") as f:
        assert len(list(csv.reader(f))) == len(rows) + 1


def test_no_t_test_without_variance():
    """Runs that all score alike within each arm (0.7, 0.7 vs 0.8, 0.8), or paired differences equal up to float
    rounding (0.7 - 0.8 vs 0.75 - 0.85): no t-test, NaN, where scipy returns p = 0 or 4e-16 from rounding noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's "precision loss ... catastrophic cancellation" is not reached
        same = compare.two_arm_tests([0.7, 0.7], [0.8, 0.8], pairs=[(0.7, 0.8), (0.7, 0.8)])
        shifted = compare.two_arm_tests([0.7, 0.75], [0.8, 0.85], pairs=[(0.7, 0.8), (0.75, 0.85)])
        one_spread = compare.two_arm_tests([0.7, 0.7], [0.8, 0.81])  # one arm varies: Welch is defined
    assert math.isnan(same["welch_p"]) and math.isnan(same["paired_t_p"]) and same["n_pairs"] == 2
    assert math.isnan(shifted["paired_t_p"]) and shifted["welch_p"] == pytest.approx(
        stats.ttest_ind([0.7, 0.75], [0.8, 0.85], equal_var=False).pvalue)
    # Welch by hand: diff 0.105 over sqrt(0 / 2 + 5e-5 / 2) = 0.005, t = 21 with 1 degree of freedom
    assert one_spread["welch_p"] == pytest.approx(2 * stats.t.sf(21, 1))


def test_pairing_only_by_matching_seeds(tmp_path):
    for s, v in zip((0, 1, 2), (0.7, 0.72, 0.71)):
        _fake_run(tmp_path / f"a_s{s}", s, v)
    for s, v in zip((1, 2, 3), (0.75, 0.78, 0.74)):
        _fake_run(tmp_path / f"b_s{s}", s, v)
    (_, _), rows = compare.compare_arms(compare.find_runs(str(tmp_path / "a_s*")), compare.find_runs(str(tmp_path / "b_s*")),
                                        "a", "b", str(tmp_path))
    r = [x for x in rows if x[0] == "val_auc_macro"][0]
    assert r[16] == 2 and r[14] == pytest.approx(stats.ttest_rel([0.72, 0.71], [0.75, 0.78]).pvalue, abs=1e-6)


def test_delong_between_two_single_models(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    y = (rng.random((n, 2)) < 0.4).astype(float)
    y[rng.random((n, 2)) < 0.1] = np.nan
    yy = np.nan_to_num(y)
    p_a = 1 / (1 + np.exp(-(1.5 * yy + rng.normal(size=(n, 2)))))
    p_b = 1 / (1 + np.exp(-(0.5 * yy + rng.normal(size=(n, 2)))))
    index = [{"row": i, "path": f"img{i}.png", "patient_id": f"p{i}"} for i in range(n)]
    for name, p in (("good_s0", p_a), ("weak_s0", p_b)):
        _fake_run(tmp_path / name, 0, 0.8, 0.8)
        rows = np.arange(n) if name == "good_s0" else np.arange(n)[::-1]  # another row order: joined on `row`
        metrics.write_predictions(str(tmp_path / name / "predictions_test.csv"), index, rows, CLASSES, p[rows], y[rows], "multilabel")
        rep = json.load(open(tmp_path / name / "eval_test.json"))
        rep["predictions"] = "predictions_test.csv"
        json.dump(rep, open(tmp_path / name / "eval_test.json", "w"))
    rows = compare.main(["--runs", str(tmp_path / "good_s*"), "--vs", str(tmp_path / "weak_s*")])
    r = {x[0]: x for x in rows}
    for c, name in enumerate(CLASSES):
        known = ~np.isnan(y[:, c])
        ref = metrics.delong_test(y[known, c], np.round(p_a[known, c], 6), np.round(p_b[known, c], 6))["p"]
        assert r[f"test_auc/{name}"][17] == pytest.approx(ref, rel=1e-6)
    assert r["test_auc/Edema"][17] < 0.01
    assert "DeLong p" in open(tmp_path / "comparison.md").read()


def test_table_and_ablation(tmp_path):
    for s in range(3):
        _fake_run(tmp_path / f"cx_scratch_s{s}", s, 0.7 + 0.01 * s, 0.70 + 0.01 * s)
        _fake_run(tmp_path / f"cx_pre_s{s}", s, 0.8 + 0.01 * s, 0.80 + 0.02 * s, cfg={"init_from": "pretrained"})
        _fake_run(tmp_path / f"vit_s{s}", s, 0.6, 0.65 + 0.005 * s, cfg={"model": "vit_tiny"})
    rows = compare.main(["--table", str(tmp_path / "*")])
    assert [r[:4] for r in rows] == [["phantom", "convnext_atto", "pretrained", 3], ["phantom", "convnext_atto", "scratch", 3],
                                     ["phantom", "vit_tiny", "scratch", 3]]  # sorted by test AUROC
    assert rows[0][4] == pytest.approx(0.82)
    assert os.path.exists(tmp_path / "table.md")
    ab = tmp_path / "ab"
    for s in range(4):
        _fake_run(ab / f"fusion_v_s{s}", s, 0.7, 0.70 + 0.01 * s, cfg={"modalities": ["vision"]})
        _fake_run(ab / f"fusion_vt_s{s}", s, 0.8, 0.75 + 0.01 * s, cfg={"modalities": ["vision", "text"]})
    rows = compare.main(["--ablation", str(ab / "fusion_*"), "--group_by=modalities", "--baseline=vision"])
    vt = [r for r in rows if r[0] == "vision+text"][0]
    base = [0.70, 0.71, 0.72, 0.73]
    other = [0.75, 0.76, 0.77, 0.78]
    assert vt[-2] == pytest.approx(stats.ttest_ind(base, other, equal_var=False).pvalue, abs=1e-6)
    assert "(baseline)" in open(ab / "ablation.md").read()
    with pytest.raises(ValueError, match="baseline"):
        compare.main(["--ablation", str(ab / "fusion_*"), "--group_by=modalities", "--baseline=audio"])


def test_data_hash_mismatch_warns(tmp_path, capsys):
    """Arms trained or evaluated on different prepared data get a warning (stdout and the report); same data: none."""
    for s in range(2):
        _fake_run(tmp_path / f"a_s{s}", s, 0.7, 0.7, data_hash="aaaa1111")
        _fake_run(tmp_path / f"b_s{s}", s, 0.8, 0.8, data_hash="aaaa1111")
        _fake_run(tmp_path / f"c_s{s}", s, 0.8, 0.8, data_hash="cccc2222")
    compare.main(["--runs", str(tmp_path / "a_s*"), "--vs", str(tmp_path / "b_s*")])
    assert "different prepared data" not in capsys.readouterr().out
    assert "different prepared data" not in open(tmp_path / "comparison.md").read()
    compare.main(["--runs", str(tmp_path / "a_s*"), "--vs", str(tmp_path / "c_s*")])
    out = capsys.readouterr().out
    assert "different prepared data" in out and "aaaa1111" in out and "cccc2222" in out
    assert "different prepared data" in open(tmp_path / "comparison.md").read()
    # no eval json hash: the run's data_dir meta.json says it
    d = tmp_path / "data"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"data_hash": "dddd3333"}))
    _fake_run(tmp_path / "x_s0", 0, 0.7, cfg={"data_dir": str(d)})
    assert compare.load_run(str(tmp_path / "x_s0"))["data_hash"] == "dddd3333"


def test_best_iter_zero_is_zero(tmp_path):
    _fake_run(tmp_path / "z_s0", 0, 0.7, best_iter=0)
    assert compare.load_run(str(tmp_path / "z_s0"))["metrics"]["best_iter"] == 0.0


def test_auc_comp5_is_the_first_row(tmp_path):
    for s in range(2):
        for arm, v in (("a", 0.7), ("b", 0.8)):
            _fake_run(tmp_path / f"{arm}_s{s}", s, v, v, cfg={"init_from": arm})
            rep = json.load(open(tmp_path / f"{arm}_s{s}" / "eval_test.json"))
            json.dump({**rep, "auc_comp5": v + 0.05}, open(tmp_path / f"{arm}_s{s}" / "eval_test.json", "w"))
    rows = compare.main(["--runs", str(tmp_path / "a_s*"), "--vs", str(tmp_path / "b_s*")])
    assert rows[0][0] == "test_auc_comp5" and rows[0][2] == pytest.approx(0.75)
    table = compare.main(["--table", str(tmp_path / "*_s*")])
    assert open(tmp_path / "table.md").read().split("\n")[2].split("|")[5].strip() == "auc_comp5"
    assert table[0][4] == pytest.approx(0.85)  # the first metric column


def test_launch_runs_each_seed_once(tmp_path, monkeypatch):
    """The launcher with a stand-in train.py that writes a final record (the real one: the slow test below)."""
    (tmp_path / "train.py").write_text(
        "import json, os, sys\n"
        "args = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--'))\n"
        "os.makedirs(args['out_dir'], exist_ok=True)\n"
        "open(os.path.join(args['out_dir'], 'calls'), 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "open(os.path.join(args['out_dir'], 'metrics.jsonl'), 'a').write(json.dumps({'final': True, 'best_iter': 0}) + '\\n')\n")
    monkeypatch.setattr(compare, "HERE", str(tmp_path))
    out = tmp_path / "out"
    compare.main(["--launch", "--seeds=2", "--name=x", f"--out_root={out}", "--", "cfg.py", "--max_iters=5"])
    compare.main(["--launch", "--seeds=3", "--name=x", f"--out_root={out}", "--", "cfg.py", "--max_iters=5"])
    calls = {s: open(out / f"x_s{s}" / "calls").read().splitlines() for s in range(3)}
    assert all(len(c) == 1 for c in calls.values())  # seeds 0 and 1 were not trained twice
    assert calls[1][0] == f"cfg.py --max_iters=5 --seed=1 --out_dir={out / 'x_s1'}"


# -----------------------------------------------------------------------------
# the whole study on the phantom: 2 arms x 3 seeds, train -> evaluate -> compare

TINY = ["--max_iters=30", "--eval_interval=15", "--image_size=32", "--model=convnext_atto", "--phantom_images=600",
        "--batch_size=32", "--warmup_iters=5", "--lr_decay_iters=30", "--log_interval=10", "--tensorboard_log=False",
        "--device=cpu", "--eval_batch_size=128"]


@pytest.mark.slow
@pytest.mark.learning
def test_phantom_study_end_to_end(tmp_path, learning):
    if not os.path.exists(os.path.join(ROOT, "train.py")):
        pytest.skip("train.py is not there yet")
    data_dir = tmp_path / "phantom32"
    out = tmp_path / "out"
    for arm, extra in (("lr_low", ["--learning_rate=1e-4"]), ("lr_high", ["--learning_rate=4e-3"])):
        compare.main(["--launch", "--seeds=3", f"--name={arm}", f"--out_root={out}", "--evaluate",
                      "--eval_args=--n_bootstrap=50 --figures=False --tensorboard=False --device=cpu",
                      "--", *TINY, f"--data_dir={data_dir}", *extra])
    rows = compare.main(["--runs", str(out / "lr_low_s*"), "--vs", str(out / "lr_high_s*")])
    md = open(out / "comparison.md").read()
    assert "lr_low (n=3)" in md and "test_auc_macro" in md
    r = [x for x in rows if x[0] == "test_auc_macro"][0]
    assert r[1] == 3 and r[6] == 3 and r[16] == 3  # 3 runs per arm, paired by seed
    learning("lr_high mean test auc_macro (30 steps)", r[7], 0.5)  # the higher LR learns something
