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
    800 steps), in a temporary folder; made once per session (~3 min on 2 cores) and shared by the slow tests that
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
    """python train.py config/convnext_phantom_long.py after the quick start (its model continued 1,200 steps with
    augmentation, ~5-6 min on 2 cores): the stronger phantom classifier the report GPT starts its image encoder from."""
    import train
    out = tmp_path_factory.mktemp("phantom_long") / "run"
    final = train.main([str(ROOT / "config" / "convnext_phantom_long.py"), f"--data_dir={quickstart_run['data_dir']}",
                        f"--pretrained_path={quickstart_run['best']}", f"--out_dir={out}", "--tensorboard_log=False",
                        "--log_interval=200"])
    return dict(data_dir=quickstart_run["data_dir"], out_dir=str(out), best=str(out / "best.pt"), final=final)


# -----------------------------------------------------------------------------
# serve.py: checkpoints trained in the tests, shared by tests/test_serve.py and tests/test_browser.py


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory, tiny_phantom):
    """Tiny checkpoints for the inference service (~15 s on 2 cores): a classifier (train.py, convnext_atto at 32 px,
    4 steps on tiny_phantom), a 1-step CLIP on the same data (plumbing only) and an image-conditioned report GPT
    with a finding head (train_gpt.py on 200 phantom (image, report) pairs at 32 px)."""
    import text_data
    import train
    import train_clip
    import train_gpt
    root = tmp_path_factory.mktemp("serve_models")
    train.main([f"--data_dir={tiny_phantom}", f"--out_dir={root / 'cls'}", "--model=convnext_atto", "--image_size=32",
                "--batch_size=16", "--max_iters=4", "--eval_interval=4", "--lr_decay_iters=4", "--warmup_iters=2",
                "--learning_rate=2e-3", "--tensorboard_log=False", "--log_interval=4"])
    train_clip.main([f"--data_dir={tiny_phantom}", f"--out_dir={root / 'clip1'}", *SERVE_CLIP, "--max_iters=1",
                     "--eval_interval=1", "--val_size=50"])
    text_data.main(["--dataset=phantom_pairs", "--tokenizer=bpe", "--vocab_size=400", "--n_images=200",
                    "--image_size=32", f"--out_dir={root / 'pairs'}"])
    train_gpt.main([f"--data_dir={root / 'pairs'}", f"--out_dir={root / 'gpt'}", "--cond=image", "--n_prefix=4",
                    "--prefix_width=16", "--n_layer=1", "--n_head=2", "--n_embd=32", "--aux_cls_weight=1.0",
                    "--max_iters=2", "--eval_interval=2", "--eval_reports=0", "--batch_size=8", "--warmup_iters=1",
                    "--device=cpu", "--tensorboard=False"])
    return dict(data_dir=tiny_phantom, classifier=str(root / "cls" / "best.pt"), clip=str(root / "clip1" / "ckpt.pt"),
                gpt=str(root / "gpt" / "ckpt.pt"), pairs=str(root / "pairs"))


SERVE_CLIP = ["--image_size=32", "--device=cpu", "--tensorboard_log=False", "--tokenizer=bpe", "--bpe_vocab_size=300",
              "--batch_size=32", "--vision_width=64", "--vision_layers=2", "--vision_heads=2", "--patch_size=8",
              "--text_width=64", "--text_layers=1", "--text_heads=2", "--embed_dim=32", "--context_length=48",
              "--augment=False", "--warmup_iters=10", "--log_interval=100"]


@pytest.fixture(scope="session")
def serve_clip(tmp_path_factory, tiny_phantom):
    """A small CLIP trained 300 steps on tiny_phantom's 413 train pairs without augmentation (~40 s on 2 cores). At
    32 px it does not generalise (test R@5 ~ chance), but it has learned its training pairs (own-caption R@5 ~0.6 on
    them, chance 0.012): an index of the train split shows that search encodes images and reports like training."""
    import train_clip
    out = tmp_path_factory.mktemp("serve_clip") / "run"
    train_clip.main([f"--data_dir={tiny_phantom}", f"--out_dir={out}", *SERVE_CLIP, "--max_iters=300",
                     "--eval_interval=300", "--lr_decay_iters=300", "--val_size=50"])
    return dict(data_dir=tiny_phantom, clip=str(out / "ckpt.pt"))
