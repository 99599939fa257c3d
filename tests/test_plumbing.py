"""The plumbing the three train scripts share (common.py): bit-exact resume, one checkpoint schema, slim best.pt,
the run folder's refusals, selection on undefined metrics, the batch plan, the optimizer step, the step timer, and
every config/*.py against its script's knobs."""

import glob
import json
import os
import time

import numpy as np
import pytest
import torch

import common
import configurator
import sweep
import text_data
import train
import train_clip
import train_gpt
from conftest import ROOT

FAST = ["--tensorboard=False", "--log_interval=1", "--device=cpu"]
SCRIPTS = {
    "train.py": (train, ["--model=convnext_atto", "--image_size=32", "--batch_size=8", "--eval_batch_size=128",
                         "--warmup_iters=1", "--learning_rate=1e-3", "--drop_path=0.1", "--mixup_alpha=0.2",
                         "--augment=True", "--ema_decay=0.9"]),
    "train_clip.py": (train_clip, ["--image_size=32", "--batch_size=8", "--gradient_accumulation_steps=2",
                                   "--tokenizer=bpe", "--bpe_vocab_size=300", "--vision_width=32", "--vision_layers=1",
                                   "--vision_heads=2", "--text_width=32", "--text_layers=1", "--text_heads=2",
                                   "--embed_dim=16", "--val_size=50", "--warmup_iters=1", "--drop_path=0.1"]),
    "train_gpt.py": (train_gpt, ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
                                 "--eval_max_windows=8", "--warmup_iters=1", "--dropout=0.1"]),
}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    text_data.main(["--dataset=phantom_reports", "--tokenizer=bpe", "--vocab_size=300", "--n_images=300", f"--out_dir={out}"])
    return str(out)


def _run(script, data_dir, out, *extra):
    module, args = SCRIPTS[script]
    return module.main([f"--data_dir={data_dir}", f"--out_dir={out}", *FAST, *args, *extra])


def _ckpt(out, name="ckpt.pt"):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_same(a, b, where):
    """Every tensor (and every other value) of two checkpoint trees is identical."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_phantom, text_dir):
    """resumed(script): 4 steps straight, and 2 steps + a resume to 4 (a record past the checkpoint left in
    metrics.jsonl, as a killed run leaves it), made once per module. Returns (straight dir, resumed dir)."""
    root, runs = tmp_path_factory.mktemp("resume"), {}

    def make(script):
        if script not in runs:
            data_dir = text_dir if script == "train_gpt.py" else tiny_phantom
            steps = ["--eval_interval=2", "--lr_decay_iters=4"]
            straight, half = str(root / f"{script}_straight"), str(root / f"{script}_resumed")
            _run(script, data_dir, straight, "--max_iters=4", *steps)
            _run(script, data_dir, half, "--max_iters=2", *steps)
            with open(os.path.join(half, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"split": "train", "iter": 3, "loss": 1.0}) + "\n")
            _run(script, data_dir, half, "--max_iters=4", "--init_from=resume", *steps)
            runs[script] = (straight, half)
        return runs[script]
    return make


# train.py's weights-only resume check is in the fast suite (test_train.py::test_resume_is_exact)
@pytest.mark.parametrize("script", [pytest.param("train.py", marks=pytest.mark.slow), "train_clip.py", "train_gpt.py"])
def test_resume_is_bit_exact_and_keeps_the_run_folder_clean(resumed, script):
    straight, half = resumed(script)
    a, b = _ckpt(straight), _ckpt(half)
    assert a["iter"] == b["iter"] == 4
    for key in common.CKPT_KEYS:
        if key != "config":  # out_dir and max_iters of the first half differ by construction
            _assert_same(a[key], b[key], key)
    # metrics.jsonl: the same records in the same order, none duplicated, one final
    keys = lambda out: [(r.get("split"), r.get("iter"), bool(r.get("final"))) for r in _records(out)]  # noqa: E731
    assert keys(straight) == keys(half)
    # the resumed run kept the original config.json
    assert json.load(open(os.path.join(half, "config.json")))["max_iters"] == 2


@pytest.mark.slow
def test_one_checkpoint_schema_and_slim_best(resumed):
    for script in SCRIPTS:
        straight = resumed(script)[0]
        ck, best = _ckpt(straight), _ckpt(straight, "best.pt")
        assert tuple(ck) == common.CKPT_KEYS and tuple(best) == common.CKPT_KEYS, script
        assert ck["script"] == script and ck["meta"]["data_hash"] and len(ck["rng"]) == 1
        assert set(ck["rng"][0]["numpy"]) == {"keys", "pos", "has_gauss", "gauss"} and "gauss_next" in ck["rng"][0]["python"]
        assert ck["optimizer"] and all(best[k] is None for k in common.TRAINING_STATE), script
    # best.pt holds weights and metrics only: <= 1.2x the weights of the model (train.py, no EMA)
    straight = resumed("train.py")[0]
    model = _ckpt(straight, "best.pt")["model"]
    weights = os.path.join(straight, "weights_only.pt")
    torch.save(model, weights)
    common.save_checkpoint({**_ckpt(straight, "best.pt"), "ema": None}, os.path.join(straight, "best_no_ema.pt"))
    ratio = os.path.getsize(os.path.join(straight, "best_no_ema.pt")) / os.path.getsize(weights)
    assert ratio <= 1.2, ratio


@pytest.mark.parametrize("script", ["train.py", "train_gpt.py"])
def test_eval_only_evaluates_a_resumed_run(tmp_path, tiny_phantom, text_dir, script):
    """--init_from=resume --eval_only=True on a finished run evaluates its last checkpoint once (it was a silent
    no-op: the step a resumed run starts from is not evaluated again) and saves nothing."""
    data_dir = text_dir if script == "train_gpt.py" else tiny_phantom
    out = str(tmp_path / "run")
    _run(script, data_dir, out, "--max_iters=2", "--eval_interval=2", "--lr_decay_iters=2")
    ckpt = _ckpt(out)
    _run(script, data_dir, out, "--max_iters=2", "--eval_interval=2", "--lr_decay_iters=2", "--init_from=resume",
         "--eval_only=True")
    key = "val_loss" if script == "train_gpt.py" else "auc_macro"
    at_2 = [r[key] for r in _records(out) if r.get("split") == "val" and r.get("iter") == 2 and not r.get("final")]
    assert len(at_2) == 2 and at_2[1] == pytest.approx(at_2[0], rel=1e-6)  # training's eval, then eval_only's
    _assert_same(_ckpt(out)["model"], ckpt["model"], "model")


def test_refusals_name_the_fix(tmp_path, tiny_phantom, text_dir):
    out = str(tmp_path / "run")
    _run("train_clip.py", tiny_phantom, out, "--max_iters=0")
    with pytest.raises(FileExistsError, match="already holds a run.*--overwrite=True"):
        _run("train_clip.py", tiny_phantom, out, "--max_iters=0")
    _run("train_clip.py", tiny_phantom, out, "--max_iters=0", "--overwrite=True")
    assert len([r for r in _records(out) if r.get("final")]) == 1
    # resume onto other data: refused unless allow_data_change
    other = str(tmp_path / "other_phantom")
    import data
    data.prepare_phantom(other, n_images=300, image_size=32, seed=1)
    with pytest.raises(ValueError, match="other data.*--allow_data_change=True"):
        _run("train_clip.py", other, out, "--max_iters=1", "--init_from=resume")
    _run("train_clip.py", other, out, "--max_iters=1", "--init_from=resume", "--allow_data_change=True")
    # a failed start leaves no run folder behind
    failed = tmp_path / "failed"
    with pytest.raises(ValueError, match="init_from"):
        _run("train_gpt.py", text_dir, str(failed), "--init_from=bogus")
    assert not failed.exists()
    # another script's checkpoint is not resumed
    with pytest.raises(ValueError, match="train_clip.py checkpoint"):
        _run("train_gpt.py", text_dir, out, "--init_from=resume")


def _multilabel(tmp_path, val_labels):
    import data
    rng = np.random.default_rng(0)
    imgs = (rng.random((60, 32, 32)) * 255).astype(np.uint8)
    y = (rng.random((60, 2)) < 0.4).astype(np.float32)
    y[40:50] = val_labels
    recs = [{"path": f"x{i}.png", "patient_id": f"p{i}", "study_id": f"s{i}"} for i in range(60)]
    splits = {"train": (imgs[:40], y[:40], recs[:40]), "val": (imgs[40:50], y[40:50], recs[40:50]),
              "test": (imgs[50:], y[50:], recs[50:])}
    d = str(tmp_path / f"ml{int(val_labels.sum())}")
    data.write_prepared(d, splits, {"name": "toy", "task": "multilabel", "classes": ["a", "b"], "image_size": 32,
                                    "source": "test"})
    return d


def test_undefined_selection_metric(tmp_path):
    # class b has no positives in val: select on class a, and say so in the eval line
    partial = np.zeros((10, 2), np.float32)
    partial[:5, 0] = 1
    out = str(tmp_path / "partial")
    _run("train.py", _multilabel(tmp_path, partial), out, "--max_iters=0")
    assert "over 1/2 classes; no positives or no negatives in val: b" in open(os.path.join(out, "train.log")).read()
    # no class defined: an error naming the metric and the cause
    with pytest.raises(ValueError, match="select_metric='auc_macro' is nan.*no positives in val"):
        _run("train.py", _multilabel(tmp_path, np.zeros((10, 2), np.float32)), str(tmp_path / "none"), "--max_iters=0")


def test_config_dump_shows_what_differs(tmp_path, tiny_phantom):
    out = str(tmp_path / "run")
    _run("train.py", tiny_phantom, out, "--max_iters=0")
    head = open(os.path.join(out, "train.log")).read().split("data:")[0]
    assert "max_iters" in head and "phantom_images" not in head and "mfu" not in head
    assert json.load(open(os.path.join(out, "config.json")))["phantom_images"] == train.DEFAULTS["phantom_images"]


def test_every_config_loads_against_its_script():
    scripts = {"clip_": train_clip, "distill_clip_": train_clip, "gpt_": train_gpt, "sweep_": sweep}
    files = sorted(glob.glob(str(ROOT / "config" / "*.py")))
    assert len(files) >= 20
    for path in files:
        name = os.path.basename(path)
        module = next((m for prefix, m in sorted(scripts.items(), key=lambda kv: -len(kv[0])) if name.startswith(prefix)), train)
        configurator.load(module.DEFAULTS, [path])


def test_one_vocabulary_with_aliases(capsys):
    cfg = configurator.load(train_gpt.DEFAULTS, ["--init_from=finetune", "--init_path=x/ckpt.pt", "--tensorboard_log=False"])
    assert cfg["init_from"] == "pretrained" and cfg["pretrained_path"] == "x/ckpt.pt" and cfg["tensorboard"] is False
    assert "deprecated" in capsys.readouterr().out
    for module in (train, train_clip, train_gpt):
        for key in ("tensorboard", "init_from", "pretrained_path", "overwrite", "allow_data_change", "dist_timeout",
                    "select_metric", "early_stop_patience", "keep_last"):
            assert key in module.DEFAULTS, (module.__name__, key)


def test_batch_plan_rounds_with_a_note():
    assert common.batch_plan(8, 4, 2) == (2, 32, None)
    accum, global_batch, note = common.batch_plan(8, 1, 2)
    assert (accum, global_batch) == (1, 16) and "does not divide by 2 ranks" in note


def test_optimizer_step_logs_the_unscaled_norm():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(5, 4)
    loss = net(x).pow(2).mean()
    ref = torch.linalg.vector_norm(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))]))
    scaler.scale(net(x).pow(2).mean()).backward()
    norm = common.optimizer_step(opt, scaler, list(net.parameters()), grad_clip=0.0)
    assert torch.allclose(norm, ref, rtol=1e-5), (float(norm), float(ref))


def test_step_timer_leaves_out_the_eval():
    timer = common.Timer("cpu")
    with timer.paused():
        time.sleep(0.3)
    timer.step()
    assert timer.lap() < 0.1
