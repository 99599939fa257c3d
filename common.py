"""
What train.py, train_clip.py and train_gpt.py share: distributed setup, logging, the LR schedule,
the optimizer, atomic checkpoints and the exact gather used by evaluation. Plain functions only;
each script still shows its own loop.
"""

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

# torch.distributed.nn.functional is imported here, before any process group exists, on purpose: its functions take
# `group=group.WORLD` as a default argument, evaluated on import. DDP imports it lazily, after init_process_group, and
# its defaults then hold the default group for good: destroy_process_group no longer frees it, gloo's threads and
# sockets outlive it, and a rank whose peer exits first died at exit with SIGABRT ("terminate called without an
# active exception"; torch 2.14: 2 of 47 two-rank torchrun runs on CPU; 0 of 40 with this import). Test in
# tests/test_faults.py.
if tdist.is_available():
    import torch.distributed.nn.functional  # noqa: F401

import configurator
import tracking

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


def setup_distributed(device="auto", backend="auto", timeout_s=None):
    """One process: returns a world of 1. Under torchrun: init_process_group and pick this rank's device. Under
    ray_train.py the group exists already (Ray made it): its rank and world size are used as they are.
    timeout_s (the scripts' dist_timeout knob): a collective that a peer does not join within it fails on the other
    ranks with a sentence naming the silent ranks (cleanup_distributed writes it), instead of torch's 30 min hang."""
    device = resolve_device(device)
    launched = tdist.is_available() and tdist.is_initialized()  # a launcher made the group (ray_train.py): use it
    ddp = launched or int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return Dist(False, 0, 0, 1, device, True)
    if launched:
        rank, local_rank, world = tdist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), tdist.get_world_size()
    else:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if not tdist.is_initialized():
        timeout = timedelta(seconds=timeout_s) if timeout_s else timedelta(minutes=30)  # 30 min: torch's default
        _STORE["store"], _STORE["timeout_s"] = _rendezvous_store(rank, world, timeout), timeout.total_seconds()
        try:
            tdist.init_process_group(backend=backend, store=_STORE["store"], rank=rank, world_size=world, timeout=timeout)
        except RuntimeError as e:  # a rank that never starts: the same sentence as a hung collective
            if _is_collective_failure(e):
                raise _silent_peers_error(e) from e
            raise
    return Dist(True, rank, local_rank, world, device, rank == 0)


_STORE = {}  # this process's rendezvous store and timeout: cleanup_distributed asks it who stopped answering


def _rendezvous_store(rank, world, timeout):
    """The TCP store at MASTER_ADDR:MASTER_PORT (hosted by torchrun's agent, or by rank 0 without one), seen through
    a prefix per torchrun restart. torchrun keeps one store for all restarts of a run, and torch's env:// rendezvous
    adds no such prefix: restarted workers read the dead round's gloo addresses and hang in init_process_group
    (issue 13; read in torch/distributed/elastic/rendezvous/dynamic_rendezvous.py, which shares the store)."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                           is_master=rank == 0 and not agent_hosts, timeout=timeout)
    # One node: all ranks share the count. Several nodes: an agent restarted by another node's failure counts it too
    # when its own ranks failed with it (their peer vanished), the usual case; if not, the counts differ and the
    # ranks fail after dist_timeout with the sentence naming the silent ranks, rather than hanging.
    return tdist.PrefixStore(f"nanorad/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def cleanup_distributed():
    """destroy_process_group; called from the scripts' `finally`. When the exception on its way out is a collective
    that timed out or lost its peer, it is replaced by one sentence that names the ranks that stopped answering."""
    failure = sys.exc_info()[1]
    error = _silent_peers_error(failure) if _STORE and _is_collective_failure(failure) else None
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _STORE.clear()
    if error is not None:
        raise error from failure


def _is_collective_failure(e):
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Timed out", "timed out", "Timeout", "wait timeout", "Connection reset by peer", "Connection closed by peer"))


def _silent_peers_error(failure, grace_s=5.0):
    """Every rank whose collective failed checks in at the store and waits up to grace_s for the others: the ranks
    that never check in are the ones that stopped answering (hung, crashed, or never reached the collective)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store, timeout_s = _STORE["store"], _STORE["timeout_s"]
    what = str(failure).strip().splitlines()[0][:200]
    try:
        store.set(f"failed/{rank}", "1")
        deadline = time.monotonic() + min(grace_s, timeout_s)
        while True:
            answered = [r for r in range(world) if store.check([f"failed/{r}"])]
            if len(answered) == world or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except RuntimeError as e:  # the store itself is gone (its host died): say what we know
        return RuntimeError(f"rank {rank}: a collective failed ({what}) and the rendezvous store at "
                            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} no longer answers ({e}); "
                            f"read the other ranks' output for the first error")
    silent = [r for r in range(world) if r not in answered]
    if not silent:
        return RuntimeError(f"rank {rank}: a collective failed on every rank ({what}); dist_timeout={timeout_s:g} s")
    return RuntimeError(
        f"rank {rank}: rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped answering: a collective "
        f"got no answer within dist_timeout={timeout_s:g} s or lost its peer ({what}), while rank"
        f"{'s' if len(answered) > 1 else ''} {', '.join(map(str, answered))} waited in it; read rank {silent[0]}'s output "
        f"for a crash or a hang (a stuck data read, a rank that skipped a collective), or raise --dist_timeout if "
        f"that rank is only slow")


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


def start_run(script, cfg, dist, log, defaults, save_config=True):
    """The first lines of every train script: a header, the knobs that differ from the defaults (the full config is
    config.json in out_dir, with the provenance() fields, written by the master unless a resumed run keeps the
    original or the run only evaluates), the tracker tags, per-rank seeds, TF32."""
    log.line(f"nanorad {script} | world {dist.world_size} | device {dist.device} | dtype {cfg['dtype']} | "
             f"config (changed from the defaults; all of it in {cfg['out_dir']}/config.json):")
    log.line(configurator.format_config(cfg, defaults))
    prov = tracking.provenance(cfg, dist.world_size)
    log.set_tags(script=script, **prov)
    if dist.master and save_config and not cfg["eval_only"]:
        with open(os.path.join(cfg["out_dir"], "config.json"), "w") as f:
            json.dump({**cfg, **prov}, f, indent=2)
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


def make_optimizer(groups, lr, betas, device, kind="adamw", momentum=0.9, nesterov=False):
    """AdamW (or SGD with momentum: kind='sgd', e.g. for linear probes) over param groups that carry 'lr_scale'; the
    fused kernel on CUDA (one launch per step). Each group's weight_decay is SGD's L2 term as it is AdamW's decay."""
    groups = [g for g in groups if len(g["params"]) > 0]
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    fused = device.startswith("cuda")
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    if kind == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0 (e.g. --momentum=0.9)")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=fused)
    raise ValueError(f"optimizer must be adamw or sgd, got {kind!r}")


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


def temp_path(path):
    """path's temp file for an atomic write, named after this process: two processes writing the same file never
    share (and truncate) one temp file."""
    return f"{path}.{os.getpid()}.tmp"


def save_checkpoint(obj, path):
    """torch.save to a temp file, fsync it, os.replace onto path, fsync the folder: after a crash or power loss path is
    the old checkpoint or the new one, never a mix. A failed write (a full disk: OSError from the file, RuntimeError
    from torch's zip writer) removes the partial temp file and raises one sentence naming the folder and the bytes."""
    tmp = temp_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(tmp, "wb") as f:
            torch.save(plain(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        written = os.path.getsize(tmp) if os.path.isfile(tmp) else 0
        # measured before the partial file is removed: a full disk shows (almost) nothing free. torch's zip writer
        # reports a failed write as RuntimeError ("unexpected pos"), without an errno.
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else None
        full = e.errno in (errno.ENOSPC, errno.EDQUOT) if isinstance(e, OSError) else free is not None and free < 2**20
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not full:
            raise
        raise OSError(errno.ENOSPC, f"no space left on {folder} while writing {path} ({written:,} bytes written before "
                                    f"the disk filled, {free:,} bytes free now; the partial {tmp} was removed): free "
                                    f"space there or point out_dir at a larger disk") from e
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu", flag=None, wants=()):
    """torch.load(weights_only=True): no code runs. A file that is not torch's format (text, an image, a CSV), a
    truncated or empty file, or a pickle of Python objects is one sentence naming it (and, for a damaged one, the
    files next to it that may hold the run: an interrupted save's temp file, older checkpoints, best.pt). With flag
    and wants (the knob that named the file, the scripts whose checkpoints it reads), a checkpoint of another family
    is one sentence too (check_checkpoint_kind)."""
    check_torch_file(path)
    try:
        with warnings.catch_warnings():  # torch's own rebuild of int8 (quantized) tensors uses the old TypedStorage
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
            ck = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise ValueError(f"{path} holds Python objects other than tensors and plain types, which nanorad does not "
                             f"unpickle (no code runs from a checkpoint): load it only if you trust it, and save its "
                             f"state dict with torch.save(model.state_dict(), ...)") from e
        raise damaged_file_error(path, e) from e
    if wants:
        check_checkpoint_kind(ck, path, flag, wants)
    return ck


# which commands read each family's checkpoints, for the sentence a checkpoint of the wrong family gets
READ_BY = {"train.py": ("evaluate.py", "export.py", "cam.py", "serve.py"),
           "export.py": ("evaluate.py", "export.py", "cam.py", "serve.py"),
           "train_clip.py": ("train_clip.py", "train.py", "train_gpt.py"),  # teacher, text_init, image_init
           "train_gpt.py": ("sample.py",)}

READ_WITH = {  # the flags that take each family's checkpoints
    "train.py": "evaluate.py --ckpt, export.py --ckpt, serve.py --classifier, train.py --teacher_ckpt / "
                "--pretrained_path",
    "export.py": "evaluate.py --ckpt, export.py --ckpt, serve.py --classifier",
    "train_clip.py": "train_clip.py --teacher_ckpt, train.py --vision_init / --text_init (with --modalities), "
                     "serve.py --clip",
    "train_gpt.py": "sample.py --ckpt_path, train_gpt.py --pretrained_path, serve.py --gpt"}


def checkpoint_script(ck):
    """The script that wrote a checkpoint: its `script` key, or inferred from model_args for older files."""
    if ck.get("script"):
        return ck["script"]
    if ck.get("export"):
        return "export.py"
    args = ck.get("model_args") or {}
    if "text_model" in args or "embed_dim" in args:
        return "train_clip.py"
    if "model" not in args and ("n_layer" in args or "vocab_size" in args):  # a GPT config has no 'model' name
        return "train_gpt.py"
    return "train.py"


def check_checkpoint_kind(ck, path, flag, wants):
    """A checkpoint of a family the flag does not read (a CLIP as --teacher_ckpt of train.py) is one sentence naming
    the script that wrote it, the script whose checkpoint the flag needs, and the commands that read this one."""
    script = checkpoint_script(ck) if isinstance(ck, dict) else None
    if script in wants:
        return
    what = f"a {script} checkpoint" if script else f"a {type(ck).__name__}, not a nanorad checkpoint"
    readers = f" (a {script} checkpoint goes to {READ_WITH[script]})" if script in READ_WITH else ""
    raise ValueError(f"{flag}={path} is {what}; {flag} needs a {' or '.join(wants)} checkpoint{readers}")


ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"  # torch.save's zip archive (torch >= 1.6); the older raw pickle


def check_torch_file(path, run_file=True):
    """Refuse, before torch.load, a file that torch.save did not write (its unpickler turns text into KeyError: 101)
    and a zip archive cut short (no central directory): one sentence each, naming the file (damaged_file_error)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise damaged_file_error(path, EOFError("the file is empty"), run_file)
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise damaged_file_error(path, zipfile.BadZipFile("the zip archive has no central directory: cut short"),
                                     run_file)
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("data.pkl") for n in z.namelist()):
                return
        looks = "a zip archive without torch's data.pkl"
    elif head.startswith(PICKLE_MAGIC):
        return
    else:
        text = head[:32].decode("utf-8", "replace").splitlines()[0]
        looks = (f"a text file starting {text!r}" if all(c.isprintable() or c == "\t" for c in text)
                 else f"its first bytes are {head[:8]!r}")
    raise ValueError(f"{path} is not a checkpoint, not a file torch.save wrote ({looks}): pass a .pt / .pth file that "
                     f"torch.save wrote, e.g. out/<run>/best.pt")


def damaged_file_error(path, e, run_file=True):
    """The sentence for a torch file that does not read back (truncated, empty, corrupt), with what to try: for a run's
    checkpoint (run_file) the files next to it that may hold the run, for weights from elsewhere a fresh copy."""
    size = os.path.getsize(path)
    reason = (str(e).strip().splitlines() or ["end of file"])[0].split(". ")[0][:120]
    fix = _checkpoint_alternatives(path) if run_file else "copy or download it again"
    return ValueError(f"{path} is corrupt or truncated ({size} bytes; {reason}): {fix}")


def _checkpoint_alternatives(path):
    """Where the run may still be: path's temp files (a save interrupted before its rename), then the other .pt files
    of the folder (periodic ckpt_<iter>.pt, best.pt), newest first."""
    folder = os.path.dirname(os.path.abspath(path))
    others = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".pt")]
    others = sorted((p for p in others if os.path.abspath(p) != os.path.abspath(path) and os.path.getsize(p) > 0),
                    key=os.path.getmtime, reverse=True)
    tmp = sorted((t for t in glob.glob(glob.escape(path) + ".*tmp") if os.path.getsize(t) > 0),
                 key=os.path.getmtime, reverse=True)
    if not tmp and not others:
        return "no other checkpoint is next to it; start the run again (--init_from=scratch) or restore the file from a copy"
    hint = (f"try {tmp[0]} (a save interrupted before its rename; copy it over {os.path.basename(path)} if it loads)"
            if tmp else "")
    if others:
        hint += ("; else " if hint else "try ") + "an older checkpoint next to it: " + ", ".join(others[:3])
        hint += f" (copy it to {os.path.basename(path)} to resume from it)"
    return hint


def rng_state():
    """This process's full RNG state in plain types: torch (+ CUDA), numpy's whole MT19937 state, python's random."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    if isinstance(n, list):  # checkpoints before the full state: numpy's key array, python's internal tuple
        n, p = {"keys": n, "pos": 624, "has_gauss": 0, "gauss": 0.0}, {"version": 3, "state": p, "gauss_next": None}
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng(dist):
    """Every rank's RNG state (dropout, drop path), so that a resume continues exactly on each rank."""
    state = rng_state()
    if not dist.ddp:
        return [state]
    states = [None] * dist.world_size
    tdist.all_gather_object(states, state)
    return states


def unwrap(model):
    """The raw module under DDP and torch.compile: what we save, evaluate and generate with."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# -----------------------------------------------------------------------------
# the run: one folder per run, refused when it holds another run, removed when a fresh start fails


def launch(script_train, cfg, trackers=None):
    """Processes, device, precision and the Logger around script_train(cfg, dist, log), cleaned up however it ends.
    The master holds the run folder's lock for the run's life (lock_run_dir); a fresh run into a folder that already
    holds a run is refused first; a start that fails before its first checkpoint removes the run folder it created,
    so no empty run shows up in compare.py."""
    out = cfg["out_dir"]
    fresh = not os.path.exists(out)
    lock = lock_run_dir(out) if int(os.environ.get("RANK", 0)) == 0 else None
    log = None
    try:
        check_run_dir(cfg)
        dist = setup_distributed(cfg["device"], cfg["backend"], timeout_s=cfg["dist_timeout"])
        log = tracking.Logger(out, cfg if trackers is None else {**cfg, "trackers": trackers}, dist.master)
        cfg["dtype"] = resolve_dtype(cfg["dtype"], dist.device)
        return script_train(cfg, dist, log)
    except BaseException:
        if log is not None:
            log.close()
        if fresh and lock is not None and not glob.glob(os.path.join(out, "*.pt")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if log is not None:
            log.close()
        try:
            cleanup_distributed()
        finally:
            if lock is not None:
                lock.close()  # releases the lock


LOCK_FILE = ".run.lock"  # in out_dir; holds the pid of the run that has the folder


def lock_run_dir(out_dir):
    """An exclusive fcntl lock on out_dir/.run.lock, held until the returned file is closed (or the process dies, so
    no stale lock outlives a crash): a second run into the same folder at the same time is refused, naming the pid
    of the first, instead of interleaving metrics.jsonl and replacing the first run's checkpoints."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise FileExistsError(f"out_dir {out_dir} is in use by another run (pid {pid}): wait for it to end, or choose "
                              f"another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


# What a train script writes into out_dir: any of them means the folder holds a run. (A save's temp file, *.tmp,
# holds nothing by itself; --overwrite removes those too.)
RUN_FILES = ("*.pt", "metrics.jsonl", "train.log", "config.json", "tb")


def run_files(out_dir, patterns=RUN_FILES):
    return sorted(os.path.basename(f) for p in patterns for f in glob.glob(os.path.join(glob.escape(out_dir), p)))


def check_run_dir(cfg):
    """A fresh run (not init_from='resume', not eval_only) into an out_dir that holds any file a run writes
    (RUN_FILES) is refused unless overwrite=True, which removes that run's files first."""
    out = cfg["out_dir"]
    used = run_files(out)
    if not used or cfg["init_from"] == "resume" or cfg["eval_only"]:
        return
    if not cfg["overwrite"]:
        shown = ", ".join(used[:6]) + (f" and {len(used) - 6} more" if len(used) > 6 else "")
        raise FileExistsError(f"{out} already holds a run ({shown}): continue it with --init_from=resume, "
                              f"replace it with --overwrite=True, or choose another --out_dir")
    if int(os.environ.get("RANK", 0)) == 0:
        for name in run_files(out, RUN_FILES + ("*.tmp",)):
            f = os.path.join(out, name)
            if os.path.isdir(f):
                shutil.rmtree(f)
            else:
                os.remove(f)


def check_init_from(cfg):
    if cfg["init_from"] not in ("scratch", "pretrained", "resume"):
        raise ValueError(f"init_from must be scratch, pretrained or resume, got {cfg['init_from']!r}")


def wrap(raw, compile_model, dist):
    """The network the loop calls: torch.compile'd and/or DDP-wrapped around the raw module (which we save)."""
    net = torch.compile(raw) if compile_model else raw
    if dist.ddp:
        net = DDP(net, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None)
    return net


# -----------------------------------------------------------------------------
# the batch plan: gradient_accumulation_steps is global and split across the ranks


def batch_plan(batch_size, gradient_accumulation_steps, world_size):
    """(micro-steps per rank, global batch, a note or None). When the accumulation does not divide by the world
    size, each rank rounds it (at least 1) and the note says which global batch the run really uses."""
    gas = gradient_accumulation_steps
    accum = max(1, round(gas / world_size))
    note = None
    if accum * world_size != gas:
        note = (f"note: gradient_accumulation_steps={gas} does not divide by {world_size} ranks: each rank does {accum} "
                f"micro-steps, {accum * world_size} in all (the global batch differs from a {gas}-step run)")
    return accum, batch_size * accum * world_size, note


# -----------------------------------------------------------------------------
# resume-or-start: one checkpoint schema for the three scripts

PROVENANCE_KEYS = ("git_commit", "git_dirty", "torch_version", "cuda_version", "world_size", "data_hash")
CKPT_KEYS = ("model", "model_args", "config", "script", "iter", "best_metric", "best_iter", "bad_evals", "best_worst",
             "meta", "tokenizer", "optimizer", "scaler", "rng", "ema", "trackers", *PROVENANCE_KEYS)
TRAINING_STATE = ("optimizer", "scaler", "rng")  # in ckpt.pt only: best.pt / best_worst.pt carry weights + metrics


def new_progress():
    return {"iter": 0, "best_metric": None, "best_iter": -1, "bad_evals": 0, "best_worst": None}


def resume_checkpoint(cfg, script, log):
    """init_from='resume': out_dir/ckpt.pt (written by this script), or None with a line when there is none yet."""
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if cfg["init_from"] != "resume":
        return None
    if not os.path.exists(path):
        log.line(f"init_from='resume' but {path} does not exist yet: starting from scratch")
        return None
    ckpt = load_checkpoint(path)
    if "iter_num" in ckpt:  # train_gpt.py before the common schema: iter_num, best_val_loss, data, torch_rng
        ckpt = {**ckpt, "script": script, "iter": ckpt["iter_num"], "best_metric": ckpt["best_val_loss"],
                "best_iter": ckpt["iter_num"], "meta": {**ckpt["data"], "data_dir": ckpt["data"]["dir"]}}
    if ckpt.get("script", script) != script:
        raise ValueError(f"{path} is a {ckpt['script']} checkpoint: resume it with python {ckpt['script']}, "
                         f"or give {script} another --out_dir")
    return ckpt


def data_hash(meta):
    """meta.json's data_hash, or (older prepared data) a hash of the split sizes and the classes."""
    if meta.get("data_hash"):
        return meta["data_hash"]
    blob = json.dumps({"splits": meta.get("splits"), "classes": meta.get("classes")}, sort_keys=True)
    return "sizes-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_meta(meta, data_dir, keys, **extra):
    """What a checkpoint records about its data: these meta.json keys, the folder and its hash."""
    return {**{k: meta.get(k) for k in keys}, **extra, "data_dir": data_dir, "data_hash": data_hash(meta)}


def restore(ckpt, cfg, meta, optimizer, scaler, dist, log, ema=None):
    """Continue from ckpt.pt: refuse other data (unless allow_data_change), load the optimizer, scaler, EMA and this
    rank's RNG, drop metrics.jsonl records past the checkpoint; returns the run's progress."""
    old, new = ckpt["meta"].get("data_hash"), data_hash(meta)
    prog = {k: ckpt.get(k, v) for k, v in new_progress().items()}
    if old and old != new:
        if not cfg["allow_data_change"]:
            raise ValueError(f"{cfg['out_dir']}/ckpt.pt was trained on other data ({ckpt['meta'].get('data_dir')}, hash "
                             f"{old}) than {meta.get('data_dir', 'this data')} (hash {new}): resume on the same data, or "
                             f"pass --allow_data_change=True to continue on this data")
        log.line(f"allow_data_change: the data changed ({old} -> {new}); the best metric so far is forgotten")
        prog.update(best_metric=None, best_iter=-1, bad_evals=0, best_worst=None)
    was = (ckpt.get("config") or {}).get("optimizer", "adamw")  # train.py's knob; the other scripts: AdamW only
    if was != cfg.get("optimizer", "adamw"):
        raise ValueError(f"{cfg['out_dir']}/ckpt.pt was trained with optimizer={was!r}, this run asks for "
                         f"{cfg['optimizer']!r}: resume with --optimizer={was}, or start a new run (another out_dir)")
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.module.load_state_dict(ckpt["ema"])
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"][min(dist.rank, len(ckpt["rng"]) - 1)])
    log.resume(ckpt.get("trackers"))  # the same MLflow / W&B run continues, before any metric is logged
    if dist.master:
        remove_stale_temp_files(cfg["out_dir"], log)
        truncate_metrics(cfg["out_dir"], prog["iter"], log)
    log.line(f"resumed from {cfg['out_dir']}/ckpt.pt at iter {prog['iter']} "
             f"(best {cfg['select_metric']} {prog['best_metric']} @ {prog['best_iter']})")
    return prog


def truncate_metrics(out_dir, it, log):
    """A resumed run repeats the steps after its checkpoint: drop their records (and the final one) first. A line cut
    short (the disk filled, or the process was killed, while it was appended) is dropped too, with a line saying so."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    if bad:
        log.line(f"{path}: dropped {bad} unreadable line(s) (a record cut short by a full disk or a killed process)")
    keep = [r for r in records if not r.get("final") and r.get("iter", r.get("step", 0)) <= it]
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed (a full disk): leave no partial copy behind
            os.remove(tmp)


def remove_stale_temp_files(out_dir, log):
    """Temp files of saves that never reached their rename (a process killed, a disk that filled): with the run's
    lock held no other process writes them, and the checkpoint they were meant to replace has loaded."""
    stale = glob.glob(os.path.join(glob.escape(out_dir), "*.tmp"))
    for f in stale:
        os.remove(f)
    if stale:
        log.line(f"removed {len(stale)} temp file(s) of interrupted saves: {', '.join(map(os.path.basename, stale))}")


def make_ema(raw, decay):
    """EMA of the weights (buffers too), or None for decay 0; its first average is the initial weights."""
    if decay <= 0:
        return None
    ema = torch.optim.swa_utils.AveragedModel(raw, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay),
                                              use_buffers=True)
    ema.update_parameters(raw)
    return ema


def save_run(cfg, dist, log, script, it, prog, improved, raw, model_args, meta, optimizer, scaler, ema=None,
             tokenizer=None, worst_improved=False):
    """Every rank's RNG (a collective), then on the master: ckpt.pt (all of it), best.pt / best_worst.pt when they
    improved (no optimizer, scaler or RNG), ckpt_<iter>.pt rotated to the keep_last newest."""
    rng = gather_rng(dist)
    if not dist.master or cfg["eval_only"]:
        return
    state = {"model": raw.state_dict(), "model_args": model_args, "config": cfg, "script": script,
             **prog, "iter": it, "meta": meta, "tokenizer": tokenizer, "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "rng": rng, "ema": None if ema is None else ema.module.state_dict(),
             "trackers": log.tracker_ids(), **tracking.provenance(cfg, dist.world_size)}
    assert tuple(state) == CKPT_KEYS, f"checkpoint keys {tuple(state)} drifted from CKPT_KEYS"
    out = cfg["out_dir"]
    save_checkpoint(state, os.path.join(out, "ckpt.pt"))
    weights_only = {**state, **{k: None for k in TRAINING_STATE}}
    for name, better in (("best.pt", improved), ("best_worst.pt", worst_improved)):
        if better:
            save_checkpoint(weights_only, os.path.join(out, name))
    if cfg["keep_last"] > 0:
        save_checkpoint(state, os.path.join(out, f"ckpt_{it:07d}.pt"))
        for old in sorted(glob.glob(os.path.join(out, "ckpt_*.pt")))[:-cfg["keep_last"]]:
            os.remove(old)


# -----------------------------------------------------------------------------
# the loop's pieces: when to evaluate, the step, selection and early stop, the log line


def eval_due(it, cfg, last_step, resumed_at):
    """Every eval_interval and at the last step, but not again at the step a resumed run starts from; always for
    eval_only (the resumed model is what it evaluates)."""
    return cfg["eval_only"] or ((it % cfg["eval_interval"] == 0 or last_step) and it != resumed_at)


def schedule_lr(optimizer, it, cfg):
    """Warmup -> plateau -> cosine to min_lr at lr_decay_iters (0 = max_iters); sets and returns the step's LR."""
    lr = get_lr(it, cfg["learning_rate"], cfg["warmup_iters"], cfg["plateau_iters"],
                cfg["lr_decay_iters"] or cfg["max_iters"], cfg["min_lr"])
    set_lr(optimizer, lr)
    return lr


def grad_sync(net, last):
    """DDP all-reduces gradients only on the last micro-step of an optimizer step."""
    return net.no_sync() if isinstance(net, DDP) and not last else contextlib.nullcontext()


def check_finite(loss, it, out_dir):
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"non-finite loss ({float(loss)}) at iter {it}: stopping; the last good checkpoint "
                                 f"{out_dir}/ckpt.pt is intact. Try a lower learning_rate or dtype=float32.")


def optimizer_step(optimizer, scaler, params, grad_clip):
    """unscale -> clip (grad_clip > 0) or only measure -> step -> update -> zero_grad. Returns the global norm of the
    unscaled gradients as a device tensor (no host sync here)."""
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = grad_norm(params)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def macro_note(record, key):
    """' (over 13/14 classes; undefined in val: X)' when a macro metric leaves classes out, else ''."""
    per = record.get(key[: -len("_macro")]) if key.endswith("_macro") else None
    if not isinstance(per, dict):
        return ""
    bad = [c for c, v in per.items() if v is None or not math.isfinite(v)]
    return (f" (over {len(per) - len(bad)}/{len(per)} classes; no positives or no negatives in val: {', '.join(bad)})"
            if bad else "")


def higher_is_better(key):
    """AUC, AP, recall, BLEU: higher; a loss, rank, perplexity or bits per byte: lower."""
    return not any(word in key for word in ("loss", "rank", "ppl", "bpb"))


def select(prog, record, cfg, higher_better, it):
    """Count this eval into prog (best metric, its iter, evals without improvement); True when it improved."""
    key = cfg["select_metric"]
    value = record.get(key)
    if value is None:
        raise ValueError(f"select_metric={key!r} is not in the eval record; choose one of "
                         f"{sorted(k for k, v in record.items() if isinstance(v, float))}")
    if not math.isfinite(value):
        cause = ("no class has both positive and negative labels in the validation split (a class with no positives "
                 "in val has no AUC): check pos_counts in meta.json, or choose another --select_metric"
                 if key.endswith("_macro") else "the model's outputs are not finite")
        raise ValueError(f"select_metric={key!r} is {value} at iter {it}: {cause}")
    best = prog["best_metric"]
    improved = best is None or (value > best if higher_better else value < best)
    if improved:
        prog.update(best_metric=value, best_iter=it, bad_evals=0)
    elif not cfg["eval_only"]:
        prog["bad_evals"] += 1
    return improved


def early_stop(prog, cfg, log):
    if cfg["early_stop_patience"] > 0 and prog["bad_evals"] >= cfg["early_stop_patience"]:
        log.line(f"early stop: {prog['bad_evals']} evals without a better {cfg['select_metric']} "
                 f"(best {prog['best_metric']:.4f} @ {prog['best_iter']})")
        return True
    return False


def log_step(log, dist, timer, it, cfg, loss, norm, lr, items, unit, flops=None, peak=None, extra=None, jsonl=False,
             scalars=None):
    """The one log line per step, `iter | loss | norm | lr | ms | <unit>/s | mfu | eta`, and the same numbers to
    TensorBoard (and metrics.jsonl with jsonl=True). loss: this rank's loss of the step as a device tensor, reduced
    here with one all-reduce; items: what one step processes (images, pairs, tokens); flops: per step, all ranks;
    scalars: more numbers for TensorBoard and metrics.jsonl but not the line (lr/<group>, loss/<term>)."""
    dt = timer.lap()
    loss = float(all_reduce_mean(loss.reshape(1), dist)[0])
    rate = items / dt
    mfu = flops / dt / (peak * dist.world_size) if flops and peak else None
    if mfu is None and not timer.mfu_explained:
        timer.mfu_explained = True
        log.line("mfu -: " + ("no peak-FLOPs table for CPUs (python bench.py measures this machine's matmul peak)"
                              if not dist.device.startswith("cuda") else
                              "this GPU is not in common.PEAK_FLOPS or the model has no FLOPs count"))
    extra = extra or {}
    log.line(f"iter {it:6d} | loss {loss:.4f} | norm {float(norm):6.3f} | lr {lr:.2e} | {1000 * dt:7.1f} ms | "
             f"{rate:9.1f} {unit}/s | mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'} | eta "
             f"{timer.eta(cfg['max_iters'] - it)}" + "".join(f" | {k} {v:.2f}" for k, v in extra.items()))
    values = {"loss": loss, "grad_norm": float(norm), "lr": lr, "ms": 1000 * dt, f"{unit}_per_s": rate, "mfu": mfu,
              **extra, **(scalars or {})}
    log.scalars(values, it, "train/")
    if jsonl:
        log.jsonl({"split": "train", "iter": it, **values})
    return loss


def finish(log, prog, cfg, it, timer, **extra):
    """The final record (metrics.jsonl) and line of a run."""
    key = cfg["select_metric"]
    final = {"final": True, "split": "val", "best_iter": prog["best_iter"], "best_metric": prog["best_metric"],
             "select_metric": key, f"best_{key}": prog["best_metric"], "iters": it,
             "time_s": round(time.time() - timer.start, 1), **extra}
    log.jsonl(final)
    best = float("nan") if prog["best_metric"] is None else prog["best_metric"]
    log.line(f"done: best {key} {best:.4f} at iter {prog['best_iter']} | {final['time_s']:.0f} s | {cfg['out_dir']}")
    return final



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


class Timer:
    """Training time per step with evaluation left out, CUDA synchronised: `with timer.paused():` around an eval,
    step() after each optimizer step, lap() at a log line -> mean seconds per step since the last lap."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.start = time.time()
        self.t, self.elapsed, self.steps, self.total, self.done = self._now(), 0.0, 0, 0.0, 0
        self.mfu_explained = False

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        self.elapsed += self._now() - self.t
        yield
        self.t = self._now()

    def step(self):
        self.steps += 1

    def lap(self):
        now = self._now()
        dt, self.elapsed, self.t = self.elapsed + now - self.t, 0.0, now
        self.total, self.done = self.total + dt, self.done + self.steps
        per_step, self.steps = dt / max(self.steps, 1), 0
        return per_step

    def eta(self, remaining):
        return format_eta(remaining * self.total / max(self.done, 1))


def tb_image_grid(log, tag, images, captions, step, cols=4):
    """uint8 (N, H, W) images as one TensorBoard figure, each with its caption drawn under it (matplotlib)."""
    if log.tb is None:
        return
    import matplotlib  # lazily: only runs that write TensorBoard draw figures
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, text in zip(axes.flat, images, captions):
        ax.imshow(im, cmap="gray", vmin=0, vmax=255)
        ax.set_title(text, fontsize=6)
    fig.tight_layout()
    log.tb.add_figure(tag, fig, step)  # closes the figure


def format_eta(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
