"""ray_train.py on a local Ray runtime (2 CPU workers): train.py through Ray Train equals torchrun --nproc_per_node=2,
and a worker killed mid-run is restarted by Ray (max_failures) and resumes from ckpt.pt to the same weights as an
uninterrupted run. Skips without ray[train] (CI installs it)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT

pytest.importorskip("ray.train")
import ray_train  # noqa: E402

ARGS = ["--model=convnext_atto", "--image_size=32", "--batch_size=8", "--eval_batch_size=64", "--log_interval=5",
        "--warmup_iters=2", "--learning_rate=1e-3", "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10",
        "--gradient_accumulation_steps=2", "--device=cpu", "--tensorboard_log=False"]


def weights(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)["model"]


def worst_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, tiny_phantom):
    """train.py, 20 iterations, through ray_train.py on 2 local CPU workers (starts the local Ray runtime)."""
    import ray
    out = str(tmp_path_factory.mktemp("ray") / "run")
    try:
        result = ray_train.main(["train.py", f"--data_dir={tiny_phantom}", f"--out_dir={out}", *ARGS, "--num_workers=2"])
        yield out, result.metrics_dataframe
    finally:
        ray.shutdown()


def test_launcher_argv_is_split_and_checked():
    assert ray_train.split_argv(["train.py", "config/x.py", "--num_workers=4", "--max_iters=5"]) == \
        ("train", ["--num_workers=4"], ["config/x.py", "--max_iters=5"])
    with pytest.raises(ValueError, match="names the script"):
        ray_train.split_argv(["config/x.py"])


@pytest.mark.slow
def test_ray_equals_torchrun(tmp_path, tiny_phantom, ray_run):
    out, metrics = ray_run
    ref = str(tmp_path / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
                    f"--data_dir={tiny_phantom}", f"--out_dir={ref}", *ARGS], check=True, cwd=ROOT, env=env, timeout=900)
    assert worst_diff(weights(out), weights(ref)) <= 1e-5
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["world_size"] == 2 and cfg["trackers"] == "tensorboard,ray"
    # every metrics.jsonl record was reported to Ray: Result.metrics_dataframe has one row per record
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    # (the step records of log_interval=5 and the eval records of eval_interval=10, then the final one)
    assert list(metrics["step"]) == [r.get("iter", r.get("iters")) for r in recs] == [0, 5, 10, 10, 15, 20, 20, 20]
    evals = [i for i, r in enumerate(recs) if r.get("split") == "val" and not r.get("final")]
    assert list(metrics["val/auc_macro"].iloc[evals]) == pytest.approx([recs[i]["auc_macro"] for i in evals])
    assert metrics["final/best_metric"].iloc[-1] == pytest.approx(recs[-1]["best_metric"])


def _ray_workers():
    """Pids of this test process's Ray Train workers (descendants whose command line names RayTrainWorker)."""
    parent = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    found = []
    for pid in parent:
        q = pid
        while q in parent and q != os.getpid():
            q = parent[q]
        if q == os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"RayTrainWorker" in f.read():
                        found.append(pid)
            except OSError:
                pass
    return sorted(found)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_resumes(tmp_path, tiny_phantom, ray_run):
    straight, _ = ray_run
    out = str(tmp_path / "killed")
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline and not os.path.exists(os.path.join(out, "ckpt.pt")):  # iter 10, written atomically
            time.sleep(0.05)
        workers = _ray_workers()
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])

    t = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    t.start()
    ray_train.main(["train.py", f"--data_dir={tiny_phantom}", f"--out_dir={out}", *ARGS, "--num_workers=2", "--max_failures=2"])
    t.join(timeout=5)
    assert killed, "no Ray worker was found to kill"
    log = open(os.path.join(out, "train.log")).read()
    assert "resumed from" in log, "the restarted workers did not resume from ckpt.pt"
    assert worst_diff(weights(straight), weights(out)) <= 1e-5
