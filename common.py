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
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

import data
import fusion
import model as models
import model_clip
from model_gpt import GPT, gpt_config_from_dict

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


def setup_distributed(device="auto", backend="auto"):
    """One process: returns a world of 1. Under torchrun: init_process_group and pick this rank's device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
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


def load_checkpoint(path, map_location="cpu"):
    return torch.load(path, map_location=map_location, weights_only=True)


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


# -----------------------------------------------------------------------------
# one loader for every checkpoint family: load_run(path) -> (model, meta, config)
# plain classifier and fusion model (train.py), pruned / int8 export (export.py), CLIP (train_clip.py), GPT
# (train_gpt.py); each rebuilt from its model_args, so a checkpoint never pickles code

# which commands read each family's checkpoints, for the sentence a wrong-family checkpoint gets
READ_BY = {"train.py": ("evaluate.py", "export.py", "cam.py", "serve.py"),
           "export.py": ("evaluate.py", "export.py", "cam.py", "serve.py"),
           "train_clip.py": ("train_clip.py", "train.py", "train_gpt.py"),  # teacher, text_init, image_init
           "train_gpt.py": ("sample.py",)}
RUN_INFO_KEYS = ("script", "iter", "iter_num", "best_metric", "export", "quant_mode", "pruned_shapes", "source",
                 "tokenizer")


def checkpoint_script(ck):
    """The script that wrote a checkpoint: its `script` key, or inferred from model_args for older files."""
    if ck.get("script"):
        return ck["script"]
    if ck.get("export"):
        return "export.py"
    args = ck.get("model_args", {})
    if "vocab_size" in args and "block_size" in args:
        return "train_gpt.py"
    if "text_model" in args and "embed_dim" in args:
        return "train_clip.py"
    return "train.py"


def load_run(path, device="cpu", weights="model", reader=None):
    """Any checkpoint nanorad writes -> (model in eval mode on device, meta, config). meta: what the run knew about
    its data (classes, task, mean / std, data_dir; a GPT's `data` dict); config: the run's knobs. The model carries
    .model_args and .run_info (iter, script, export kind, pruned shapes, tokenizer: the other small keys).
    weights: model | ema (the EMA copy, when trained with ema_decay > 0). reader: the calling command (e.g.
    "evaluate.py"): a checkpoint of a family it does not read is an error that names the command that does."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found: train one first (python train.py ...) or point at "
                                f"out/<run>/best.pt")
    ck = load_checkpoint(path)
    script = checkpoint_script(ck)
    if reader is not None and reader not in READ_BY.get(script, ()):
        readers = READ_BY.get(script, ())
        verb = "reads" if len(readers) == 1 else "read"
        raise ValueError(f"{path} is a {script} checkpoint; {', '.join(readers) or 'no command'} {verb} it, "
                         f"{reader} does not")
    net = build_from_checkpoint(ck, script)
    if weights == "ema":
        if ck.get("ema") is None:
            raise ValueError(f"weights='ema' but {path} holds no EMA weights (trained with ema_decay=0): use the "
                             f"raw weights (--weights=model / no --use_ema)")
        state = {k: v.to(ck["model"][k].dtype) for k, v in ck["ema"].items()}
    elif weights == "model":
        state = ck["model"]
    else:
        raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    if ck.get("export") == "int8":
        # quantized modules read their format version from the state dict's _metadata, which a weights_only load
        # does not restore; the freshly quantized structure has the same modules, so it lends its own
        state = OrderedDict(state)
        state._metadata = net.state_dict()._metadata
    net.load_state_dict(state)
    net.model_args = dict(ck["model_args"])
    net.run_info = {"script": script, **{k: ck[k] for k in RUN_INFO_KEYS if k in ck and k != "script"}}
    meta = ck.get("meta") or ck.get("data") or {}
    return net.to(device).eval(), meta, ck.get("config", {})


def build_from_checkpoint(ck, script=None):
    """The untrained module a checkpoint's weights fit: its family's builder on model_args, then the export
    surgery (pruned widths, int8 structure). load_run loads the weights into it."""
    script = script or checkpoint_script(ck)
    args = ck["model_args"]
    if script == "train_gpt.py":
        return GPT(gpt_config_from_dict(args))
    if script == "train_clip.py":
        return model_clip.build_clip(**args)
    net = fusion.build_any(args)  # fusion model or image classifier
    if ck.get("pruned_shapes"):
        apply_pruned_shapes(net, ck["pruned_shapes"])
    net.eval()
    if ck.get("export") == "int8":
        example = torch.zeros(1, args["in_chans"], args["image_size"], args["image_size"])
        net = quantize(net, ck["quant_mode"], calib=[example])  # the structure; the state dict brings the values
    return net


def model_input(x_u8, meta, model_args):
    """Stored uint8 pixels (B, 1, H, W) -> the normalized float input a loaded run was trained on (the run's
    mean / std or ImageNet statistics, its channels), resized when the pixels are not the run's image_size."""
    size = model_args.get("image_size", x_u8.shape[-1])
    x = data.to_float(x_u8, meta["mean"], meta["std"], model_args.get("in_chans", 1), meta.get("imagenet_norm", False))
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


# --- pruned exports: Linears resized, attention heads removed (export.py prunes, this rebuilds)


class HeadPrunedAttention(models.SelfAttention):
    """model.SelfAttention whose heads were removed: the inner width (n_head * head_dim) is smaller than n_embd,
    so q, k, v are split at the inner width (model.SelfAttention splits at n_embd). Same parameter names."""

    def __init__(self, attn, n_head):
        nn.Module.__init__(self)
        self.n_head, self.dropout, self.is_causal = n_head, attn.dropout, attn.is_causal
        self.c_attn, self.c_proj, self.resid_dropout = attn.c_attn, attn.c_proj, attn.resid_dropout

    def forward(self, x, attn_mask=None):
        B, T, _ = x.shape
        inner = self.c_proj.in_features
        hs = inner // self.n_head
        q, k, v = self.c_attn(x).split(inner, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=self.is_causal and attn_mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, inner)
        return self.resid_dropout(self.c_proj(y))


def set_module(root, name, module):
    """root.get_submodule(name) = module."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def apply_pruned_shapes(net, shapes):
    """Resize a freshly built model to a pruned checkpoint's widths (before load_state_dict)."""
    for name, (out_f, in_f) in shapes["linears"].items():
        old = net.get_submodule(name)
        set_module(net, name, nn.Linear(in_f, out_f, bias=old.bias is not None))
    for name, n_head in shapes["n_head"].items():
        set_module(net, name, HeadPrunedAttention(net.get_submodule(name), n_head))
    return net


# --- int8 exports: export.py quantizes with these, load_run rebuilds the same structure


class FoldedConvNeXtBlock(nn.Module):
    """model.ConvNeXtBlock with the layer scale folded into fc2 (fc2 becomes an ordinary Linear call). The original
    block reads fc2.weight inside F.linear, which a quantized Linear (weights packed, no .weight tensor) cannot serve."""

    def __init__(self, block):
        super().__init__()
        self.dwconv, self.norm, self.fc1, self.fc2 = block.dwconv, block.norm, block.fc1, block.fc2
        with torch.no_grad():
            self.fc2.weight.mul_(block.gamma[:, None])
            self.fc2.bias.mul_(block.gamma)

    def forward(self, x):  # (B, C, H, W), channels_last memory; drop path is a no-op at inference
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def fold_for_quantization(net):
    """Make every Linear a plain module call (ConvNeXt's layer scale folded into fc2). Returns net (modified)."""
    for stage in getattr(net, "stages", []):
        for i, block in enumerate(stage.blocks):
            if isinstance(block, models.ConvNeXtBlock):
                stage.blocks[i] = FoldedConvNeXtBlock(block)
    return net


def quantize_dynamic_linear(module):
    """Dynamic int8 of every nn.Linear in any module (ViT, ConvNeXt MLPs, CLIP towers, GPT): int8 weights, per-batch
    activation scales, fp32 elsewhere. A module that reads a Linear's .weight directly (weight tying, ConvNeXt's
    layer scale) must be folded first (fold_for_quantization)."""
    from torch.ao.quantization import quantize_dynamic  # torch.ao is imported only by the int8 paths
    return quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


def quantize_static_fx(net, calib):
    """FX graph-mode static int8 (x86 backend): conv/linear/add with int8 activations, ranges from the calib batches.
    For conv + BatchNorm nets (tv: resnet, densenet, efficientnet, ...)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(net.eval(), get_default_qconfig_mapping("x86"), (calib[0],))
    with torch.no_grad():
        for x in calib:
            prepared(x)
    return convert_fx(prepared)


def quantize(net, mode, calib):
    """net (fp32, eval) -> int8 copy of it. mode: dynamic | static (calib: list of normalized input batches)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices (torchao is its successor)
        if mode == "static":
            return quantize_static_fx(net, calib)
        return quantize_dynamic_linear(fold_for_quantization(net))

