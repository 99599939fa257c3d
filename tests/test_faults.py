"""Off the happy path (issue 13): a hung peer, a torchrun restart, a full disk, a truncated checkpoint, weights that
do not fit, a checkpoint of another script, and a pickle that would run code. Each test fails on the code before
the fix: it hangs, trains from scratch, raises KeyError / a bare zip error, or runs the pickle."""

import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import common
import model as M
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model=convnext_atto", "--image_size=32", "--batch_size=8", "--eval_batch_size=64", "--log_interval=5",
        "--tensorboard_log=False", "--warmup_iters=2", "--learning_rate=1e-3", "--device=cpu"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# -----------------------------------------------------------------------------
# distributed faults


def _rank_that_may_hang(rank, port, results):
    """One of two gloo ranks (forked: no second torch import). Rank 1 never reaches the collective."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    d = common.setup_distributed("cpu", "gloo", timeout_s=2)
    if rank == 1:
        time.sleep(120)  # hung
    t0 = time.time()
    try:
        try:
            torch.distributed.all_reduce(torch.ones(1))
        finally:
            common.cleanup_distributed()
    except RuntimeError as e:
        results.put((str(e), time.time() - t0))
    else:
        results.put(("no error", time.time() - t0))


def test_hung_peer_fails_within_timeout_naming_it():
    """Two gloo processes; rank 1 stops answering before an all_reduce. Rank 0 fails within dist_timeout plus the
    seconds it waits for the other ranks to check in, with a sentence naming rank 1 (torch's default: 30 minutes)."""
    ctx = multiprocessing.get_context("fork")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_that_may_hang, args=(r, port, results), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        msg, elapsed = results.get(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert "rank 1 stopped answering" in msg and "dist_timeout=2 s" in msg and "rank 0 waited in it" in msg, msg
    assert 2 <= elapsed <= 2 + 2 + 2, (elapsed, msg)  # the timeout + the wait for the others to check in


def _rank_zero_alone(port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0",
                      TORCHELASTIC_USE_AGENT_STORE="True")
    try:
        common.setup_distributed("cpu", "gloo", timeout_s=1)
        results.put("no error")
    except RuntimeError as e:
        results.put(str(e))


def test_rank_that_never_starts_is_named():
    """Under torchrun (the agent hosts the store, here this test does) rank 1 never starts: rank 0's
    init_process_group fails after dist_timeout with the same sentence."""
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    p = ctx.Process(target=_rank_zero_alone, args=(port, results), daemon=True)
    p.start()
    try:
        msg = results.get(timeout=60)
    finally:
        p.kill()
        p.join()
    del store
    assert "rank 1 stopped answering" in msg and "dist_timeout=1 s" in msg, msg


_DDP_THEN_CLEANUP = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import common
common.setup_distributed("cpu", "gloo", timeout_s=30)
net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
net(torch.ones(2, 4)).sum().backward()
del net
common.cleanup_distributed()
tasks = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("gloo threads left:", sorted(t for t in tasks if "gloo" in t))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the thread list from /proc (Linux)")
def test_cleanup_frees_the_process_group_after_ddp():
    """Two fresh gloo processes build DDP, train a step and call cleanup_distributed: no gloo thread may be left.
    Before the fix, DDP's lazy import of torch.distributed.nn.functional (whose default arguments hold the default
    group) kept the group alive: 3 gloo threads outlived destroy_process_group, and ~1 in 20 two-rank torchrun runs
    died at exit with SIGABRT after finishing."""
    port, code = free_port(), _DDP_THEN_CLEANUP.format(root=str(ROOT))
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "gloo threads left: []" in out, out[-2000:]


@pytest.mark.slow
def test_torchrun_restart_resumes_to_the_same_weights(tmp_path, tiny_phantom):
    """torchrun --max-restarts=2 with --init_from=resume: rank 1 dies once in the middle of iteration 5 (after the
    iteration-4 checkpoint); torchrun restarts both ranks, they resume from ckpt.pt, and the final weights equal an
    uninterrupted 2-process run's. Before the per-restart store prefix, a restarted rank 0 that came up before rank 1
    read the dead rank 1's gloo address from torchrun's store and hung in init_process_group."""
    marker = tmp_path / "died_once"
    wrapper = tmp_path / "die_once.py"
    wrapper.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import data, train
        marker, calls, to_float = {str(marker)!r}, [0], data.to_float
        if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] != "0":
            time.sleep(5)  # restarted rank 1 comes up later than rank 0 (a loaded machine, another node)

        def dying_to_float(*args, **kwargs):  # iterations 1-4 (accumulation 1 per rank) + eval 0 and 4 -> call 8
            calls[0] += 1
            if os.environ["RANK"] == "1" and calls[0] == 8 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return to_float(*args, **kwargs)

        data.to_float = dying_to_float
        train.main(sys.argv[1:])
    """))
    args = [f"--data_dir={tiny_phantom}", *TINY, "--max_iters=8", "--lr_decay_iters=8", "--eval_interval=4",
            "--gradient_accumulation_steps=2", "--augment=False", "--init_from=resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for name in ("restarted", "uninterrupted"):  # the marker exists on the second run: nobody dies
        outs[name] = str(tmp_path / name)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "--max-restarts=2", str(wrapper), *args, f"--out_dir={outs[name]}"],
                           cwd=ROOT, env=env, timeout=400, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        if name == "restarted":
            assert marker.exists() and "resumed from" in r.stdout and "at iter 4" in r.stdout, r.stdout[-3000:]
    a, b = (torch.load(os.path.join(outs[n], "ckpt.pt"), map_location="cpu", weights_only=True) for n in outs)
    assert a["iter"] == b["iter"] == 8
    worst = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])
    assert worst <= 1e-6, worst

# -----------------------------------------------------------------------------
# checkpoint I/O


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_full_disk_save_says_so_and_removes_the_temp_file(tmp_path):
    """A real ENOSPC: the temp file is a link to /dev/full. The error names the folder and the file, the partial temp
    file is gone, and the previous checkpoint is untouched."""
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint({"iter": 1, "model": {"w": torch.ones(3)}}, str(path))
    os.symlink("/dev/full", common.temp_path(str(path)))
    with pytest.raises(OSError) as e:
        common.save_checkpoint({"iter": 2, "model": {"w": torch.zeros(100_000)}}, str(path))
    assert f"no space left on {tmp_path} while writing {path}" in str(e.value), str(e.value)
    assert not os.path.lexists(common.temp_path(str(path)))
    assert common.load_checkpoint(str(path))["iter"] == 1


def test_save_fsyncs_file_then_renames_then_fsyncs_folder(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))), fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), replace(a, b)))
    common.save_checkpoint({"iter": 3}, str(tmp_path / "ckpt.pt"))
    assert events == [("fsync", False), ("replace", None), ("fsync", True)], events


def test_truncated_or_empty_checkpoint_names_itself_and_what_to_try(tmp_path):
    ckpt, best = str(tmp_path / "ckpt.pt"), str(tmp_path / "best.pt")
    common.save_checkpoint({"iter": 4, "model": {"w": torch.randn(1000)}}, ckpt)
    common.save_checkpoint({"iter": 2, "model": {"w": torch.randn(1000)}}, best)
    whole = Path(ckpt).read_bytes()
    Path(ckpt).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=f"{ckpt} is corrupt or truncated .*older checkpoint next to it: {best}"):
        common.load_checkpoint(ckpt)
    Path(ckpt).write_bytes(b"")
    Path(ckpt + ".tmp").write_bytes(whole)  # a save that died between its fsync and its rename
    with pytest.raises(ValueError, match=f"{ckpt} is corrupt or truncated \\(0 bytes.*try {ckpt}.tmp"):
        common.load_checkpoint(ckpt)

# -----------------------------------------------------------------------------
# pretrained weights that do not fit, checkpoints of other scripts


def test_resnet_weights_for_convnext_are_refused(tmp_path):
    """A torchvision ResNet-18 file given to convnext_atto: before, "loaded 0/128 tensors" and training from scratch."""
    torchvision = pytest.importorskip("torchvision")
    path = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    net = M.build_model("convnext_atto", num_classes=3, in_chans=1, image_size=32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError) as e:
        M.load_pretrained(net, path)
    msg = str(e.value)
    assert "does not fit convnext_atto: only 0/" in msg and "stem.weight" in msg and "conv1.weight" in msg, msg
    assert "--init_from=scratch" in msg
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing half-loaded
    report = M.load_pretrained(M.build_model("tv:resnet18", num_classes=3, in_chans=1, image_size=32), path)
    assert not report["missing"] and report["reset"]  # the same file fits its own architecture (head resized)


def test_partial_backbone_is_refused_head_alone_is_not(tmp_path):
    src = M.build_model("convnext_atto", num_classes=5, in_chans=1, image_size=32)
    sd = src.state_dict()
    keys = list(sd)
    torch.save({k: sd[k] for k in keys[: len(keys) // 2]}, tmp_path / "half.pth")
    torch.save({k: v for k, v in sd.items() if not k.startswith("head.")}, tmp_path / "no_head.pth")
    dst = M.build_model("convnext_atto", num_classes=5, in_chans=1, image_size=32)
    with pytest.raises(ValueError, match="only .*/.* of its backbone tensors"):
        M.load_pretrained(dst, str(tmp_path / "half.pth"))
    report = M.load_pretrained(dst, str(tmp_path / "no_head.pth"))
    assert report["missing"] == ["head.weight", "head.bias"]


def test_clip_and_gpt_checkpoints_given_to_train_py_get_a_sentence(tmp_path, tiny_phantom):
    import model_clip
    from model_gpt import GPT, GPTConfig, gpt_config_to_dict
    clip = model_clip.build_clip(embed_dim=16, image_model="convnext_atto", image_size=32, in_chans=1, vocab_size=64,
                                 context_length=8, text_width=16, text_layers=1, text_heads=2)
    gpt = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    common.save_checkpoint({"model": clip.state_dict(), "model_args": clip.model_args, "iter": 0}, str(tmp_path / "clip.pt"))
    common.save_checkpoint({"model": gpt.state_dict(), "model_args": gpt_config_to_dict(gpt.config), "iter_num": 0},
                           str(tmp_path / "gpt.pt"))
    for name, says in (("clip", "is a train_clip.py checkpoint .*train_clip.py reads it"),
                       ("gpt", "is a train_gpt.py checkpoint .*train_gpt.py reads it")):
        with pytest.raises(ValueError, match=says):
            train.main([f"--data_dir={tiny_phantom}", f"--out_dir={tmp_path / name}", *TINY, "--max_iters=0",
                        "--init_from=pretrained", f"--pretrained_path={tmp_path / name}.pt"])

# -----------------------------------------------------------------------------
# foreign code: pickles that would run code are never unpickled


class _Payload:
    """Unpickling this calls open(marker, 'w'): the file appears if and only if the pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path, marker):
    torch.save({"stem.weight": torch.zeros(1), "x": _Payload(str(marker))}, path)
    torch.load(path, weights_only=False)  # the payload works: this is what torch.hub's cache loader did
    assert os.path.exists(marker)
    os.remove(marker)


def test_torchvision_cache_file_is_hash_checked_before_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    marker = tmp_path / "pwned"
    _malicious(str(cache / "convnext_tiny-983f1562.pth"), marker)
    net = M.build_model("convnext_atto", num_classes=2, image_size=32)  # refused before any shape is compared
    with pytest.raises(ValueError, match="is not torchvision's ConvNeXt_Tiny_Weights.IMAGENET1K_V1: its sha256 starts"):
        M.load_pretrained(net, "torchvision:ConvNeXt_Tiny_Weights.IMAGENET1K_V1")
    assert not marker.exists()


def test_torchvision_file_with_its_hash_loads(tmp_path, monkeypatch):
    """The good path of the check: a file whose sha256 starts with its name's hex digits loads (from the cache, and
    after a download that torch.hub checks against the same prefix)."""
    import hashlib
    import shutil
    import types
    import torchvision
    src = M.build_model("convnext_atto", num_classes=1000, in_chans=3, image_size=32)
    staged = tmp_path / "staged.pth"
    torch.save(src.state_dict(), staged)
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    url = f"https://download.example/convnext_atto-{digest[:8]}.pth"
    monkeypatch.setattr(torchvision.models, "get_weight", lambda name: types.SimpleNamespace(url=url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    downloads = []

    def download(u, dst, hash_prefix=None, progress=True):
        downloads.append((u, hash_prefix))
        shutil.copy(staged, dst)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):  # first a download, then the cached file
        net = M.build_model("convnext_atto", num_classes=2, in_chans=1, image_size=32)
        report = M.load_pretrained(net, "torchvision:ConvNeXt_Atto_Weights.FAKE")
        assert not report["missing"] and report["reset"]
        assert torch.equal(net.stem.weight, src.stem.weight.sum(1, keepdim=True))
    assert downloads == [(url, digest[:8])]


def test_weights_file_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _malicious(str(tmp_path / "evil.pth"), marker)
    with pytest.raises(ValueError, match="runs no code from a weights file"):
        M.load_pretrained(M.build_model("convnext_atto", num_classes=2, image_size=32), str(tmp_path / "evil.pth"))
    with pytest.raises(ValueError, match="no code runs from a checkpoint"):
        common.load_checkpoint(str(tmp_path / "evil.pth"))
    assert not marker.exists()

# -----------------------------------------------------------------------------
# one weights reader (issue 14)


def test_one_safetensors_reader(tmp_path):
    """read_weights reads .safetensors through the safetensors package (dtypes kept); no file of the project parses
    the format by hand any more (its header field is 'data_offsets')."""
    from safetensors.torch import save_file
    sd = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).view(2, 3)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    got = M.read_weights(str(tmp_path / "w.safetensors"))
    assert got.keys() == sd.keys() and all(got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]) for k in sd)
    parsers = [p.name for p in ROOT.glob("*.py") if "data_offsets" in p.read_text()]
    assert not parsers, f"hand-written safetensors readers in {parsers}: use model.read_weights"
