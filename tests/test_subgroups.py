"""Issue 36, who the model fails: subgroup metrics equal the same metrics computed on the group's rows, a group
without both label values is NaN with a reason, the pairwise gap test is calibrated (no true gap -> 3-7 % flagged at
alpha 0.05) and has power, Holm's adjustment, age bins, and the phantom's disparity knob (off: the same phantom)."""

import json

import numpy as np
import pytest
from scipy import stats

import data
import metrics
import phantom
import subgroups

CLASSES = ["A", "B", "C"]


def _fixture(seed=0, n_pat=60):
    """probs (N, 3), labels with NaN, patients with 1-3 images, sex per patient; class C has no positive among F."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 4, n_pat)
    pid = np.repeat(np.arange(n_pat), k)
    sex = np.where(rng.random(n_pat) < 0.5, "F", "M")[pid].astype(object)
    y = (rng.random((pid.size, 3)) < 0.35).astype(np.float64)
    y[sex == "F", 2] = 0.0
    y[rng.random(y.shape) < 0.1] = np.nan
    probs = np.clip(0.3 * np.nan_to_num(y) + 0.7 * rng.random(y.shape), 0, 1)
    return probs, y, np.array([f"p{i}" for i in pid]), sex


def test_subgroup_aucs_and_cis_equal_the_direct_computation_on_the_groups_rows():
    probs, y, patients, sex = _fixture()
    thr = np.array([0.4, 0.5, 0.6])
    sub = subgroups.subgroup_analysis(probs, y, CLASSES, "multilabel", patients, {"sex": sex}, thr, n_bootstrap=40,
                                      seed=3)
    groups = sub["columns"]["sex"]["groups"]
    assert list(groups) == ["F", "M"]
    for k, (name, g) in enumerate(groups.items()):
        rows = np.nonzero(sex == name)[0]
        assert g["bootstrap_seed"] == 3 + k
        auc = metrics.masked_auc(probs[rows], y[rows])
        lo, hi, mlo, mhi = metrics.bootstrap_ci(probs[rows], y[rows], patients[rows], 40, 3 + k)
        for c, cname in enumerate(CLASSES):
            r = g["per_class"][cname]
            if np.isnan(auc[c]):
                assert np.isnan(r["auc"]) and np.isnan(r["auc_ci"][0])
                continue
            assert abs(r["auc"] - auc[c]) < 1e-12
            assert abs(r["auc_ci"][0] - lo[c]) < 1e-12 and abs(r["auc_ci"][1] - hi[c]) < 1e-12
            known = ~np.isnan(y[rows, c])
            yk, dk = y[rows, c][known] == 1, probs[rows, c][known] >= thr[c]
            assert r["sensitivity"] == (dk & yk).sum() / yk.sum()
            assert r["specificity"] == (~dk & ~yk).sum() / (~yk).sum()
        assert abs(g["auc_macro"] - np.nanmean(auc)) < 1e-12
        assert abs(g["auc_macro_ci"][0] - mlo) < 1e-12 and abs(g["auc_macro_ci"][1] - mhi) < 1e-12
        assert g["n_images"] == rows.size and g["n_patients"] == np.unique(patients[rows]).size
        ece, _ = metrics.calibration(probs[rows], y[rows], 15)
        assert abs(g["ece"] - ece) < 1e-12
    # class C has no positive among F: NaN with a reason, not a crash; the macro is over A and B
    c_f = groups["F"]["per_class"]["C"]
    assert np.isnan(c_f["auc"]) and "no positive case" in c_f["reason"] and c_f["prevalence"] == 0.0
    pair = sub["columns"]["sex"]["pairs"][0]
    assert (pair["a"], pair["b"]) == ("F", "M") and 0 <= pair["p"] <= 1 and pair["p_holm"] == pair["p"]
    assert abs(pair["diff"] - (groups["F"]["auc_macro"] - groups["M"]["auc_macro"])) < 1e-12
    assert pair["diff_ci"][0] <= pair["diff"] + 0.05 and pair["diff_ci"][1] >= pair["diff"] - 0.05
    assert sub["n_tests"] == 1 and "Holm over 1 tests" in sub["correction"]


def test_a_group_with_one_label_value_is_nan_with_a_reason_not_a_crash(tmp_path):
    probs, y, patients, sex = _fixture(1)
    view = np.where(np.arange(len(y)) < 5, "LAT", "PA").astype(object)
    y[:5] = 0.0  # the 5 lateral images: negatives only, for every class
    sub = subgroups.subgroup_analysis(probs, y, CLASSES, "multilabel", patients, {"view": view}, None, n_bootstrap=20)
    g = sub["columns"]["view"]["groups"]["LAT"]
    assert np.isnan(g["auc_macro"]) and "no class has both" in g["reason"]
    assert all("no positive case" in r["reason"] for r in g["per_class"].values())
    pair = sub["columns"]["view"]["pairs"][0]
    assert np.isnan(pair["p"]) and "LAT: no AUC" in pair["reason"] and "p_holm" not in pair
    assert sub["n_tests"] == 0 and sub["columns"]["view"]["worst"] is None
    text = subgroups.format_subgroups(sub)
    assert "view=LAT" in text and "no class has both" in text
    subgroups.write_subgroups_csv(str(tmp_path / "s.csv"), sub, CLASSES)
    json.dumps(metrics.to_json(sub), allow_nan=False)  # strict JSON
    fig = subgroups.forest_plot(sub, (0.6, 0.5, 0.7), "t")
    assert len(fig.axes[0].get_yticklabels()) == 2


# -----------------------------------------------------------------------------
# the pairwise test: calibration without a true gap, power with one


def _group(rng, n_pat, auc, C=5):
    """One group: patients with 1-3 images, labels mostly per patient, scores with a per-patient effect (so that the
    images of a patient are correlated) and a shift that gives each class exactly this population AUC."""
    k = rng.integers(1, 4, n_pat)
    pid = np.repeat(np.arange(n_pat), k)
    shift = np.sqrt(2 * 1.5) * stats.norm.ppf(auc)  # score | y ~ N(shift y, 0.5 + 1)
    y = (rng.random((n_pat, C))[pid] < 0.3) ^ (rng.random((pid.size, C)) < 0.1)
    s = shift * y + np.sqrt(0.5) * rng.normal(size=(n_pat, C))[pid] + rng.normal(size=(pid.size, C))
    return s, y.astype(np.float64), pid


def _flagged(n_sim, auc_b, seed, n_pat=360):
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_sim):
        a = subgroups.macro_auc_var(*_group(rng, n_pat, 0.80))
        b = subgroups.macro_auc_var(*_group(rng, n_pat, auc_b))
        hits += subgroups.pair_test(*a, *b)[3] < 0.05
    return hits / n_sim


def test_pairwise_gap_test_is_calibrated_and_has_power():
    """500 simulated pairs of groups the size of the quick start's test split by sex (360 patients, ~720 images, 5
    classes each) with no true gap: 3-7 % flagged at alpha 0.05 (measured: 5.2 %); with a true gap of 0.05 AUC in
    every class: flagged in most (measured: 98 % of 500; 100 simulations here)."""
    null = _flagged(500, 0.80, seed=0)
    assert 0.03 <= null <= 0.07, null
    power = _flagged(100, 0.75, seed=1)
    assert power >= 0.8, power


def test_macro_auc_var_is_delong_for_one_class_and_patients_of_one_image():
    rng = np.random.default_rng(0)
    p = np.round(rng.random(200), 1)  # ties
    y = (rng.random(200) < 0.3).astype(np.float64)
    auc, var = subgroups.macro_auc_var(p[:, None], y[:, None], np.arange(200))
    aucs, cov = metrics.delong_auc_cov(y, p[None])
    assert abs(auc - aucs[0]) < 1e-12 and auc == pytest.approx(metrics.fast_auc(y, p), abs=1e-12)
    assert var == pytest.approx(cov[0, 0], rel=0.02)  # G/(G-1) sum of squares vs DeLong's unbiased variances


def test_holm_and_age_bins():
    adj = subgroups.holm([0.01, 0.04, 0.03, np.nan, 0.2])
    assert np.allclose(adj[[0, 1, 2, 4]], [0.04, 0.09, 0.09, 0.2]) and np.isnan(adj[3])
    assert subgroups.age_bin_names([40, 60, 80]) == ["<40", "40-59", "60-79", ">=80"]
    rows = [{"age": "39"}, {"age": "40"}, {"age": "79"}, {"age": "80"}, {"age": ""}, {"age": "n/a"}]
    got = subgroups.subgroup_values(rows, "age", subgroups.parse_age_bins("40,60,80")).tolist()
    assert got == ["<40", "40-59", "60-79", ">=80", subgroups.MISSING, subgroups.MISSING]
    assert subgroups.subgroup_values(rows, "dataset", (), fallback="nih").tolist() == ["nih"] * 6
    with pytest.raises(ValueError, match="age_bins='60,40'.*increase"):
        subgroups.parse_age_bins("60,40")
    with pytest.raises(ValueError, match="sexx is not a column.*choose from row, sex, age, dataset"):
        subgroups.check_columns("sexx,age", ["row", "sex", "age"])


# -----------------------------------------------------------------------------
# the phantom's known disparity


def test_phantom_disparity_makes_one_groups_findings_subtler_and_is_off_by_default(tmp_path):
    base = phantom.generate(240, 32, seed=0)
    same = phantom.generate(240, 32, seed=0, disparity="")
    assert np.array_equal(base["images"], same["images"])
    on = phantom.generate(240, 32, seed=0, disparity="sex=F:0.3")
    female = np.array([r["sex"] == "F" for r in base["records"]])
    finding = base["labels"][:, :phantom.DEV + 1].max(1) > 0  # a pathology or a device drawn
    changed = (on["images"] != base["images"]).any((1, 2))
    assert not changed[~female].any() and not changed[female & ~finding].any() and changed[female & finding].all()
    assert np.array_equal(on["labels"], base["labels"])  # the same studies; a subtler heart may read "mild" in text
    assert [{k: v for k, v in r.items() if k != "text"} for r in on["records"]] == \
        [{k: v for k, v in r.items() if k != "text"} for r in base["records"]]
    # subtler: what the findings add to an image (against strength 0: the same image without them) shrinks to ~0.3
    # (measured 0.43: the tone curve after the findings is not linear, and the pixels are rounded to uint8)
    zero = phantom.generate(240, 32, seed=0, disparity="sex=F:0")["images"].astype(np.float64)[female & finding]
    full, part = (np.abs(d["images"].astype(np.float64)[female & finding] - zero).sum() for d in (base, on))
    assert 0.2 < part / full < 0.5, part / full
    with pytest.raises(ValueError, match="phantom_disparity='sex=X:0.3'.*F or M"):
        phantom.generate(10, 32, disparity="sex=X:0.3")
    # prepare: the knob is recorded (meta.json config, input hash) only when it is on
    off = data.prepare_phantom(str(tmp_path / "off"), n_images=120, image_size=32)
    assert "phantom_disparity" not in off["config"]
    on_meta = data.prepare(dict(dataset="phantom", out_dir=str(tmp_path / "on"), n_images=120, image_size=32,
                                phantom_disparity="age>=70:0.5"))
    assert on_meta["config"]["phantom_disparity"] == "age>=70:0.5" and on_meta["input_hash"] != off["input_hash"]
    assert on_meta["label_policy"]["disparity"] == "age>=70:0.5" and on_meta["data_hash"] != off["data_hash"]


def test_multiclass_groups_and_a_class_absent_from_a_group():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 150)
    site = np.where(np.arange(150) < 60, "a", "b").astype(object)
    y[:60] = np.where(y[:60] == 2, 0, y[:60])  # site a has no image of class C
    probs = rng.dirichlet([1, 1, 1], 150)
    probs[np.arange(150), y] += 0.5
    probs /= probs.sum(1, keepdims=True)
    sub = subgroups.subgroup_analysis(probs, y, CLASSES, "multiclass", np.arange(150), {"site": site}, None, 20)
    a = sub["columns"]["site"]["groups"]["a"]
    assert np.isnan(a["per_class"]["C"]["auc"]) and "no positive case" in a["per_class"]["C"]["reason"]
    rows = np.arange(60)
    assert abs(a["auc_macro"] - np.nanmean(metrics.masked_auc(probs[rows], y[rows], "multiclass"))) < 1e-12
    assert 0 <= sub["columns"]["site"]["pairs"][0]["p"] <= 1
