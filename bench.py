"""
Throughput of nanorad's train steps, measured after a burn-in, optionally side by side with the references
(timm, Hugging Face GPT-2, torchvision's PIL pipeline) in the same process. Compared rows alternate every
iteration (in alternating order) so that they share the machine's noise; each reports the median iteration:
ms/iter, images/s (tokens/s for GPT, pairs/s for CLIP), achieved TFLOP/s (GFLOP/s on a CPU), MFU and peak memory, in one
markdown table. MFU is against the GPU's datasheet peak (common.PEAK_FLOPS); on a CPU against the best
FLOP/s of a 1024^3 matmul timed in the same run with the same threads (so CPU MFU means "fraction of what
this machine's matmul reaches now", not of a datasheet).

Tasks (--task=...):
  classify  forward + backward + AdamW of a build_model network on (B, in_chans, S, S) images
  gpt       the GPT train step (model_gpt.py) on (B, block_size) tokens
  clip      the CLIP train step (symmetric InfoNCE over the batch) of build_clip
  data      the memmap loader (Loader read -> to_float -> augment) vs torchvision ImageFolder + PIL (--compare)

CPU, quick (a few seconds each):
    python bench.py --model=convnext_atto --batch_size=8 --image_size=64 --iters=5
    python bench.py --task=gpt --n_layer=2 --n_embd=128 --n_head=4 --block_size=64 --vocab_size=1024 --batch_size=4
    python bench.py --task=data --image_size=224 --batch_size=32 --compare=True

The comparisons (README "Benchmarks"; ratio = that row's ms / ours, > 1 means ours is faster):
    python bench.py --model=convnext_tiny,vit_small --batch_size=16 --image_size=128 --compare=True --threads=2
    python bench.py --task=gpt --batch_size=2 --compare=True --threads=2   # 6x384, block 256: ours vs HF, learned/alibi/rope

One GPU, bf16, channels_last, compiled, fused AdamW:
    python bench.py --model=convnext_tiny --device=cuda --dtype=bfloat16 --batch_size=128 --channels_last=True --compile=True
    python bench.py --task=gpt --device=cuda --dtype=bfloat16 --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=16 --compile=True

The README's GPU table (< 5 minutes on one H100/H200; on a CPU it skips, --dry_run=True runs each entry once, tiny):
    python bench.py --suite=gpu
    python bench.py --suite=gpu --dry_run=True

A profile of the timed steps, for TensorBoard (pip install torch-tb-profiler) or https://ui.perfetto.dev:
    python bench.py --model=convnext_atto --profile=True --out_dir=out/bench && tensorboard --logdir=out/bench/profile

Real images instead of random tensors (classify, data): --real_data=True --data_dir=data/phantom (python data.py).
torchrun is not needed: a benchmark is one process on one device.
"""

import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import common
import configurator
import data
import model as models
import model_clip
import model_gpt
import tracking

# -----------------------------------------------------------------------------
# config
task = "classify"  # classify | gpt | clip | data
model = "convnext_tiny"  # classify: a build_model name, or a comma list (convnext_tiny,vit_small) to time together
batch_size = 32  # images (gpt: sequences, clip: pairs) per step
image_size = 224  # pixels (square); real_data takes the prepared folder's size
in_chans = 3  # 3 to compare with timm's ImageNet models, 1 for X-rays
num_classes = 1000  # classify head; real_data takes the folder's classes
real_data = False  # classify / data: batches from data_dir through data.Loader (memmap) instead of random tensors
data_dir = "data/phantom"  # a prepared folder (python data.py --dataset=phantom)
# gpt: 6 x 384, block 256 is our report model; GPT-2 small is 12 x 12 heads x 768, block 1024
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256  # tokens per sequence
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64; smaller (8192) makes CPU runs quicker
pos = "learned"  # learned | alibi | rope (--compare times all three, plus HF GPT-2)
# clip
clip_preset = "tiny"  # tiny (ViT-Ti/16 image tower, 4 x 256 text) | openai_vit_b16 | open_clip_vit_b16 | biomedclip
# data
data_images = 512  # images in the benchmark set (written once as memmap and as PNGs); batches cycle through it
data_workers = 0  # PIL DataLoader processes; 0: both pipelines in this process, alternated (a per-core comparison)
# system
device = "cpu"  # cpu | cuda | cuda:1
dtype = "float32"  # float32 | bfloat16 | float16 | auto (autocast; CPU bf16 is emulated, slow)
threads = 0  # CPU threads for torch (0 = torch's default); use 1 on a busy machine
channels_last = False  # NHWC input and weights (conv nets on GPU; our ConvNeXt goes channels_last inside anyway)
compile = False  # torch.compile every timed model (GPU: a minute of warm-up per model)
optimizer = "auto"  # auto (fused on CUDA, as train.py) | fused | foreach | none (time forward + backward only)
grad_checkpoint = False  # recompute blocks in backward (ours, timm, HF alike): ~30% slower, less activation memory
# timing
warmup_iters = 3  # burn-in steps per model, not timed (allocator, oneDNN / cuDNN algorithm choice, compile)
iters = 10  # timed steps per model; the median is reported
compare = False  # add the reference rows (see the docstring) and a ratio column
suite = ""  # "" | gpu: run the README's list of GPU benchmarks and print its table
dry_run = False  # with suite: each entry once, tiny, on this device (CPU): checks the code path, not the numbers
profile = False  # write a torch.profiler trace of a few timed iterations to out_dir/profile
out_dir = "out/bench"
seed = 1337
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per knob; CHECKS: across knobs)
RANGES = dict(iters="[1, inf)", data_images="[1, inf)")

TASKS = ("classify", "gpt", "clip", "data")
OPTIMIZERS = ("auto", "fused", "foreach", "none")
TIMM_NAMES = {f"convnext_{s}": f"convnext_{s}" for s in models.CONVNEXT_SIZES}
TIMM_NAMES.update({f"vit_{s}": f"vit_{s}_patch16_224" for s in models.VIT_SIZES})
CLIP_TINY = dict(embed_dim=256, image_model="clip_vit", patch_size=16, vision_width=192, vision_layers=12,
                 vision_heads=3, text_model="causal", vocab_size=49408, context_length=77, text_width=256,
                 text_layers=4, text_heads=4, vision_act="gelu", text_act="gelu")

# the README's GPU table: every entry gets SUITE_GPU_COMMON first and the command line's own knobs last
SUITE_GPU_COMMON = ["--device=cuda", "--dtype=bfloat16", "--channels_last=True", "--compile=True", "--optimizer=fused",
                    "--warmup_iters=3", "--iters=20"]
SUITE_GPU = [
    ("ConvNeXt-T, batch 128", ["--task=classify", "--model=convnext_tiny", "--batch_size=128"]),
    ("ConvNeXt-T, batch 256", ["--task=classify", "--model=convnext_tiny", "--batch_size=256"]),
    ("vit_cxr (1ch, 14 findings), batch 128", ["--task=classify", "--model=vit_cxr", "--in_chans=1", "--num_classes=14",
                                               "--batch_size=128"]),
    ("vit_cxr (1ch, 14 findings), batch 256", ["--task=classify", "--model=vit_cxr", "--in_chans=1", "--num_classes=14",
                                               "--batch_size=256"]),
    ("GPT-2 124M shape (12x768, block 1024), batch 16", ["--task=gpt", "--n_layer=12", "--n_head=12", "--n_embd=768",
                                                          "--block_size=1024", "--vocab_size=50304", "--batch_size=16"]),
    ("data pipeline 224 px, batch 256", ["--task=data", "--image_size=224", "--batch_size=256", "--compare=True",
                                         "--data_images=2048", "--data_workers=8", "--iters=8"]),
    ("data pipeline 320 px, batch 256", ["--task=data", "--image_size=320", "--batch_size=256", "--compare=True",
                                         "--data_images=2048", "--data_workers=8", "--iters=8"]),
]
# --dry_run: the same entries on this device, tiny and once (the GPU-only switches stay on where the CPU has them)
SUITE_DRY = ["--device=cpu", "--dtype=float32", "--compile=False", "--warmup_iters=0", "--iters=1", "--batch_size=2",
             "--image_size=32", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--vocab_size=128",
             "--data_images=8", "--data_workers=0"]


# -----------------------------------------------------------------------------
# helpers: lazy imports of the GPT / CLIP models, FLOPs, peaks, memory


def gptlib():
    return model_gpt


def cliplib():
    return model_clip


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def forward_flops(net, fn):
    """FLOPs of one forward fn() (2 per multiply-add): model.count_flops, as train.py's MFU counts them."""
    return models.count_flops(net, fn)


_cpu_peaks = {}  # (dtype, threads) -> best FLOP/s seen in this process


def cpu_matmul_peak(dtype, n_threads, n=1024, reps=10):
    """Best FLOP/s of reps n x n matmuls with n_threads (the caller has set them), and of every earlier measurement
    in this process: this CPU's reachable peak. On a shared machine one burst can be slowed by the neighbours, so
    run_one measures again after its timing loop and keeps the best."""
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    key = (dtype, n_threads)
    _cpu_peaks[key] = max(_cpu_peaks.get(key, 0.0), 2 * n ** 3 / best)
    return _cpu_peaks[key]


def peak_flops(cfg, reps=10):
    """-> (FLOP/s or None, where it comes from)."""
    if cfg["device"].startswith("cuda"):
        peak = common.device_peak_flops(cfg["device"], cfg["dtype"])
        name = torch.cuda.get_device_name(cfg["device"])
        return peak, (f"{name} datasheet" if peak else f"{name} is not in common.PEAK_FLOPS: no MFU")
    dt = "float32" if cfg["dtype"] == "float32" else "bfloat16"
    peak = cpu_matmul_peak(dt, torch.get_num_threads(), reps=reps)
    n = torch.get_num_threads()
    return peak, f"CPU {dt} 1024^3 matmul, best before/after timing, {n} threads: {peak / 1e9:.1f} GFLOP/s"


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def make_optimizer(net, cfg):
    """AdamW with weight decay on >= 2-D weights, the same for every compared model; None for optimizer=none."""
    kind = cfg["optimizer"]
    if kind == "none":
        return None
    if kind == "auto":
        kind = "fused" if cfg["device"].startswith("cuda") else "foreach"
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=0.05),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4, fused=kind == "fused", foreach=kind == "foreach")


class Row:
    """One timed thing: step(i) runs iteration i; items per step; FLOPs per step (None: no MFU); the row it is
    compared with (ratio = ms / baseline's ms); net/opt for the memory of its weights and optimizer state.
    alone_warmup > 0: timed alone after the alternating rows, with that many more burn-in steps (see time_rows)."""

    def __init__(self, name, step, items, unit, flops=None, baseline=None, net=None, opt=None, alone_warmup=0):
        self.name, self.step, self.items, self.unit, self.flops = name, step, items, unit, flops
        self.baseline, self.net, self.opt, self.alone_warmup = baseline or name, net, opt, alone_warmup

    def static_bytes(self):
        own = tensor_bytes(self.net.parameters()) if self.net is not None else 0
        if self.opt is not None:
            own += sum(tensor_bytes(s.values()) for s in self.opt.state.values())
        return own


def train_step(net, loss_fn, cfg, batch):
    """The canonical step (train.py): the batch (outside autocast), forward + loss under autocast, backward, AdamW,
    zero_grad. batch(i) -> the inputs of loss_fn(net, *inputs)."""
    opt = make_optimizer(net, cfg)

    def step(i):
        inputs = batch(i)
        with common.autocast(cfg["device"], cfg["dtype"]):
            loss = loss_fn(net, *inputs)
        loss.backward()
        if opt is not None:
            opt.step()
        net.zero_grad(set_to_none=True)

    return step, opt


def prepare_net(net, cfg, image=False):
    net.to(cfg["device"]).train()
    if image and cfg["channels_last"]:
        net.to(memory_format=torch.channels_last)
    return torch.compile(net) if cfg["compile"] else net


# -----------------------------------------------------------------------------
# the tasks: each returns its rows and a header line


def real_batches(cfg):
    """(next_batch(i) -> (x float (B,C,S,S) normalized, augmented; y), meta, loader) from data_dir's train split,
    through data.Loader with its prefetch thread, as train.py reads it. Each call takes the next step's batch."""
    split = data.PreparedSplit(cfg["data_dir"], "train")
    meta = split.meta
    loader = data.Loader(split, cfg["batch_size"], 1, cfg["seed"], 0, 1, cfg["device"])
    counter = iter(range(10 ** 12))

    def next_batch(i):
        step = next(counter)
        x, y, _ = loader.get(step)[0]
        gen = torch.Generator(device=x.device).manual_seed(cfg["seed"] * 1_000_003 + step)
        x01 = data.augment(x.float() / 255.0, gen)
        x = data.to_float(x01, meta["mean"], meta["std"], cfg["in_chans"])
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    return next_batch, meta, loader


def classify_rows(cfg, cleanup):
    B, C, S, dev = cfg["batch_size"], cfg["in_chans"], cfg["image_size"], cfg["device"]
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    if cfg["real_data"]:
        next_batch, meta, loader = real_batches(cfg)
        cleanup.callback(loader.close)
        S, n_classes = meta["image_size"], len(meta["classes"])
        multiclass = meta["task"] == "multiclass"

        def loss_fn(net, x, y):
            logits = net(x).float()
            if multiclass:
                return F.cross_entropy(logits, y)
            known = ~torch.isnan(y)  # unknown labels (NaN) are masked, as in train.py
            return F.binary_cross_entropy_with_logits(logits[known], y[known].float())
        source = f"{cfg['data_dir']} via data.Loader + augment ({meta['task']}, {n_classes} classes)"
    else:
        n_classes = cfg["num_classes"]
        x = torch.randn(B, C, S, S, device=dev).contiguous(memory_format=memory_format)
        y = torch.randint(0, n_classes, (B,), device=dev)

        def next_batch(i):
            return x, y

        def loss_fn(net, x, y):
            return F.cross_entropy(net(x).float(), y)
        source = "random tensors"

    rows = []
    for name in cfg["model"].split(","):
        nets = [("nanorad " + name, models.build_model(name, n_classes, C, S, grad_checkpoint=cfg["grad_checkpoint"]))]
        if cfg["compare"]:
            if name not in TIMM_NAMES:
                raise ValueError(f"--compare: timm has no counterpart of {name!r}; it knows {', '.join(TIMM_NAMES)}")
            timm = tracking.require("timm", "timm", "bench.py --compare=True with task=classify")
            extra = {"img_size": S} if name.startswith("vit") else {}  # timm's ViT is built for one image size
            ref = timm.create_model(TIMM_NAMES[name], num_classes=n_classes, in_chans=C, **extra)
            ref.set_grad_checkpointing(cfg["grad_checkpoint"])
            nets.append(("timm " + TIMM_NAMES[name], ref))
        for row_name, net in nets:
            flops = 3 * B * forward_flops(net, lambda: net(torch.zeros(1, C, S, S)))  # train step ~= 3x forward
            run = prepare_net(net, cfg, image=True)
            step, opt = train_step(run, loss_fn, cfg, next_batch)
            rows.append(Row(row_name, step, B, "img/s", flops, nets[0][0], net, opt))
    header = f"classify {cfg['model']} | batch {B} x {C}x{S}x{S} | {source}"
    return rows, header


def gpt_rows(cfg, cleanup):
    lib = gptlib()
    B, T, V, dev = cfg["batch_size"], cfg["block_size"], cfg["vocab_size"], cfg["device"]
    g = torch.Generator().manual_seed(cfg["seed"])
    tokens = torch.randint(0, V, (B, T + 1), generator=g).to(dev)
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    shape = dict(block_size=T, vocab_size=V, n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"])

    def ours(pos):
        return lib.GPT(lib.GPTConfig(**shape, dropout=0.0, bias=True, pos=pos, grad_checkpoint=cfg["grad_checkpoint"]))

    def loss_ours(net):
        return net(idx, targets)[1]

    schemes = list(lib.POS_SCHEMES) if cfg["compare"] else [cfg["pos"]]
    nets = [(f"nanorad GPT {p}", ours(p), loss_ours) for p in schemes]
    if cfg["compare"]:
        transformers = tracking.require("transformers", "transformers", "bench.py --compare=True with task=gpt")
        hf_cfg = transformers.GPT2Config(n_positions=T, n_embd=cfg["n_embd"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                                         vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=V - 1, eos_token_id=V - 1)
        hf_cfg._attn_implementation = "sdpa"  # HF's fastest built-in attention (F.scaled_dot_product_attention)
        hf = transformers.GPT2LMHeadModel(hf_cfg)
        if cfg["grad_checkpoint"]:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def loss_hf(net):  # the same loss as ours: logits in float, cross-entropy against the shifted tokens
            logits = net(input_ids=idx).logits
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        nets.insert(1, ("HF GPT2LMHeadModel (sdpa)", hf, loss_hf))
    # every row has the same shape: 6N + attention FLOPs per token (PaLM appendix B; the position table is not counted)
    flops = nets[0][1].flops_per_token(T) * B * T
    rows = []
    for name, net, loss_fn in nets:
        step, opt = train_step(prepare_net(net, cfg), loss_fn, cfg, lambda i: ())
        rows.append(Row(name, step, B * T, "tok/s", flops, nets[0][0], net, opt))
    header = (f"gpt {cfg['n_layer']}x{cfg['n_embd']} ({cfg['n_head']} heads) | block {T} | vocab {V} | batch {B} "
              f"({B * T} tokens/step)")
    return rows, header


def clip_rows(cfg, cleanup):
    if cfg["compare"]:
        raise ValueError("--compare has no reference for task=clip (it compares classify with timm, gpt with HF GPT-2 "
                         "and the position schemes, data with PIL); run task=clip without it")
    lib = cliplib()
    presets = {"tiny": CLIP_TINY, **lib.PRESETS}
    if cfg["clip_preset"] not in presets:
        raise ValueError(f"unknown clip_preset {cfg['clip_preset']!r}; valid: {', '.join(presets)}")
    args = {**presets[cfg["clip_preset"]], "image_size": cfg["image_size"], "in_chans": cfg["in_chans"],
            "grad_checkpoint": cfg["grad_checkpoint"]}
    net = lib.build_clip(**args)
    a = net.model_args
    B, C, S, T, dev = cfg["batch_size"], cfg["in_chans"], cfg["image_size"], a["context_length"], cfg["device"]
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    g = torch.Generator().manual_seed(cfg["seed"])
    images = torch.randn(B, C, S, S, generator=g).to(dev).contiguous(memory_format=memory_format)
    # captions of random lengths: ids below eot (the causal tower pools at eot), then padding
    tokens = torch.randint(1, min(a["eot_id"], a["vocab_size"]), (B, T), generator=g)
    lengths = torch.randint(T // 4, T, (B,), generator=g)
    tokens[torch.arange(B), lengths] = a["eot_id"]
    tokens[torch.arange(T).view(1, T) > lengths.view(B, 1)] = a["pad_id"]
    tokens = tokens.to(dev)
    target = torch.arange(B, device=dev)

    def loss_fn(net):  # symmetric InfoNCE over the batch (model_clip.clip_loss on one process)
        img, txt, scale = net(images, tokens)
        logits = scale.float() * img.float() @ txt.float().t()
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

    flops = 3 * B * forward_flops(net, lambda: net(images[:1].cpu().contiguous(), tokens[:1].cpu()))
    step, opt = train_step(prepare_net(net, cfg, image=True), loss_fn, cfg, lambda i: ())
    name = f"nanorad CLIP {cfg['clip_preset']} ({a['image_model']} {S}px + {a['text_model']} text, {T} tokens)"
    return [Row(name, step, B, "pairs/s", flops, None, net, opt)], f"clip {cfg['clip_preset']} | batch {B} pairs"


def data_rows(cfg, cleanup):
    """Both pipelines end in a float (B, 1, S, S) batch on the device: memmap rows through data.Loader, to_float
    and augment (train.py's path); PIL: PNG decode + RandomResizedCrop + ToTensor + Normalize in a DataLoader."""
    B, S, n, dev = cfg["batch_size"], cfg["image_size"], cfg["data_images"], cfg["device"]
    tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="nanorad-bench-"))
    if cfg["real_data"]:
        src = data.PreparedSplit(cfg["data_dir"], "train")
        S, n = src.meta["image_size"], min(n, len(src))
        images, source = np.asarray(src.images[:n]), f"first {n} train images of {cfg['data_dir']}"
    else:
        images, source = data.bench_images(n, S), f"{n} generated images"
    labels = np.zeros((n, 1), np.float32)
    data.write_prepared(tmp, {"train": (images, labels, [data.index_record(f"bench/{i}", i) for i in range(n)])},
                        dict(task="multilabel", classes=["x"], source="bench"))
    split = data.PreparedSplit(tmp, "train")
    mean, std = split.meta["mean"], split.meta["std"]
    loader = data.Loader(split, B, 1, cfg["seed"], 0, 1, dev, prefetch=0)  # timed synchronously, no prefetch thread
    cleanup.callback(loader.close)

    def read(i):
        return loader.host_batch(i)[0][0].to(dev)

    def read_augment(i, **knobs):
        x01 = read(i).float() / 255.0
        gen = torch.Generator(device=x01.device).manual_seed(cfg["seed"] * 1_000_003 + i)
        return data.to_float(data.augment(x01, gen, **knobs), mean, std, 1)

    def read_crop(i):  # the work of the PIL row: a random resized crop, no rotation and no intensity changes
        return read_augment(i, rot=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0, gamma=0.0,
                            noise=0.0)

    full, crop = "memmap + augment", "memmap + crop only"  # Loader.host_batch -> to_float -> augment: train.py's path
    rows = [Row(full, read_augment, B, "img/s"), Row(crop, read_crop, B, "img/s"),
            Row("memmap uint8 read", read, B, "img/s", None, full)]
    if cfg["compare"]:
        import torchvision
        from PIL import Image
        from torchvision import transforms as T
        folder = os.path.join(tmp, "png", "class0")
        os.makedirs(folder)
        for i in range(n):
            Image.fromarray(images[i]).save(os.path.join(folder, f"{i:05d}.png"))
        tf = T.Compose([T.RandomResizedCrop(S), T.ToTensor(), T.Normalize([mean], [std])])
        ds = torchvision.datasets.ImageFolder(os.path.dirname(folder), transform=tf, loader=load_gray)
        workers = cfg["data_workers"]
        extra = dict(persistent_workers=True, prefetch_factor=2) if workers else {}
        dl = torch.utils.data.DataLoader(ds, batch_size=B, shuffle=True, num_workers=workers, drop_last=n >= B,
                                         pin_memory=dev.startswith("cuda"), **extra)
        batches = iter(())

        def pil(i):
            nonlocal batches
            xb = next(batches, None)
            if xb is None:  # the epoch ended: start the next one (workers persist)
                batches = iter(dl)
                xb = next(batches)
            return xb[0].to(dev, non_blocking=True)
        pil_name = f"PIL ImageFolder + RandomResizedCrop ({workers} workers)"
        rows.append(Row(pil_name, pil, B, "img/s", None, crop, alone_warmup=2 * workers))
    header = (f"data | {S}x{S} | batch {B} | {source} | memmap + augment = Loader.host_batch -> to_float -> augment "
              f"(affine + crop + intensity + noise; crop only: the random resized crop alone) | PIL = PNG decode, "
              f"RandomResizedCrop, ToTensor, Normalize in a DataLoader")
    return rows, header


def load_gray(path):
    """ImageFolder's loader for X-rays: one channel, like the memmap rows (its default converts to RGB)."""
    from PIL import Image
    with open(path, "rb") as f:
        return Image.open(f).convert("L")


BUILDERS = {"classify": classify_rows, "gpt": gpt_rows, "clip": clip_rows, "data": data_rows}


# -----------------------------------------------------------------------------
# timing and the table


def make_profiler(cfg):
    """torch.profiler over a few timed iterations (after the burn-in), traces in out_dir/profile for TensorBoard."""
    if not cfg["profile"]:
        return nullcontext(None)
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
    trace_dir = os.path.join(cfg["out_dir"], "profile")
    os.makedirs(trace_dir, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg["device"].startswith("cuda") else [])
    warm = 1 if cfg["iters"] > 1 else 0
    sched = schedule(skip_first=cfg["warmup_iters"], wait=0, warmup=warm, active=max(1, min(3, cfg["iters"] - warm)),
                     repeat=1)
    return profile(activities=activities, schedule=sched, on_trace_ready=tensorboard_trace_handler(trace_dir),
                   record_shapes=True, profile_memory=True, with_stack=False)


def time_rows(rows, cfg):
    """Burn-in, then timed iterations; the rows alternate every iteration, in alternating order. A row with its own
    worker processes (PIL DataLoader) is timed alone afterwards: between its turns its workers would fill their
    queue, and the first prefetch_factor * workers batches would come for free, so those are burn-in too."""
    cuda, W, N = cfg["device"].startswith("cuda"), cfg["warmup_iters"], cfg["iters"]
    times = {r.name: [] for r in rows}
    peak_bytes = {r.name: 0 for r in rows}

    def timed(r, it, keep):
        sync(cfg["device"])
        if cuda:
            torch.cuda.reset_peak_memory_stats(cfg["device"])
            before = torch.cuda.memory_allocated(cfg["device"])
        t0 = time.perf_counter()
        with torch.profiler.record_function(r.name):
            r.step(it)
        sync(cfg["device"])
        if keep:
            times[r.name].append(time.perf_counter() - t0)
        if cuda:  # this step's transient peak + this model's own weights and optimizer state
            transient = torch.cuda.max_memory_allocated(cfg["device"]) - before
            peak_bytes[r.name] = max(peak_bytes[r.name], transient + r.static_bytes())

    together = [r for r in rows if not r.alone_warmup]
    with make_profiler(cfg) as prof:
        for it in range(W + N):
            for r in (together if it % 2 == 0 else together[::-1]):
                timed(r, it, it >= W)
            if prof is not None:
                prof.step()
    for r in rows:
        if r.alone_warmup:
            for it in range(W + r.alone_warmup + N):
                timed(r, it, it >= W + r.alone_warmup)
    if not cuda:  # ru_maxrss: KiB on Linux, the whole process's high-water mark
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_bytes = {name: rss for name in peak_bytes}
    return times, peak_bytes


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def fmt_rate(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def print_table(results, mem_label, cuda):
    unit, scale = ("TFLOP/s", 1) if cuda else ("GFLOP/s", 1000)  # a CPU reaches tens of GFLOP/s
    print(f"\n| run | ms/iter (median) | throughput | {unit} | MFU % | {mem_label} | ratio |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        vs = "" if r["baseline"] == r["name"] else f"{r['ratio']:.3g}x vs {r['baseline']}"
        achieved = r["tflops"] * scale if r["tflops"] else None
        print(f"| {r['name']} | {r['ms']:.1f} | {fmt_rate(r['rate'])} {r['unit']} | {fmt(achieved, '.1f')} | "
              f"{fmt(r['mfu'], '.1f')} | {r['peak_mb']:,.0f} | {vs} |")


def run_one(cfg):
    with ExitStack() as cleanup:
        rows, header = BUILDERS[cfg["task"]](cfg, cleanup)
        peak, peak_source = peak_flops(cfg) if any(r.flops for r in rows) else (None, "no FLOP count")
        print(f"bench: {header}\n  {cfg['device']} {cfg['dtype']} | {torch.get_num_threads()} threads | "
              f"channels_last={cfg['channels_last']} compile={cfg['compile']} optimizer={cfg['optimizer']} "
              f"grad_checkpoint={cfg['grad_checkpoint']} | {cfg['warmup_iters']} burn-in + {cfg['iters']} timed "
              f"steps per row, rows alternating | peak: {peak_source}")
        times, peak_bytes = time_rows(rows, cfg)
        if peak and not cfg["device"].startswith("cuda"):
            peak, peak_source = peak_flops(cfg, reps=5)
            print(f"  peak after timing: {peak_source}")
    ms = {r.name: 1000 * statistics.median(times[r.name]) for r in rows}
    results = []
    for r in rows:
        achieved = r.flops / (ms[r.name] / 1000) if r.flops else None
        results.append(dict(
            task=cfg["task"], name=r.name, batch_size=cfg["batch_size"], ms=ms[r.name], rate=r.items / ms[r.name] * 1000,
            unit=r.unit, tflops=achieved / 1e12 if achieved else None,
            mfu=100 * achieved / peak if achieved and peak else None, peak_flops=peak,
            peak_mb=peak_bytes[r.name] / 2 ** 20, baseline=r.baseline, ratio=ms[r.name] / ms[r.baseline],
            device=cfg["device"], dtype=cfg["dtype"], threads=torch.get_num_threads()))
    cuda = cfg["device"].startswith("cuda")
    print_table(results, "peak MB (step + own state)" if cuda else "peak MB (process RSS)", cuda)
    if len(results) > 1:
        print("\nratio = this row's ms / the named row's ms (> 1: the named row, ours, is faster)")
    if cfg["profile"]:
        print(f"profile: {os.path.join(cfg['out_dir'], 'profile')}/*.pt.trace.json (timed rows include profiler "
              f"overhead) | tensorboard --logdir={os.path.join(cfg['out_dir'], 'profile')}")
    return results


# -----------------------------------------------------------------------------
# the GPU suite


def run_suite(cfg, argv):
    if cfg["suite"] != "gpu":
        raise ValueError(f"unknown suite {cfg['suite']!r}; valid: gpu")
    if not cfg["dry_run"] and not torch.cuda.is_available():
        print("bench --suite=gpu: skipped, no CUDA GPU here (torch.cuda.is_available() is False). It is meant for one "
              "H100/H200 (< 5 min); --dry_run=True runs each entry once, tiny, on the CPU to check the code path.")
        return []
    own = [a for a in argv if not a.startswith(("--suite=", "--dry_run="))]
    t_start, results = time.perf_counter(), []
    for label, entry in SUITE_GPU:
        t0 = time.perf_counter()
        print(f"\n=== suite gpu: {label}{' (dry run)' if cfg['dry_run'] else ''}")
        rows = main(SUITE_GPU_COMMON + entry + own + (SUITE_DRY if cfg["dry_run"] else []))
        for r in rows:
            r["run"] = label
        results += rows
        print(f"({time.perf_counter() - t0:.0f} s)")
    total = time.perf_counter() - t_start
    dev = results[0]["device"]
    where = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "CPU dry run (numbers mean nothing)"
    print(f"\nREADME table: {where}, torch {torch.__version__}, {total:.0f} s in all\n")
    print("| run | row | batch | ms/iter | throughput | MFU % | peak GB |\n|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['run']} | {r['name']} | {r['batch_size']} | {r['ms']:.1f} | {fmt_rate(r['rate'])} {r['unit']} | "
              f"{fmt(r['mfu'], '.1f')} | {r['peak_mb'] / 1024:.2f} |")
    return results


# -----------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = configurator.load(DEFAULTS, argv)
    if cfg["suite"]:
        return run_suite(cfg, argv)
    if cfg["task"] not in TASKS:
        raise ValueError(f"unknown task {cfg['task']!r}; valid: {', '.join(TASKS)}")
    if cfg["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg['optimizer']!r}; valid: {', '.join(OPTIMIZERS)}")
    if cfg["real_data"] and cfg["task"] not in ("classify", "data"):
        raise ValueError(f"real_data=True reads images for task=classify or data; task={cfg['task']} uses random tokens")
    assert cfg["iters"] >= 1, f"iters={cfg['iters']}: at least one timed step is needed"
    cfg["device"] = common.resolve_device(cfg["device"])
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    cfg["dtype"] = common.resolve_dtype(cfg["dtype"], cfg["device"])
    torch.manual_seed(cfg["seed"])
    return run_one(cfg)


if __name__ == "__main__":
    configurator.cli(main)
