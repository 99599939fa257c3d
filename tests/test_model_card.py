"""Issue 36: evaluate.py writes model_card.md / model_card.json from what the run knows; every number of the card's
evaluation sections is a number of eval_test.json, every other number one of model_card.json; serve.py's /v1/models
returns the card. Also the paper figures: CI and n_pos per ROC / PR panel, PR precision on [0, 1] with the
prevalence labelled, a reliability panel per class with bin counts, a title naming model, split and n; a heatmap of
a prediction near 0 is not drawn saturated."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import cam
import evaluate
import metrics
import serve
import train


@pytest.fixture(scope="module")
def carded_run(tmp_path_factory, tiny_phantom):
    """2 training steps at 32 px on tiny_phantom (600 images), then evaluate.py --subgroups=sex,age on its test
    split (~9 s on 2 quiet cores, most of it the 2-step run's two evaluations and checkpoints)."""
    out = tmp_path_factory.mktemp("card") / "run"
    train.main([f"--data_dir={tiny_phantom}", f"--out_dir={out}", "--model=convnext_atto", "--image_size=32",
                "--max_iters=2", "--batch_size=16", "--eval_interval=2", "--device=cpu", "--compile=False",
                "--tensorboard=False"])
    rep = evaluate.main([f"--ckpt={out / 'best.pt'}", "--subgroups=sex,age", "--n_bootstrap=20", "--figures=False",
                         "--tensorboard=False", "--device=cpu"])
    return out, rep, tiny_phantom


def _numbers(text):
    """Every number written in text, after removing paths, hex hashes and the '95%' of '95% CI'."""
    text = re.sub(r"\S*/\S*", " ", text)
    text = re.sub(r"\b[0-9a-f]{16,64}\b", " ", text)
    text = text.replace("95%", " ")
    return re.findall(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?", text)


def _allowed(obj):
    """The ways a value of a JSON object may be written in the card."""
    out = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, bool) or v is None:
            return
        elif isinstance(v, int):
            out.update({str(v), f"{v:,}"})
        elif isinstance(v, float):
            out.update({f"{v:.3f}", f"{v:.4f}", f"{v:.2g}", f"{v:.0f}", repr(v), f"{v:g}"})
        elif isinstance(v, str):
            out.update(_numbers(v))
    walk(obj)
    return out


@pytest.mark.slow  # the fixture: a 2-step training run and an evaluation, ~9-20 s on 2 shared cores
def test_model_card_numbers_come_from_the_evaluation_and_the_run(carded_run):
    out, rep, data_dir = carded_run
    md = (out / "model_card.md").read_text()
    card = json.loads((out / "model_card.json").read_text())
    ev = json.loads((out / "eval_test.json").read_text())
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    first = md.splitlines()[0]
    assert "PHANTOM run" in first and "FIXTURE run: 2 training steps" in first
    assert f"data_hash: {meta['data_hash']}" in md and card["training_data"]["data_hash"] == meta["data_hash"]
    assert f"macro AUC {ev['auc_macro']:.3f} [{ev['auc_macro_ci'][0]:.3f}, {ev['auc_macro_ci'][1]:.3f}]" in md
    for c, r in ev["per_class"].items():
        lo, hi = r["auc_ci"]
        assert f"| {c} | {r['n_pos']} | {r['n_neg']} | {r['auc']:.3f} | [{lo:.3f}, {hi:.3f}] |" in md
    for column, col in ev["subgroups"]["columns"].items():
        for name, g in col["groups"].items():
            assert f"| {column}={name} | {g['n_images']} | {g['n_patients']} | {g['auc_macro']:.3f} |" in md
    # the evaluation sections: every number is one of eval_test.json's
    start = md.index("## Evaluation data")
    end = md.index("## Ethical considerations")
    evaluation = md[start:end]
    allowed = _allowed(ev)
    missing = [n for n in _numbers(evaluation) if n not in allowed]
    assert not missing, f"numbers of the card's evaluation sections not in eval_test.json: {missing}"
    # the rest: every number is one of model_card.json's, whose metrics are eval_test.json's
    missing = [n for n in _numbers(md[:start] + md[end:]) if n not in _allowed(card)]
    assert not missing, f"numbers of model_card.md not in model_card.json: {missing}"
    assert card["metrics"]["auc_macro"] == ev["auc_macro"] and card["metrics"]["ece"] == ev["ece"]
    assert card["metrics"]["per_class"]["Edema"]["auc_ci"] == ev["per_class"]["Edema"]["auc_ci"]
    assert card["training"]["steps"] == 2 and card["model"]["parameters"] > 1e6
    assert card["training"]["git_commit"] == rep.get("git_commit", card["training"]["git_commit"])
    # serve.py's /v1/models carries it (the same function describe() calls), and the page links it
    got = serve.run_model_card(str(out / "best.pt"))
    assert got["model_card"] == card and got["model_card_md"] == md
    assert serve.run_model_card(str(out / "no_such_dir" / "best.pt")) == {}
    with open(serve.__file__.replace("serve.py", "serve.html")) as f:
        assert "model_card_md" in f.read()


@pytest.mark.slow  # shares the fixture above; its own evaluation of the val split is ~3 s
def test_model_card_only_for_the_runs_own_test_split(carded_run, capsys):
    out, _, _ = carded_run
    before = (out / "model_card.json").read_text()
    evaluate.main([f"--ckpt={out / 'best.pt'}", "--split=val", "--n_bootstrap=0", "--figures=False",
                   "--tensorboard=False", "--device=cpu"])
    assert "model card: not written" in capsys.readouterr().out
    assert (out / "model_card.json").read_text() == before


def test_figures_carry_ci_n_and_fixed_axes():
    rng = np.random.default_rng(0)
    classes = ["A", "B"]
    y = (rng.random((200, 2)) < 0.2).astype(np.float64)
    probs = np.clip(0.4 * y + 0.6 * rng.random((200, 2)), 0, 1)
    rep = metrics.evaluation_report(probs, y, classes, "multilabel", np.arange(200).astype(str), None, 20, 0)
    rep.update(model="convnext_atto", split="test")
    figs = metrics.make_figures(probs, y, classes, "multilabel", rep)
    title = "convnext_atto | test | n = 200 images, 200 patients"
    assert all(title in f.get_suptitle() for f in figs.values())
    for kind in ("roc", "pr"):
        ax = figs[kind].axes[0]
        assert ax.get_title() == f"A (n_pos {rep['per_class']['A']['n_pos']})"
        lo, hi = rep["per_class"]["A"]["auc_ci"]
        assert f"[{lo:.3f}, {hi:.3f}]" in ax.get_legend().get_texts()[0].get_text()
    pr = figs["pr"].axes[0]
    assert pr.get_ylim() == (0, 1)
    assert any(t.get_text() == f"prevalence {y[:, 0].mean():.3f}" for t in pr.get_legend().get_texts())
    rel = figs["reliability"].axes
    assert [a.get_title().split(" (")[0] for a in rel[:3]] == ["all classes", "A", "B"]
    counts = sorted(int(t.get_text()) for t in rel[1].texts)
    assert sum(counts) == 200  # every prediction of class A, bin by bin


def test_heatmap_of_a_prediction_near_zero_is_not_drawn_saturated():
    gray = np.full((32, 32), 100, np.uint8)
    heat = np.ones((8, 8))  # a map normalised to its own maximum: 1 everywhere
    full = cam.overlay(gray, heat).astype(int)
    faint = cam.overlay(gray, heat, strength=0.02).astype(int)
    assert np.abs(full - 100).max() >= 40 and np.abs(faint - 100).max() <= 1
