"""A user's mistake on the command line ends in one line, `error: <sentence naming the thing and the fix>`, on stderr
and exit code 2 (configurator.cli), not a traceback. Each case runs the script as a person types it and fails during
config or setup, before any data or model work (a few seconds each, most of it importing torch)."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "NANORAD_TRACEBACK"}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stderr.strip().splitlines()


def assert_user_error(rc, lines, *names):
    assert rc == 2, f"exit code {rc}, stderr: {lines}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {lines[-5:]}"
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"


def test_unknown_config_key():
    assert_user_error(*run("train.py", "--bogus=1"), "'bogus'")


def test_bad_config_value():
    assert_user_error(*run("train.py", "--batch_size=abc"), "batch_size", "int")


def test_missing_config_file():
    assert_user_error(*run("train.py", "config/no_such_recipe.py"), "config/no_such_recipe.py")


COMMANDS = ("train", "train_clip", "train_gpt", "evaluate", "sample", "export", "serve", "sweep", "data", "bench",
            "ray_train")


def test_help_lists_every_knob_with_its_default_and_meaning():
    """`--help` (or -h): the command's docstring, then each knob with its default and the comment beside it in the
    source (the tracker knobs' from tracking.py); exit code 0. Once as typed, then in-process for every command."""
    import importlib

    import configurator
    p = subprocess.run([sys.executable, "train.py", "-h"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr[-2000:]
    assert p.stdout.startswith("Train an image classifier"), p.stdout[:200]
    lines = {ln.split()[0]: ln for ln in p.stdout.splitlines() if ln.startswith("  --")}
    assert "= 20" in lines["--log_interval"] and "iterations between log lines" in lines["--log_interval"]
    assert "view with: tensorboard --logdir out" in lines["--tensorboard"]  # tracking.KNOBS = dict(tensorboard=True, # ...)
    for name in COMMANDS:
        mod = importlib.import_module(name)
        listed = [ln.split()[0][2:] for ln in configurator.usage(mod.DEFAULTS, mod).splitlines() if ln.startswith("  --")]
        assert listed == list(mod.DEFAULTS), name
    with pytest.raises(SystemExit) as e:  # whatever else is on the line
        configurator.load(mod.DEFAULTS, ["config/none.py", "--bogus=1", "--help"])
    assert e.value.code == 0


def test_missing_data(tmp_path):
    rc, lines = run("train.py", "--dataset=chexpert", f"--data_dir={tmp_path / 'nodata'}", f"--out_dir={tmp_path / 'run'}",
                    "--tensorboard_log=False")
    assert_user_error(rc, lines, str(tmp_path / "nodata"), "python data.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without a CUDA GPU")
def test_cuda_without_gpu(tmp_path):
    assert_user_error(*run("train.py", "--device=cuda", f"--out_dir={tmp_path}"), "device='cuda'", "--device=cpu")


def test_checkpoint_of_another_script(tmp_path):
    gpt = tmp_path / "gpt.pt"
    torch.save({"model": {}, "model_args": {"n_layer": 1, "n_embd": 8}, "tokenizer": {"kind": "char"}}, gpt)
    assert_user_error(*run("evaluate.py", f"--ckpt={gpt}"), str(gpt), "train_gpt.py checkpoint", "sample.py reads it")
    clf = tmp_path / "best.pt"
    torch.save({"model": {}, "model_args": {"model": "convnext_atto", "num_classes": 2}}, clf)
    assert_user_error(*run("sample.py", f"--ckpt_path={clf}"), str(clf), "train.py checkpoint", "evaluate.py")


def test_missing_image(tmp_path):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"")
    missing = tmp_path / "no_such_xray.png"
    assert_user_error(*run("evaluate.py", f"--ckpt={ckpt}", f"--image={missing}"), str(missing))


def test_traceback_on_request():
    env = dict(os.environ, NANORAD_TRACEBACK="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "train.py", "--bogus=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1 and "Traceback" in p.stderr and "ConfigError" in p.stderr


def test_report_from_image_recipe_names_its_image_model(tmp_path, monkeypatch):
    # config/gpt_report_from_image.py starts its encoder from out/phantom_long/best.pt: the error names the recipe
    # that writes it, config/convnext_phantom_long.py (not the quick start)
    import model as models
    monkeypatch.chdir(tmp_path)
    net = models.build_model("convnext_atto", 2, in_chans=1, image_size=64)
    with pytest.raises(FileNotFoundError, match=r"python train\.py config/convnext_phantom_long\.py writes it"):
        models.load_image_init(net, "out/phantom_long/best.pt")


def test_longer_classifier_recipe_names_the_quick_start(tmp_path, monkeypatch):
    # config/convnext_phantom_long.py continues the quick start (pretrained_path=out/quickstart/best.pt): without it
    # the error names the command that writes it and the other way
    import model as models
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"pretrained_path='out/quickstart/best.pt' does not exist.*"
                                                r"python train\.py config/quickstart\.py writes it.*--init_from=scratch"):
        models.require_weights("out/quickstart/best.pt", "pretrained_path", "--init_from=scratch")
