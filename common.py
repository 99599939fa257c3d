"""
What train.py, train_clip.py and train_gpt.py share: distributed setup, logging, the LR schedule,
the optimizer, atomic checkpoints and the exact gather used by evaluation. Plain functions only;
each script still shows its own loop.
"""

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist

# -----------------------------------------------------------------------------
# distributed setup (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)


@dataclass
class Dist:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str
    master: bool


def resolve_device(device):
    """'auto' -> cuda when torch sees a GPU, else cpu; a CUDA device that is not there is the user's error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA GPU: use --device=cpu (or auto), or install a "
                         f"CUDA build of torch")
    return device


def setup_distributed(device="auto", backend="auto"):
    """One process: returns a world of 1. Under torchrun: init_process_group and pick this rank's device."""
    device = resolve_device(device)
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return Dist(False, 0, 0, 1, device, True)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return Dist(True, rank, local_rank, world, device, rank == 0)


def cleanup_distributed():
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# precision


def resolve_dtype(name, device):
    """'auto' -> bfloat16 on a CUDA GPU that supports it, else float32 (CPU bf16 is emulated and ~100x slower)."""
    if name == "auto":
        cuda = device.startswith("cuda")
        name = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else ("float16" if cuda else "float32")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16, float16 or auto, got {name!r}")
    if name == "float16" and not device.startswith("cuda"):
        raise ValueError("dtype='float16' needs CUDA; use float32 on CPU")
    return name


def autocast(device, dtype):
    if dtype == "float32":
        return contextlib.nullcontext()
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def start_run(script, cfg, dist, log, save_config=True):
    """The first lines of every train script: a header, the resolved config (printed; config.json in out_dir on
    the master), per-rank seeds, TF32 matmuls on CUDA."""
    import configurator
    log.line(f"nanorad {script} | world {dist.world_size} | device {dist.device} | dtype {cfg['dtype']}")
    log.line(configurator.format_config(cfg))
    if dist.master and save_config:
        with open(os.path.join(cfg["out_dir"], "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    seed_everything(cfg["seed"] + dist.rank)
    if dist.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# learning rate and optimizer


def get_lr(it, lr, warmup_iters, plateau_iters, lr_decay_iters, min_lr):
    """Linear warmup -> constant plateau -> cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it < warmup_iters + plateau_iters:
        return lr
    if it >= lr_decay_iters:
        return min_lr
    start = warmup_iters + plateau_iters
    ratio = (it - start) / max(1, lr_decay_iters - start)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(groups, lr, betas, device):
    """AdamW over param groups that carry 'lr_scale'; the fused kernel on CUDA (one launch per step)."""
    groups = [g for g in groups if len(g["params"]) > 0]
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def grad_norm(parameters):
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


# -----------------------------------------------------------------------------
# checkpoints: atomic, plain types, loadable with weights_only=True


def plain(obj):
    """numpy scalars/arrays -> Python numbers/lists, recursively, so torch.load(weights_only=True) accepts the file."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_checkpoint(obj, path):
    tmp = f"{path}.tmp"
    torch.save(plain(obj), tmp)
    os.replace(tmp, path)


# which command reads the checkpoints each training script writes (for the error when another one is given)
CHECKPOINT_READERS = {"train.py": "evaluate.py, export.py and cam.py read it", "train_gpt.py": "sample.py reads it",
                      "train_clip.py": "train_clip.py --eval_only=True reads it"}


def checkpoint_writer(ck):
    """The training script that wrote checkpoint dict `ck`, told from what it holds."""
    a = ck.get("model_args") or {}
    if "tokenizer" in ck or ("n_layer" in a and "text_model" not in a):
        return "train_gpt.py"
    return "train_clip.py" if "text_model" in a and "modalities" not in a else "train.py"


def load_checkpoint(path, map_location="cpu", reader=None, writer="train.py"):
    """torch.load of a checkpoint of plain types; with `reader` (the calling script), one written by another script
    than `writer` is the user's error, named in a sentence."""
    ck = torch.load(path, map_location=map_location, weights_only=True)
    if reader is not None and checkpoint_writer(ck) != writer:
        got = checkpoint_writer(ck)
        raise ValueError(f"{path} is a {got} checkpoint; {CHECKPOINT_READERS[got]}, {reader} does not (it reads "
                         f"{writer} checkpoints)")
    return ck


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(), "python": random.getstate()[1]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model):
    """The raw module under DDP and torch.compile: what we save, evaluate and generate with."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# -----------------------------------------------------------------------------
# exact distributed gather: every sample once, whatever the world size


def gather_indexed(idx, values, dist):
    """idx: (N,) int64, values: (N, ...) on this rank. Returns all ranks' rows sorted by idx, padding dropped."""
    idx = torch.as_tensor(idx, dtype=torch.int64)
    values = torch.as_tensor(values)
    if dist.ddp:
        comm_device = dist.device if dist.device.startswith("cuda") else "cpu"
        n = torch.tensor([idx.numel()], device=comm_device)
        sizes = [torch.zeros_like(n) for _ in range(dist.world_size)]
        tdist.all_gather(sizes, n)
        max_n = int(max(s.item() for s in sizes))
        pad = max_n - idx.numel()
        idx_p = torch.cat([idx, idx.new_full((pad,), -1)]).to(comm_device)
        val_p = torch.cat([values, values.new_zeros((pad,) + values.shape[1:])]).to(comm_device)
        idx_list = [torch.empty_like(idx_p) for _ in range(dist.world_size)]
        val_list = [torch.empty_like(val_p) for _ in range(dist.world_size)]
        tdist.all_gather(idx_list, idx_p)
        tdist.all_gather(val_list, val_p)
        idx = torch.cat([t[: int(s.item())] for t, s in zip(idx_list, sizes)]).cpu()
        values = torch.cat([t[: int(s.item())] for t, s in zip(val_list, sizes)]).cpu()
    order = torch.argsort(idx)
    idx, values = idx[order], values[order]
    assert idx.unique().numel() == idx.numel(), "gather_indexed: a sample was seen by two ranks"
    return idx, values


def all_reduce_mean(x, dist):
    if dist.ddp:
        x = x.clone()
        tdist.all_reduce(x, op=tdist.ReduceOp.AVG if dist.device.startswith("cuda") else tdist.ReduceOp.SUM)
        if not dist.device.startswith("cuda"):
            x /= dist.world_size
    return x


# -----------------------------------------------------------------------------
# MFU: achieved FLOP/s over the device's dense peak

PEAK_FLOPS = {  # dense, no sparsity; from the vendors' datasheets
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 19.5e12,
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 67e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 67e12,
    ("L4", "bfloat16"): 121e12, ("L4", "float32"): 30.3e12,
    ("4090", "bfloat16"): 165e12, ("4090", "float32"): 82.6e12,
}


def device_peak_flops(device, dtype):
    """Peak FLOP/s of this GPU from the table, or None (CPU: bench.py measures a matmul peak instead)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for (key, dt), peak in PEAK_FLOPS.items():
        if key in name and dt == ("float32" if dtype == "float32" else "bfloat16"):
            return peak
    return None


# -----------------------------------------------------------------------------
# logging: stdout + out_dir/train.log, TensorBoard scalars, out_dir/metrics.jsonl


class Logger:
    def __init__(self, out_dir, tensorboard=True, master=True):
        self.master, self.out_dir, self.tb = master, out_dir, None
        if not master:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.log_file = open(os.path.join(out_dir, "train.log"), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed (pip install tensorboard); logging to train.log and metrics.jsonl only")
            else:
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def line(self, text):
        if self.master:
            print(text, flush=True)
            self.log_file.write(text + "\n")
            self.log_file.flush()

    def scalars(self, values, step, prefix=""):
        if self.tb is not None:
            for k, v in values.items():
                if v is not None and np.isfinite(v):
                    self.tb.add_scalar(prefix + k, v, step)

    def jsonl(self, record):
        if self.master:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self):
        if self.master:
            if self.tb is not None:
                self.tb.close()
            self.log_file.close()


class Timer:
    """Wall time between calls, synchronising CUDA so the number is the real step time."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.t = time.perf_counter()

    def lap(self):
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def format_eta(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
