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
