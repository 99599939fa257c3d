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
