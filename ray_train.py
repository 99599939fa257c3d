"""
Run train.py, train_clip.py or train_gpt.py on a Ray cluster: the same config files and --key=value overrides, on
num_workers Ray workers through ray.train.torch.TorchTrainer (optional dependency: pip install "ray[train]").

Ray starts the workers and makes the torch.distributed process group; the script's common.setup_distributed takes
that group as it is (rank, world size) and runs its own loop unchanged: the same batches, the same exact eval, the
same checkpoints. Rank 0 writes out_dir, which must be on storage every worker sees (a shared file system on a
multi-node cluster; run from the repository on that storage too, the workers start in this command's folder).
Each metrics.jsonl record is also reported to Ray, with a pointer to the run folder as Ray's checkpoint: main()
returns Ray's Result (.metrics = the last record, .metrics_dataframe = all of them).

Local Ray runtime, 2 CPU workers (what the tests do; equals torchrun --nproc_per_node=2):
    python ray_train.py train.py --num_workers=2 --device=cpu

A Ray cluster (ray start --head on one node, ray start --address=<head>:6379 on the others), 8 GPU workers, restarts
after a lost worker or node continue from out_dir/ckpt.pt exactly as torchrun --max-restarts does:
    python ray_train.py train.py config/convnext_chexpert.py --ray_address=auto --num_workers=8 --use_gpu=True \\
        --max_failures=3 --out_dir=/shared/out/chexpert

The other scripts the same way:
    python ray_train.py train_clip.py config/clip_phantom.py --num_workers=2 --device=cpu
    python ray_train.py train_gpt.py --num_workers=2 --device=cpu

The first argument names the script; num_workers, use_gpu, cpus_per_worker, max_failures and ray_address are this
launcher's knobs (on the command line), every other argument goes to the script. A restart (max_failures) reruns
the script with --init_from=resume; the first attempt keeps the script's own init_from (scratch, pretrained, ...).
"""

import importlib
import os
import sys
import uuid

import configurator
import tracking

# -----------------------------------------------------------------------------
# config: the launcher's own knobs (the script's come from its config files and the rest of the command line)
num_workers = 2  # Ray workers = DDP ranks; gradient_accumulation_steps must be divisible by it
use_gpu = False  # one GPU per worker (the script then picks cuda:<local rank>, NCCL)
cpus_per_worker = 1  # CPUs Ray reserves per worker
max_failures = 0  # restarts after a failed worker (-1 = unlimited); each restart resumes from out_dir/ckpt.pt
ray_address = ""  # "" = a local Ray runtime on this machine; auto = the cluster `ray start` joined; ray://host:10001
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per knob; CHECKS: across knobs)
RANGES = dict(max_failures="[-1, inf)", num_workers="[1, 1024]")
SCRIPTS = ("train.py", "train_clip.py", "train_gpt.py")
HERE = os.path.dirname(os.path.abspath(__file__))


def split_argv(argv):
    """['train.py', config files and --key=value ...] -> (script module name, launcher argv, script argv)."""
    if not argv or os.path.basename(argv[0]) not in SCRIPTS:
        raise ValueError(f"the first argument names the script to run, one of {', '.join(SCRIPTS)}: e.g. "
                         f"python ray_train.py train.py config/x.py --num_workers=4 (got {argv[:1]})")
    own, rest = [], []
    for a in argv[1:]:
        key = a[2:].split("=", 1)[0] if a.startswith("--") else None
        (own if key in DEFAULTS else rest).append(a)
    return os.path.basename(argv[0])[:-3], own, rest


def _restarted(out_dir, launch_id, rank):
    """True when this worker already started once in this launch (Ray restarted the group after a failure). Each rank
    keeps its own marker, so every rank decides the same without a collective before the script sets its device."""
    marker = os.path.join(out_dir, "ray", f"launch_rank{rank}")
    seen = os.path.exists(marker) and open(marker).read() == launch_id
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as f:
        f.write(launch_id)
    return seen


def _worker(config):
    """One Ray worker: the script's main() in the launch folder, on the process group Ray made."""
    import ray.train
    os.chdir(config["cwd"])
    script = importlib.import_module(config["script"])
    argv = list(config["argv"])
    rank = ray.train.get_context().get_world_rank()
    if _restarted(config["out_dir"], config["launch_id"], rank) and os.path.exists(os.path.join(config["out_dir"], "ckpt.pt")):
        argv.append("--init_from=resume")
    script.main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("--help", "-h") for a in argv):  # the launcher's usage and knobs (a script's own: python train.py --help)
        configurator.load(DEFAULTS, ["--help"])
    script, own, rest = split_argv(argv)
    cfg = configurator.load(DEFAULTS, own)
    # a bad key or value fails here, not on the cluster (whose workers may have the GPUs this machine lacks)
    run_cfg = configurator.load(importlib.import_module(script).DEFAULTS, rest, here=False)
    trackers = [t for t in run_cfg["trackers"].split(",") if t.strip()]
    rest = rest + [f"--trackers={','.join(trackers + ['ray'])}"]  # each metrics.jsonl record is reported to Ray too
    out_dir = os.path.abspath(run_cfg["out_dir"])
    ray = tracking.require("ray", '"ray[train]"', "ray_train.py")
    train_api = tracking.require("ray.train", '"ray[train]"', "ray_train.py")
    FailureConfig, RunConfig, ScalingConfig = train_api.FailureConfig, train_api.RunConfig, train_api.ScalingConfig
    TorchTrainer = tracking.require("ray.train.torch", '"ray[train]"', "ray_train.py").TorchTrainer

    if not ray.is_initialized():
        # the workers import this file and the script from the repository (a shared path on a cluster)
        path = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address=cfg["ray_address"] or None, runtime_env={"env_vars": {"PYTHONPATH": path}})
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"script": script, "argv": rest, "cwd": os.getcwd(), "out_dir": out_dir,
                           "launch_id": uuid.uuid4().hex},
        scaling_config=ScalingConfig(num_workers=cfg["num_workers"], use_gpu=cfg["use_gpu"],
                                     resources_per_worker={"CPU": cfg["cpus_per_worker"], **({"GPU": 1} if cfg["use_gpu"] else {})}),
        run_config=RunConfig(name="run", storage_path=os.path.join(out_dir, "ray"),
                             failure_config=FailureConfig(max_failures=cfg["max_failures"])),
    )
    result = trainer.fit()
    print(f"ray_train: {script}.py on {cfg['num_workers']} workers finished | out_dir {out_dir}", flush=True)
    return result  # .metrics: the last metrics.jsonl record; .metrics_dataframe: all of them


if __name__ == "__main__":
    configurator.cli(main)
