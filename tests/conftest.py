"""Shared fixtures (small prepared phantoms and the learning runs, made once per test session) and the schedule of
the parallel run: `python -m pytest` runs the tests in pytest-xdist workers (pytest.ini: -n auto --dist loadgroup),
one per core up to four, each with its share of the cores as torch threads (one each on 2 cores)."""

import contextlib
import fcntl
import json
import os
import pickle
import sys
from pathlib import Path

CORES = os.cpu_count() or 1
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# OMP_NUM_THREADS set by the person running the tests (or tests/perturb.py) is every torch thread count, the quick
# start's included: the learning checks must hold on 1 thread as on 2 (docs/tests.md, "Learning checks").
# The xdist controller records the caller's value before it sets its own; the workers inherit the record.
os.environ.setdefault("NANORAD_PINNED_THREADS", os.environ.get("OMP_NUM_THREADS", ""))
PINNED = int(os.environ["NANORAD_PINNED_THREADS"]) if os.environ["NANORAD_PINNED_THREADS"].isdigit() else None
THREADS = PINNED or max(1, min(2, CORES // WORKERS))
# Before torch is imported, so that the subprocesses the tests start inherit them too. Idle OpenMP threads sleep
# instead of spinning: a ConvNeXt-atto step at 64 px, two threads, beside a one-thread process on 2 cores: 410 ms
# (default spin: 634 ms, the other process 527 instead of 372 ms); alone 243 vs 231 ms.
os.environ["OMP_NUM_THREADS"] = str(THREADS)
if WORKERS > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real"  # reference files; tests that need them skip when absent

torch.set_num_threads(THREADS)


@contextlib.contextmanager
def readme_threads():
    """Two torch threads for the quick start (the README's figures were measured so), unless OMP_NUM_THREADS pins
    every thread count. The checks downstream no longer depend on it: their spread over 1 and 2 threads, AVX2 and
    AVX-512 kernels is in docs/tests.md."""
    before = torch.get_num_threads()
    torch.set_num_threads(PINNED or 2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -----------------------------------------------------------------------------
# learning checks: a metric against its bar, recorded for tests/perturb.py

LEARNING_LOG = os.environ.get("NANORAD_LEARNING_LOG")  # a JSON-lines file; tests/perturb.py sets it per perturbation


@pytest.fixture
def learning(request):
    """check(name, value, bar, above=True): assert value >= bar (value <= bar with above=False). Under
    tests/perturb.py each check also appends {test, name, value, bar, above} to NANORAD_LEARNING_LOG and a failed
    one fails the test at its end, after the later checks were recorded too: the spread of every learning check
    over kernels and thread counts is measured rather than guessed."""
    failed = []

    def check(name, value, bar, above=True):
        value = float(value)
        if LEARNING_LOG:
            with open(LEARNING_LOG, "a") as f:
                f.write(json.dumps(dict(test=request.node.nodeid, name=name, value=value, bar=bar, above=above)) + "\n")
        if not (value >= bar if above else value <= bar):
            failed.append(f"{name} = {value:.4f}, bar {'>=' if above else '<='} {bar}")
            assert LEARNING_LOG, failed[-1]
    yield check
    assert not failed, "; ".join(failed)


def pytest_xdist_auto_num_workers(config):
    """-n auto: one worker per core, up to four (PYTEST_XDIST_AUTO_NUM_WORKERS=k overrides; -n 0: one process)."""
    return int(os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", min(CORES, 4)))


# The learning runs take ~80% of the suite's CPU time. They go first, in two groups that xdist (loadgroup) gives one
# worker each: the quick start and the runs that continue it (with the rest of test_gpt.py after them, so that the
# worker holds more than two pending tests and takes no other group before its chain is done); and the other learning
# runs, those that do not need the quick start first (~6 min, the quick start's time: it is built once, by the worker
# that asks first, and read by the others, see `_once`). The other files follow as groups of their own, longest
# first, so that module fixtures are made once and the two workers end together. Without xdist (-n 0) the same order
# runs in one process.
SCHEDULE = {  # test or file -> group; groups in order of first appearance, a group's listed tests first
    "test_evaluate.py::test_quickstart_evaluation_writes_the_figures": "quickstart",
    "test_train.py::test_phantom_run_learns": "quickstart",
    "test_gpt.py::test_report_from_image_names_the_findings": "quickstart",
    "test_gpt.py": "quickstart",
    "test_reports.py::test_gpt_beats_xz_on_real_reports": "learning",
    "test_compare.py::test_phantom_study_end_to_end": "learning",
    "test_ray.py": "learning",
    "test_clip.py::test_clip_phantom_learns": "learning",
    "test_clip.py::test_clip_distillation_beats_the_student_alone": "learning",
    "test_fusion.py::test_fusion_recipe_beats_vision_by_002_at_64px": "learning",
    "test_export.py::test_distillation_improves_student": "learning",
    "test_faults.py": "test_faults.py",
    "test_phantom.py": "test_phantom.py",
    "test_user_errors.py": "test_user_errors.py",
    "test_tracking.py": "test_tracking.py",
    "test_serve.py": "serve", "test_browser.py": "serve",  # serve_models is built once for both files
    "test_train.py": "test_train.py",
    "test_fusion.py": "test_fusion.py",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the groups into node id suffixes
def pytest_collection_modifyitems(config, items):
    keys, groups = list(SCHEDULE), list(dict.fromkeys(SCHEDULE.values()))
    for item in items:
        test, name = f"{item.path.name}::{item.originalname}", item.path.name
        group = SCHEDULE.get(test) or SCHEDULE.get(name, name)
        item.add_marker(pytest.mark.xdist_group(group))
        key = test if test in keys else name
        item.stash[_ORDER] = (groups.index(group) if group in groups else len(groups),
                              keys.index(key) if key in keys else len(keys))
    items.sort(key=lambda item: item.stash[_ORDER])  # stable: otherwise pytest's order


_ORDER = pytest.StashKey[tuple]()


def _once(tmp_path_factory, name, build):
    """build(folder) -> result, run once for the whole session: the first worker to ask builds it under a file lock
    in the folder all workers share; the others wait for it and read the result back."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    if os.environ.get("NANORAD_TEST_CACHE"):  # tests/perturb.py: the runs outlive the session, for reruns
        root = Path(os.environ["NANORAD_TEST_CACHE"])
        root.mkdir(parents=True, exist_ok=True)
    folder, done = root / name, root / f"{name}.pkl"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            folder.mkdir(exist_ok=True)
            done.write_bytes(pickle.dumps(build(folder)))
        return pickle.loads(done.read_bytes())


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

    def build(root):
        data_dir, out_dir = root / "phantom", root / "out"
        with readme_threads():
            final = train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--tensorboard_log=False",
                                "--log_interval=100"])
        return dict(data_dir=str(data_dir), out_dir=str(out_dir), best=str(out_dir / "best.pt"), final=final)
    return _once(tmp_path_factory, "quickstart", build)


@pytest.fixture(scope="session")
def clip_phantom_run(tmp_path_factory, quickstart_run):
    """python train_clip.py config/clip_phantom.py after the quick start (the two-stage phantom CLIP, ~2-3 min on 2
    cores): the CLIP learning check reads its numbers, and the CLIP distillation test uses it as the teacher."""
    import train_clip

    def build(root):
        out = root / "run"
        final = train_clip.main([str(ROOT / "config" / "clip_phantom.py"), f"--data_dir={quickstart_run['data_dir']}",
                                 f"--out_dir={out}", f"--image_init={quickstart_run['best']}", "--device=cpu",
                                 "--tensorboard_log=False"])
        return dict(data_dir=quickstart_run["data_dir"], out_dir=str(out), best=str(out / "best.pt"), final=final)
    return _once(tmp_path_factory, "clip_phantom", build)


@pytest.fixture(scope="session")
def phantom_long_run(tmp_path_factory, quickstart_run):
    """python train.py config/convnext_phantom_long.py after the quick start (its model continued 1,200 steps with
    augmentation, ~5-6 min on 2 cores): the stronger phantom classifier the report GPT starts its image encoder from."""
    import train

    def build(root):
        out = root / "run"
        final = train.main([str(ROOT / "config" / "convnext_phantom_long.py"),
                            f"--data_dir={quickstart_run['data_dir']}", f"--pretrained_path={quickstart_run['best']}",
                            f"--out_dir={out}", "--tensorboard_log=False", "--log_interval=200"])
        return dict(data_dir=quickstart_run["data_dir"], out_dir=str(out), best=str(out / "best.pt"), final=final)
    return _once(tmp_path_factory, "phantom_long", build)


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
