"""
Who does the model fail? Subgroup performance with honest uncertainty (issue 36), as plain functions on arrays;
evaluate.py --subgroups=sex,age,view is the command that calls them.

    subgroup_values    one group name per image from a column of {split}_index.csv (age in bins, --age_bins)
    subgroup_analysis  per group: images, patients, prevalence, macro and per-class AUC with the patient-bootstrap CI
                       (metrics.bootstrap_ci on the group's rows), ECE, sensitivity / specificity at the thresholds
                       chosen on validation; per pair of groups of a column: the macro-AUC difference, its bootstrap
                       CI and a p-value, Holm-adjusted over every pair tested; the worst group of each column
    macro_auc_var      the variance of a macro AUC: DeLong's structural components summed over each patient's images
    pair_test, holm    the z-test of two independent AUCs; Holm's step-down adjustment
    format_subgroups, write_subgroups_csv, forest_plot

The p-value of a pair: groups of one column hold disjoint patients, so their macro AUCs are independent and
z = (A1 - A2) / sqrt(v1 + v2). v is DeLong et al. 1988's variance written as a sum of per-image influences
(a positive's fraction of negatives below it, a negative's fraction of positives above it), summed per patient
before squaring (the clustered estimator of Obuchowski 1997, Biometrics 53: several images of one patient are not
independent evidence). tests/test_subgroups.py measures its calibration (500 simulations without a true gap: 3-7 %
flagged at alpha 0.05) and its power. The CI of a difference is the percentile interval of the differences of the
two groups' bootstrap macros; group k of a column is resampled (by patient) with seed bootstrap_seed + k, so that
the groups' resamples are independent and each group's CI is metrics.bootstrap_ci on its rows with that seed.
A gap is claimed when the Holm-adjusted p-value is below alpha.
"""

import csv
import itertools
import math

import numpy as np
from scipy import stats

import metrics

MISSING = "(missing)"  # the group of images whose index cell is empty

# -----------------------------------------------------------------------------
# groups from the index


def parse_age_bins(text):
    """'40,60,80' -> [40.0, 60.0, 80.0] (strictly increasing edges); '' -> [] (age as it is written)."""
    if not str(text).strip():
        return []
    try:
        edges = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise ValueError(f"age_bins={text!r}: give increasing ages separated by commas, "
                         f"e.g. --age_bins=40,60,80") from None
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"age_bins={text!r}: the edges must increase, e.g. --age_bins=40,60,80")
    return edges


def age_bin_names(edges):
    """Names of the bins [-inf, e0), [e0, e1), ..., [e_last, inf): '<40', '40-59', '60-79', '>=80' for whole
    years, '[40, 60.5)' otherwise."""
    whole = all(float(e).is_integer() for e in edges)
    f = lambda e: f"{e:g}"  # noqa: E731
    names = [f"<{f(edges[0])}"]
    for a, b in zip(edges, edges[1:]):
        names.append(f"{f(a)}-{f(b - 1)}" if whole else f"[{f(a)}, {f(b)})")
    return names + [f">={f(edges[-1])}"]


def check_columns(columns, available):
    """The --subgroups list, each one a column of the index ('dataset' always: the data set's name when the index
    has no such column). A misspelt column is an error that lists the columns there are."""
    cols = [c.strip() for c in columns.split(",") if c.strip()]
    valid = list(available) + ([] if "dataset" in available else ["dataset"])
    bad = [c for c in cols if c not in valid]
    if bad:
        raise ValueError(f"--subgroups={columns}: {', '.join(bad)} is not a column of the split's index; "
                         f"choose from {', '.join(valid)}")
    return cols


def subgroup_values(index_rows, column, age_bins=(), fallback=""):
    """One group name per image (an object array): the column's value, MISSING when empty, ages in the bins of
    age_bins (a non-numeric age is MISSING). fallback: the value of every image when no row has the column."""
    if not any(column in r for r in index_rows):
        return np.array([fallback or MISSING] * len(index_rows), dtype=object)
    raw = [str(r.get(column, "") or "").strip() for r in index_rows]
    if column == "age" and len(age_bins):
        names = age_bin_names(age_bins)
        out = []
        for v in raw:
            try:
                out.append(names[int(np.searchsorted(age_bins, float(v), side="right"))])
            except ValueError:
                out.append(MISSING)
        return np.array(out, dtype=object)
    return np.array([v or MISSING for v in raw], dtype=object)


def _group_order(values, column, age_bins):
    present = set(values.tolist())
    if column == "age" and len(age_bins):
        order = [n for n in age_bin_names(age_bins) if n in present]
    else:
        order = sorted(present - {MISSING})
    return order + ([MISSING] if MISSING in present and MISSING not in order else [])


# -----------------------------------------------------------------------------
# statistics: the clustered DeLong variance of a macro AUC, the test of two groups, Holm


def _auc_influence(y, p):
    """One class: (AUC, per-image influence (N,)) with y 1 / 0 / NaN (unknown: influence 0). The influence of a
    positive is (V10 - AUC) / m, of a negative (V01 - AUC) / n (DeLong's structural components, counted by
    binary search), so that the AUC's variance is the variance of their sum."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    phi = np.zeros(y.size)
    if m == 0 or n == 0:
        return float("nan"), phi
    op, on = np.argsort(p[pos], kind="stable"), np.argsort(p[neg], kind="stable")
    sp, sn = p[pos][op], p[neg][on]

    def below(s, x, order):  # per x (sorted), how many s are below it, ties 1/2, back in the original order
        out = np.empty(x.size)
        out[order] = (np.searchsorted(s, x, "left") + np.searchsorted(s, x, "right")) / 2
        return out
    v10 = below(sn, sp, op) / n        # per positive: fraction of negatives below it
    v01 = 1.0 - below(sp, sn, on) / m  # per negative: fraction of positives above it
    auc = float(v10.mean())
    phi[pos], phi[neg] = (v10 - auc) / m, (v01 - auc) / n
    return auc, phi


def macro_auc_var(probs, labels, patients, task="multilabel"):
    """(macro AUC, its variance) of one group: the mean over the classes with both label values of the class AUCs,
    and G / (G - 1) * sum over the G patients of (the sum of the macro influences of the patient's images)^2."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = metrics.as_multilabel(labels, probs.shape[1], task)
    aucs, phis = [], []
    for c in range(probs.shape[1]):
        a, phi = _auc_influence(onehot[:, c], probs[:, c])
        if a == a:
            aucs.append(a)
            phis.append(phi)
    _, pid = np.unique(np.asarray(patients), return_inverse=True)
    G = int(pid.max()) + 1 if pid.size else 0
    if not aucs or G < 2:
        return (float(np.mean(aucs)) if aucs else float("nan")), float("nan")
    per_patient = np.bincount(pid.reshape(-1), weights=np.mean(phis, 0), minlength=G)
    return float(np.mean(aucs)), float(G / (G - 1) * (per_patient ** 2).sum())


def pair_test(auc1, var1, auc2, var2):
    """Two-sided z-test that two independent AUCs are equal: (diff, se, z, p); NaN where a variance is missing."""
    diff = auc1 - auc2
    var = var1 + var2
    if not (var > 0):
        return diff, float("nan"), float("nan"), float("nan")
    se = math.sqrt(var)
    return diff, se, diff / se, float(2 * stats.norm.sf(abs(diff / se)))


def holm(pvalues):
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted among the tests)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.size, np.nan)
    ok = np.nonzero(~np.isnan(p))[0]
    m = ok.size
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# -----------------------------------------------------------------------------
# the analysis


def _class_reason(n_pos, n_neg):
    if n_pos == 0 and n_neg == 0:
        return "no known label in this group"
    if n_pos == 0:
        return f"no positive case in this group ({n_neg} negatives): AUC undefined"
    if n_neg == 0:
        return f"no negative case in this group ({n_pos} positives): AUC undefined"
    return None


def _one_group(probs, labels, classes, task, patients, thresholds, n_bootstrap, seed, n_bins):
    """One group's entry (evaluate.py's report on its rows, 95% CIs from its own patient bootstrap) and the macro
    AUC of each bootstrap resample (for the CI of the differences)."""
    rep = metrics.evaluation_report(probs, labels, classes, task, patients, thresholds, 0, seed, n_bins)
    boot = metrics.bootstrap_aucs(probs, labels, patients, n_bootstrap, seed, task)
    lo, hi, mlo, mhi = metrics.percentile_ci(boot)
    per_class = {}
    for c, name in enumerate(classes):
        r = rep["per_class"][name]
        per_class[name] = {"n_pos": r["n_pos"], "n_neg": r["n_neg"],
                           "prevalence": r["n_pos"] / (r["n_pos"] + r["n_neg"]) if r["n_pos"] + r["n_neg"] else None,
                           "auc": r["auc"], "auc_ci": [float(lo[c]), float(hi[c])], "threshold": r["threshold"],
                           "sensitivity": r["sensitivity"], "specificity": r["specificity"],
                           "reason": _class_reason(r["n_pos"], r["n_neg"])}
    macro, var = macro_auc_var(probs, labels, patients, task)
    g = {"n_images": rep["n_images"], "n_patients": rep["n_patients"], "bootstrap_seed": seed,
         "auc_macro": rep["auc_macro"], "auc_macro_ci": [mlo, mhi], "auc_macro_var": var,
         "ece": rep["ece"], "sensitivity_macro": rep["sensitivity_macro"],
         "specificity_macro": rep["specificity_macro"], "per_class": per_class}
    if rep["auc_macro"] != rep["auc_macro"]:
        g["reason"] = "no class has both a positive and a negative case in this group: no AUC"
    assert macro != macro or abs(macro - rep["auc_macro"]) < 1e-9, "macro AUC by midranks differs from sklearn's"
    return g, metrics.macro_of(boot)


def subgroup_analysis(probs, labels, classes, task, patients, columns, thresholds=None, n_bootstrap=1000,
                      seed=0, n_bins=15, alpha=0.05, age_bins=()):
    """columns: {column: group name per image (subgroup_values)}. Returns a dict of plain types (NaN -> None when
    saved): alpha, correction, n_tests, and per column its groups (in order), pairs and worst group. CIs are 95%
    whatever alpha, the level of the Holm-adjusted tests."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    patients = np.asarray(patients).astype(str)
    out = {"alpha": alpha, "n_bootstrap": n_bootstrap, "bootstrap_seed": seed, "age_bins": list(age_bins),
           "columns": {}}
    tests = []  # every pair with a p-value, of every column: Holm adjusts them together
    for column, values in columns.items():
        values = np.asarray(values, dtype=object)
        groups, boots = {}, {}
        for k, name in enumerate(_group_order(values, column, age_bins)):
            rows = np.nonzero(values == name)[0]
            groups[name], boots[name] = _one_group(probs[rows], labels[rows], classes, task, patients[rows],
                                                   thresholds, n_bootstrap, seed + k, n_bins)
        pairs = []
        for a, b in itertools.combinations(groups, 2):
            ga, gb = groups[a], groups[b]
            pair = {"a": a, "b": b, "auc_a": ga["auc_macro"], "auc_b": gb["auc_macro"]}
            missing = [n for n, g in ((a, ga), (b, gb)) if g["auc_macro"] != g["auc_macro"]]
            if missing:
                pairs.append({**pair, "diff": float("nan"), "diff_ci": [float("nan")] * 2, "p": float("nan"),
                              "reason": f"{' and '.join(missing)}: no AUC"})
                continue
            diff, se, z, p = pair_test(ga["auc_macro"], ga["auc_macro_var"], gb["auc_macro"], gb["auc_macro_var"])
            d = boots[a] - boots[b]
            d = d[~np.isnan(d)]
            ci = [float(v) for v in np.percentile(d, [2.5, 97.5])] if d.size else [float("nan")] * 2
            pair.update(diff=diff, diff_ci=ci, se=se, z=z, p=p)
            if p != p:
                pair["reason"] = "zero variance (too few patients): no test"
            pairs.append(pair)
            if p == p:
                tests.append(pair)
        out["columns"][column] = {"groups": groups, "pairs": pairs}
    adjusted = holm([t["p"] for t in tests])
    for t, ph in zip(tests, adjusted):
        t["p_holm"], t["gap"] = float(ph), bool(ph < alpha)
    out["n_tests"] = len(tests)
    out["correction"] = (f"Holm over {len(tests)} tests (the macro-AUC difference of every pair of groups within a "
                         f"column, all columns together); a gap is claimed when the adjusted p < {alpha}")
    for column, col in out["columns"].items():
        col["worst"] = _worst(col)
    return out


def _worst(col):
    """The group with the lowest macro AUC, against the best one: whether that gap is claimed."""
    scored = {n: g["auc_macro"] for n, g in col["groups"].items() if g["auc_macro"] == g["auc_macro"]}
    if len(scored) < 2:
        return None
    worst, best = min(scored, key=scored.get), max(scored, key=scored.get)
    pair = next(p for p in col["pairs"] if {p["a"], p["b"]} == {worst, best})
    sign = 1 if pair["a"] == worst else -1
    return {"group": worst, "auc_macro": scored[worst], "best": best, "auc_best": scored[best],
            "diff": sign * pair["diff"], "diff_ci": sorted(sign * v for v in pair["diff_ci"]),
            "p_holm": pair.get("p_holm", float("nan")), "gap": bool(pair.get("gap", False))}


# -----------------------------------------------------------------------------
# the printed table, the CSV, the forest plot


def _f(v, nd=3):
    return "-" if v is None or v != v else f"{v:.{nd}f}"


def format_subgroups(sub):
    lines = [f"{'subgroup':<22} {'images':>6} {'pat.':>5}  {'AUC':>5} {'[95% CI]':>15}  {'ECE':>5} {'sens':>5} "
             f"{'spec':>5}"]
    for column, col in sub["columns"].items():
        for name, g in col["groups"].items():
            ci = f"[{_f(g['auc_macro_ci'][0])}, {_f(g['auc_macro_ci'][1])}]"
            lines.append(f"{(column + '=' + name)[:22]:<22} {g['n_images']:>6} {g['n_patients']:>5}  "
                         f"{_f(g['auc_macro']):>5} {ci:>15}  {_f(g['ece']):>5} {_f(g['sensitivity_macro']):>5} "
                         f"{_f(g['specificity_macro']):>5}" + (f"  ({g['reason']})" if "reason" in g else ""))
        for p in col["pairs"]:
            ci = f"[{_f(p['diff_ci'][0])}, {_f(p['diff_ci'][1])}]"
            tail = (f"p {_f(p['p'], 4)}, Holm {_f(p.get('p_holm'), 4)}{' GAP' if p.get('gap') else ''}"
                    if "reason" not in p else p["reason"])
            lines.append(f"  {column}: {p['a']} - {p['b']}: {_f(p['diff'])} {ci} {tail}")
        w = col["worst"]
        if w is not None:
            lines.append(f"  worst {column}: {w['group']} (AUC {_f(w['auc_macro'])} vs {_f(w['auc_best'])} for "
                         f"{w['best']}): {'a gap is claimed' if w['gap'] else 'no gap is claimed'}")
    lines.append(f"macro AUC; CI: {sub['n_bootstrap']} patient-bootstrap resamples; " + sub["correction"])
    return "\n".join(lines)


def write_subgroups_csv(path, sub, classes):
    """One row per (column, group, class), the macro first; then one row per pair (class 'pair: a - b')."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["column", "group", "class", "n_images", "n_patients", "n_pos", "n_neg", "prevalence", "auc",
                    "ci_lo", "ci_hi", "sensitivity", "specificity", "ece", "p", "p_holm", "gap", "note"])
        cell = lambda v: "" if v is None or v != v else v  # noqa: E731
        for column, col in sub["columns"].items():
            for name, g in col["groups"].items():
                w.writerow([column, name, "macro", g["n_images"], g["n_patients"], "", "", "",
                            cell(g["auc_macro"]), cell(g["auc_macro_ci"][0]), cell(g["auc_macro_ci"][1]),
                            cell(g["sensitivity_macro"]), cell(g["specificity_macro"]), cell(g["ece"]), "", "", "",
                            g.get("reason", "")])
                for c in classes:
                    r = g["per_class"][c]
                    w.writerow([column, name, c, g["n_images"], g["n_patients"], r["n_pos"], r["n_neg"],
                                cell(r["prevalence"]), cell(r["auc"]), cell(r["auc_ci"][0]), cell(r["auc_ci"][1]),
                                cell(r["sensitivity"]), cell(r["specificity"]), "", "", "", "", r["reason"] or ""])
            for p in col["pairs"]:
                w.writerow([column, f"{p['a']} - {p['b']}", "macro difference", "", "", "", "", "", cell(p["diff"]),
                            cell(p["diff_ci"][0]), cell(p["diff_ci"][1]), "", "", "", cell(p["p"]),
                            cell(p.get("p_holm")), p.get("gap", ""), p.get("reason", "")])


def forest_plot(sub, overall=None, title=""):
    """Macro AUC of every group with its 95% CI, one row per group, grouped by column; overall: (AUC, lo, hi)."""
    plt = metrics.pyplot()
    rows = [(c, n, g) for c, col in sub["columns"].items() for n, g in col["groups"].items()]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.32 * len(rows)))
    labels = []
    for y, (column, name, g) in enumerate(rows):
        a, (lo, hi) = g["auc_macro"], g["auc_macro_ci"]
        w = sub["columns"][column]["worst"] or {}
        gap = w.get("group") == name and w["gap"]
        if a is not None and a == a:
            if lo is not None and lo == lo:
                ax.plot([lo, hi], [y, y], color="k", lw=1.2)
            ax.plot(a, y, "s", color="C3" if gap else "C0", ms=6)
        ax.text(1.0, y, f"  {_f(a)} [{_f(lo)}, {_f(hi)}]", va="center", fontsize=7, transform=ax.get_yaxis_transform())
        labels.append(f"{column}={name} (n {g['n_images']}, {g['n_patients']} pat.)" + (" *" if gap else ""))
    ax.set_yticks(list(range(len(rows))), labels, fontsize=7)
    if overall is not None and overall[0] == overall[0]:
        ax.axvline(overall[0], color="grey", ls=":", lw=1, label=f"all images {overall[0]:.3f}")
        ax.legend(fontsize=7, loc="lower left")
    ax.invert_yaxis()
    ax.set_xlabel("macro AUC (95% patient-bootstrap CI); * = gap claimed (Holm)", fontsize=8)
    ax.set_title(title or "subgroups", fontsize=9)
    fig.tight_layout()
    return fig
