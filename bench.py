"""
Throughput of a classifier train step (forward + backward + AdamW step) on synthetic images, and with
--compare the same step of timm's reference implementation, measured in the same process, alternating
the two models every iteration so that both see the same machine noise.

CPU, our ConvNeXt-T against timm's (markdown table with the ratio; >1 means ours is faster):
    python bench.py --model=convnext_tiny --batch_size=16 --image_size=224 --compare=True

One GPU, bf16, compiled:
    python bench.py --model=convnext_tiny --device=cuda --dtype=bfloat16 --batch_size=128 --compile=True

Any model build_model knows (1-channel X-rays, 14 findings):
    python bench.py --model=vit_cxr --in_chans=1 --num_classes=14 --batch_size=32
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import common
import configurator
import model as models

# -----------------------------------------------------------------------------
# config
model = "convnext_tiny"  # any build_model name: convnext_*, vit_*, vit_cxr, tv:<torchvision name>
batch_size = 32  # images per step
image_size = 224  # pixels (square)
in_chans = 3  # 3 to compare with timm's ImageNet models, 1 for X-rays
num_classes = 1000
device = "cpu"  # cpu | cuda | cuda:1
dtype = "float32"  # float32 | bfloat16 | float16 (autocast)
threads = 0  # CPU threads for torch (0 = torch's default)
channels_last = False  # memory format of the input and the model (our ConvNeXt goes channels_last inside anyway)
compile = False  # torch.compile both models
warmup_iters = 3  # burn-in steps per model, not timed (allocator, oneDNN / cuDNN algorithm choice)
iters = 10  # timed steps per model; the median is reported
optimizer_step = True  # include the AdamW step in the timed step
compare = False  # also time timm's implementation of the same architecture (needs pip install timm)
seed = 1337
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

TIMM_NAMES = {f"convnext_{s}": f"convnext_{s}" for s in models.CONVNEXT_SIZES}
TIMM_NAMES.update({f"vit_{s}": f"vit_{s}_patch16_224" for s in models.VIT_SIZES})

# -----------------------------------------------------------------------------


def make_step(net, x, y, cfg):
    """One train step as train.py runs it: forward under autocast, cross-entropy, backward, AdamW."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        with common.autocast(cfg["device"], cfg["dtype"]):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        if cfg["optimizer_step"]:
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main(argv=None):
    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    cfg["dtype"] = common.resolve_dtype(cfg["dtype"], cfg["device"])
    torch.manual_seed(cfg["seed"])
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    B, S, C = cfg["batch_size"], cfg["image_size"], cfg["in_chans"]
    x = torch.randn(B, C, S, S, device=cfg["device"]).contiguous(memory_format=memory_format)
    y = torch.randint(0, cfg["num_classes"], (B,), device=cfg["device"])

    # --- the models: ours, and with --compare timm's
    nets = {}
    ours = models.build_model(cfg["model"], cfg["num_classes"], C, S)
    flops = models.estimate_flops(ours, S, C)
    nets["nanorad " + cfg["model"]] = ours
    if cfg["compare"]:
        if cfg["model"] not in TIMM_NAMES:
            raise ValueError(f"--compare knows timm's {', '.join(TIMM_NAMES)}; not {cfg['model']!r}")
        try:
            import timm
        except ImportError as e:
            raise ImportError("--compare=True needs timm: pip install timm") from e
        extra = {"img_size": S} if cfg["model"].startswith("vit") else {}  # timm's ViT is built for one size
        ref = timm.create_model(TIMM_NAMES[cfg["model"]], num_classes=cfg["num_classes"], in_chans=C, **extra)
        nets["timm " + TIMM_NAMES[cfg["model"]]] = ref
    steps = {}
    for name, net in nets.items():
        net.to(cfg["device"], memory_format=memory_format).train()
        steps[name] = make_step(torch.compile(net) if cfg["compile"] else net, x, y, cfg)
    print(f"bench: {cfg['model']} | batch {B} x {C}x{S}x{S} | {cfg['device']} {cfg['dtype']} | "
          f"{torch.get_num_threads()} threads | {flops / 1e9:.2f} GFLOPs/img forward | channels_last={cfg['channels_last']} "
          f"compile={cfg['compile']} | {cfg['warmup_iters']} warmup + {cfg['iters']} timed steps per model")

    # --- the timing loop: models alternate every iteration, in alternating order
    times = {name: [] for name in nets}
    names = list(nets)
    for it in range(cfg["warmup_iters"] + cfg["iters"]):
        for name in (names if it % 2 == 0 else names[::-1]):
            sync(cfg["device"])
            t0 = time.perf_counter()
            steps[name]()
            sync(cfg["device"])
            if it >= cfg["warmup_iters"]:
                times[name].append(time.perf_counter() - t0)

    # --- report: a markdown table
    what = "fwd+bwd+AdamW" if cfg["optimizer_step"] else "fwd+bwd"
    print(f"\n| model | ms/iter ({what}, median) | images/s | TFLOP/s |\n|---|---|---|---|")
    result = {}
    for name in names:
        ms = 1000 * statistics.median(times[name])
        result[name] = ms
        print(f"| {name} | {ms:.1f} | {B / ms * 1000:.1f} | {3 * flops * B / ms / 1e9:.3f} |")
    if cfg["compare"]:
        ratio = result[names[1]] / result[names[0]]
        print(f"\nspeed ratio timm / ours = {ratio:.3f} (>= 1.0: ours is as fast or faster)")
        result["ratio"] = ratio
    return result


if __name__ == "__main__":
    main()
