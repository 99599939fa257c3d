"""Shared fixtures: small prepared phantoms, made once per test session."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real"  # reference files; tests that need them skip when absent

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def real_dir():
    if not REAL.is_dir():
        pytest.skip(f"reference data {REAL} is absent")
    return REAL


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """600 images at 32 px: enough for loop mechanics (resume, DDP, losses), not for learning."""
    import data
    out = tmp_path_factory.mktemp("phantom32")
    data.prepare_phantom(str(out), n_images=600, image_size=32, seed=0)
    return str(out)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """`python train.py` as the README's quick start runs it (defaults: 12,000 phantom images at 64 px, convnext_atto,
    800 steps), in a temporary folder; made once per session (~5 min on 2 cores) and shared by the slow tests that
    need a trained image model: the learning check, and the CLIP and report-GPT recipes that start from it."""
    import train
    root = tmp_path_factory.mktemp("quickstart")
    data_dir, out_dir = root / "phantom", root / "out"
    final = train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--tensorboard_log=False", "--log_interval=100"])
    return dict(data_dir=str(data_dir), out_dir=str(out_dir), best=str(out_dir / "best.pt"), final=final)


@pytest.fixture(scope="session")
def clip_phantom_run(tmp_path_factory, quickstart_run):
    """python train_clip.py config/clip_phantom.py after the quick start (the two-stage phantom CLIP, ~2-3 min on 2
    cores): the CLIP learning check reads its numbers, and the CLIP distillation test uses it as the teacher."""
    import train_clip
    out = tmp_path_factory.mktemp("clip_phantom") / "run"
    final = train_clip.main([str(ROOT / "config" / "clip_phantom.py"), f"--data_dir={quickstart_run['data_dir']}",
                             f"--out_dir={out}", f"--image_init={quickstart_run['best']}", "--device=cpu",
                             "--tensorboard_log=False"])
    return dict(data_dir=quickstart_run["data_dir"], out_dir=str(out), best=str(out / "best.pt"), final=final)


@pytest.fixture(scope="session")
def phantom_long_run(tmp_path_factory, quickstart_run):
    """python train.py config/convnext_phantom_long.py on the quick start's data (2,400 steps with augmentation, ~14
    min on 2 cores): the stronger phantom classifier the report GPT starts its image encoder from."""
    import train
    out = tmp_path_factory.mktemp("phantom_long") / "run"
    final = train.main([str(ROOT / "config" / "convnext_phantom_long.py"), f"--data_dir={quickstart_run['data_dir']}",
                        f"--out_dir={out}", "--tensorboard_log=False", "--log_interval=200"])
    return dict(data_dir=quickstart_run["data_dir"], out_dir=str(out), best=str(out / "best.pt"), final=final)
