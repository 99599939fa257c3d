"""
Post-training efficiency for a train.py checkpoint: ONNX export, int8 quantization and structured pruning,
each measured against the original in the same process (size on disk, CPU latency, validation metric) and
summarised as one JSON line appended to out_dir/export.jsonl.

All three from the best checkpoint of a run (files land next to it: model.onnx, int8.pt, pruned.pt):
    python export.py --ckpt=out/quickstart/best.pt --to=all

ONNX (opset 17, dynamic batch axis, preprocessing inside: input "image" (B,1,H,W) float pixels in [0,1],
output "logits"), verified with onnxruntime when it is installed (pip install onnx onnxruntime):
    python export.py --ckpt=out/quickstart/best.pt --to=onnx

int8. ViT / ConvNeXt (and any model made of nn.Linear: CLIP text tower, GPT): dynamic quantization of
every Linear (weights int8, activations quantized on the fly). tv: conv nets (resnet, densenet, ...): FX
graph-mode static quantization (x86 backend), calibrated on calib_batches validation batches:
    python export.py --ckpt=out/vit_cxr/best.pt --to=int8
    python export.py --ckpt=out/resnet50/best.pt --to=int8 --quant_mode=static --calib_batches=8

Structured pruning: remove whole attention heads and MLP hidden channels (ViT), MLP hidden channels
(ConvNeXt blocks), ranked by L1 magnitude or by |w * grad| on a few train batches, then an optional short
fine-tune with train.py's loss. The result has fewer parameters (smaller Linears), not masks:
    python export.py --ckpt=out/vit_cxr/best.pt --to=pruned --prune_amount=0.3 --prune_importance=taylor --finetune_iters=200

Chaining works (a pruned checkpoint can be quantized or exported): --ckpt=out/x/pruned.pt --to=int8.
Load any of the .pt files it writes with runs.load_run(path) -> (model, meta, config), as evaluate.py does.

What prune_amount means: the fraction of the *prunable* parameters removed in every block. The prunable
parameters are the weights and biases of the block Linears: qkv + attention output projection + MLP
fc1 + fc2 (ViT), fc1 + fc2 (ConvNeXt). Heads go first (round(n_head * prune_amount) per block, at least
one head stays), the MLP hidden channels make up the rest, so each block loses prune_amount of its
prunable parameters to within one channel. Embeddings, norms, convs and the head are untouched.
"""

import datetime
import io
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

import common
import configurator
import data
import losses as classifier_losses
import metrics
import model as models
import runs
import tracking
from runs import HeadPrunedAttention, quantize, set_module  # noqa: F401 (quantize: export.quantize in tests)

# -----------------------------------------------------------------------------
# config
ckpt = ""  # a train.py checkpoint (best.pt / ckpt.pt) or a pruned.pt written by this script
to = "all"  # onnx | int8 | pruned | all
out_dir = ""  # exports + export.jsonl go here; "" = the checkpoint's folder
data_dir = ""  # prepared data for the metric / calibration / fine-tune; "" = the one the checkpoint was trained on
split = "val"  # split the metric is measured on
metric = "auc_macro"  # any key of metrics.classification_metrics (auc_macro, ap_macro, acc for multi-class)
max_eval_images = 0  # 0 = the whole split; a cap makes quick checks quicker
eval_batch_size = 128
use_ema = False  # export the EMA weights when the checkpoint has them (train.py ema_decay > 0)
# latency: the same batch, the original and every export alternating in one process, median of latency_iters
threads = 0  # torch / onnxruntime intra-op threads; 0 = torch's current setting
latency_batch = 16  # images per timed forward (1 = interactive use; larger = throughput)
latency_iters = 20  # timed forwards per model; the median is reported
latency_warmup = 3  # untimed forwards per model first (allocator, oneDNN kernel choice)
# onnx
opset = 17  # ONNX opset; 17 has LayerNormalization
onnx_dynamo = False  # True = the torch.export-based exporter (needs pip install onnxscript); False = TorchScript-based
# int8
quant_mode = "auto"  # auto (static for tv: conv nets, dynamic Linear for ViT / ConvNeXt) | dynamic | static
calib_batches = 4  # static: validation batches of eval_batch_size that calibrate the activation ranges
# pruning
prune_amount = 0.3  # fraction of the prunable parameters (block Linears) removed in every block
prune_importance = "l1"  # l1 (weight magnitude) | taylor (|w * grad| summed over importance_batches train batches)
prune_heads = True  # ViT: also remove whole attention heads (False: MLP hidden channels only)
importance_batches = 4  # taylor: train batches of batch_size
finetune_iters = 0  # AdamW steps on the train split after pruning, with train.py's loss (0 = none)
finetune_lr = 1e-4  # constant LR of that fine-tune (~1/10 - 1/40 of the training peak)
batch_size = 32  # taylor / fine-tune micro-batch
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per knob; CHECKS: across knobs)
RANGES = dict(opset="[17, 23]", prune_amount="[0, 1)", latency_batch="[1, inf)", latency_iters="[1, inf)")
# train.py's defaults of the knobs the fine-tune reads, for a checkpoint saved without its config
FINETUNE_DEFAULTS = dict(weight_decay=0.05, beta1=0.9, beta2=0.999, augment=False, hflip=False)

# -----------------------------------------------------------------------------
# loading: plain train.py checkpoints, pruned ones (resized Linears) and int8 ones (quantized state dicts)


def load_model(path, use_ema=False):
    """Any checkpoint train.py or export.py writes -> (model in eval mode on the CPU, checkpoint keys: meta, config,
    model_args, and export / quant_mode / pruned_shapes when present). runs.load_run rebuilds it."""
    net, meta, config = runs.load_run(path, weights="ema" if use_ema else "model", reader="export.py")
    return net, {**net.run_info, "meta": meta, "config": config, "model_args": net.model_args}

# -----------------------------------------------------------------------------
# measuring: size on disk, latency, the validation metric


def saved_size_mb(obj):
    """Size of torch.save(obj) in MB (what the file on disk would be)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes / 1e6


class Preprocessed(nn.Module):
    """Pixels in [0,1] (B,1,H,W) -> train.py's normalization -> model -> logits. What the ONNX file holds, and
    the one forward every measurement here uses, so that torch, int8 and ONNX are timed on the same work."""

    def __init__(self, net, meta, in_chans):
        super().__init__()
        self.net, self.mean, self.std, self.in_chans = net, meta["mean"], meta["std"], in_chans
        self.imagenet_norm = meta.get("imagenet_norm", False)

    def forward(self, x):
        return self.net(data.to_float(x, self.mean, self.std, self.in_chans, self.imagenet_norm))


def eval_logits(forward, split, batch_size, max_images):
    """Logits of the first max_images (0 = all) images of split, in order; forward takes (B,1,H,W) in [0,1]."""
    n = len(split) if max_images <= 0 else min(max_images, len(split))
    out = []
    for a in range(0, n, batch_size):
        x = torch.from_numpy(np.array(split.images[a:min(a + batch_size, n)])).unsqueeze(1).float() / 255.0
        with torch.no_grad():
            out.append(torch.as_tensor(forward(x)).float())
    return torch.cat(out)


def metric_of(logits, split, meta, name):
    labels = np.asarray(split.labels)[: len(logits)]
    task = meta["task"]
    probs = torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)
    record = metrics.classification_metrics(probs.numpy(), labels, meta["classes"], task)
    if name not in record:
        raise ValueError(f"metric={name!r} is not computed for this data; choose one of {sorted(record)}")
    return float(record[name])


def latency_ms(forwards, x, iters, warmup):
    """Median ms per forward of each callable on the same batch. Each gets its own `warmup` untimed calls (allocator,
    oneDNN kernel choice, ORT's first run), then rounds alternate between them with the order rotated every round, so
    all see the same machine noise and none always follows the same neighbour."""
    times = {k: [] for k in forwards}
    names = list(forwards)
    with torch.no_grad():
        for k in names:
            for _ in range(warmup):
                forwards[k](x)
        for i in range(iters):
            for k in names[i % len(names):] + names[:i % len(names)]:
                t = time.perf_counter()
                forwards[k](x)
                times[k].append(1000 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def times_word(before, after, less, more):
    """'2.00x smaller' when after < before, '1.01x larger' when after > before (never '0.99x smaller')."""
    return f"{before / after:.2f}x {less}" if after <= before else f"{after / before:.2f}x {more}"

# -----------------------------------------------------------------------------
# ONNX


def export_onnx(pre, x, path, cfg):
    """torch -> ONNX with a dynamic batch axis. The TorchScript-based exporter by default: the torch.export-based
    one needs onnxscript, which is often absent (and is not a nanorad dependency)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings on shape ifs
        torch.onnx.export(pre, (x,), path, input_names=["image"], output_names=["logits"], opset_version=cfg["opset"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=cfg["onnx_dynamo"])


def require_onnx(cfg):
    """The packages the ONNX export needs, checked before any work (tracking.require: one sentence + pip command)."""
    tracking.require("onnx", "onnx onnxruntime", "export.py --to=onnx")
    if cfg["onnx_dynamo"]:
        tracking.require("onnxscript", "onnxscript", "export.py --onnx_dynamo=True (or use --onnx_dynamo=False)")


def add_onnx_metadata(path, meta, model_args):
    """Classes, task and the input convention in the file itself."""
    onnx = tracking.require("onnx", "onnx onnxruntime", "export.py --to=onnx")
    m = onnx.load(path)
    info = {"classes": json.dumps(meta["classes"]), "task": meta["task"], "model": model_args["model"],
            "input": "image: (B,1,H,W) float32 pixels in [0,1]; normalization is inside the graph",
            "output": "logits: sigmoid for multilabel, softmax for multiclass"}
    for k, v in info.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, path)

# -----------------------------------------------------------------------------
# int8 quantization


def count_int8_layers(net):
    """Linear and conv layers that run in int8 (dynamic Linear is a subclass of the static one)."""
    import torch.ao.nn.quantized as nnq
    return sum(isinstance(m, (nnq.Linear, nnq.Conv2d)) for m in net.modules())


def resolve_quant_mode(mode, model_name):
    if mode == "auto":
        return "static" if model_name.startswith("tv:") else "dynamic"
    if mode == "static" and not model_name.startswith("tv:"):
        # FX static int8 of our ConvNeXt traces but fails at run time in torch 2.14 (quantized add on the
        # channels_last residual, then mean: "required rank 4 tensor to use channels_last format"), and a ViT is
        # Linear layers whose activations dynamic quantization already covers: both use dynamic int8 of their Linears
        raise ValueError(f"quant_mode='static' is for tv: conv nets; {model_name} uses --quant_mode=dynamic "
                         f"(int8 Linears: the ViT blocks, the ConvNeXt block MLPs)")
    if mode not in ("dynamic", "static"):
        raise ValueError(f"quant_mode must be auto, dynamic or static, got {mode!r}")
    return mode


# -----------------------------------------------------------------------------
# structured pruning: whole heads and MLP hidden channels, Linears resized


def prunable_layers(net):
    """Per block: dict(attn=SelfAttention or None, fc1, fc2, scale=layer scale or None). ViT and ConvNeXt."""
    units = []
    for name, m in net.named_modules():
        if isinstance(m, models.Block):
            units.append(dict(name=name, attn=m.attn, attn_name=f"{name}.attn", fc1=m.mlp.c_fc, fc2=m.mlp.c_proj,
                              fc1_name=f"{name}.mlp.c_fc", fc2_name=f"{name}.mlp.c_proj", scale=None))
        elif isinstance(m, models.ConvNeXtBlock):
            units.append(dict(name=name, attn=None, fc1=m.fc1, fc2=m.fc2, fc1_name=f"{name}.fc1",
                              fc2_name=f"{name}.fc2", scale=m.gamma))
    return units


def _numel(*mods):
    return sum(p.numel() for m in mods for p in m.parameters())


def _block_linears(u):
    return [u["fc1"], u["fc2"]] + ([u["attn"].c_attn, u["attn"].c_proj] if u["attn"] is not None else [])


def count_prunable(net):
    """Parameters prune_amount is a fraction of: weights + biases of the block Linears (qkv, proj, fc1, fc2)."""
    return sum(_numel(*_block_linears(u)) for u in prunable_layers(net))


def _importance(m, scores):
    """Per-parameter importance of a Linear's weight and bias: |w| (l1, scores=None) or the taylor scores."""
    w = scores[m.weight] if scores is not None else m.weight.detach().abs()
    b = None if m.bias is None else (scores[m.bias] if scores is not None else m.bias.detach().abs())
    return w, b


def taylor_scores(net, loader_batches, loss_fn, meta, in_chans):
    """|w * dL/dw| summed over a few train batches (Molchanov et al. 2019, first-order Taylor importance)."""
    acc = {p: torch.zeros_like(p) for p in net.parameters()}
    net.train()
    for x, y in loader_batches:
        x = data.to_float(x, meta["mean"], meta["std"], in_chans, meta.get("imagenet_norm", False))
        net.zero_grad(set_to_none=True)
        loss_fn(net(x).float(), y).backward()
        for p in net.parameters():
            if p.grad is not None:
                acc[p] += (p.detach() * p.grad).abs()
    net.zero_grad(set_to_none=True)
    net.eval()
    return acc


def _keep(scores, n_remove):
    """Indices of the groups to keep: all but the n_remove lowest scores, in their original order."""
    order = torch.argsort(scores, stable=True)
    return torch.sort(order[n_remove:]).values


def _shrink_linear(m, out_idx=None, in_idx=None):
    w = m.weight.detach()
    b = None if m.bias is None else m.bias.detach()
    if out_idx is not None:
        w, b = w[out_idx], (None if b is None else b[out_idx])
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def prune_model(net, amount, scores=None, prune_heads=True):
    """Remove the least important heads / hidden channels of every block, in place. scores: None (l1) or the
    taylor dict param -> importance. Returns pruned_shapes {"linears": {name: [out, in]}, "n_head": {name: n}}."""
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"prune_amount must be in [0, 1), got {amount}")
    units = prunable_layers(net)
    if not units:
        raise ValueError(f"pruning knows ViT (vit_*, vit_cxr) and ConvNeXt blocks; {net.model_args['model']} has neither")
    shapes = {"linears": {}, "n_head": {}}
    for u in units:
        fc1, fc2, attn = u["fc1"], u["fc2"], u["attn"]
        target = amount * _numel(*_block_linears(u))
        removed = 0
        # heads: a head is hs rows of each of q, k, v and hs input columns of the output projection
        if attn is not None and prune_heads:
            nh, inner = attn.n_head, attn.c_proj.in_features
            hs = inner // nh
            n_remove = min(nh - 1, round(nh * amount))
            if n_remove > 0:
                w, b = _importance(attn.c_attn, scores)
                wp, _ = _importance(attn.c_proj, scores)
                rows = w.sum(1) + (b if b is not None else 0)  # (3 * inner,)
                head_scores = rows.view(3, nh, hs).sum((0, 2)) + wp.sum(0).view(nh, hs).sum(1)
                keep = _keep(head_scores, n_remove)
                cols = (keep[:, None] * hs + torch.arange(hs)).flatten()  # kept inner channels
                rows_idx = torch.cat([cols + part * inner for part in range(3)])
                before = _numel(attn.c_attn, attn.c_proj)
                attn.c_attn = _shrink_linear(attn.c_attn, out_idx=rows_idx)
                attn.c_proj = _shrink_linear(attn.c_proj, in_idx=cols)
                removed += before - _numel(attn.c_attn, attn.c_proj)
                new_attn = HeadPrunedAttention(attn, nh - n_remove)
                set_module(net, u["attn_name"], new_attn)
                shapes["n_head"][u["attn_name"]] = nh - n_remove
                for part in ("c_attn", "c_proj"):
                    m = getattr(new_attn, part)
                    shapes["linears"][f"{u['attn_name']}.{part}"] = [m.out_features, m.in_features]
        # MLP hidden channels: a row of fc1 (+ its bias) and a column of fc2; they make up the rest of the target
        hidden = fc1.out_features
        per_channel = fc1.in_features + (1 if fc1.bias is not None else 0) + fc2.out_features
        n_remove = int(min(hidden - 1, max(0, round((target - removed) / per_channel))))
        if n_remove > 0:
            w1, b1 = _importance(fc1, scores)
            w2, _ = _importance(fc2, scores)
            if u["scale"] is not None and scores is None:
                w2 = w2 * u["scale"].detach().abs()[:, None]  # ConvNeXt: fc2's effective weight is gamma * fc2
            ch_scores = w1.sum(1) + (b1 if b1 is not None else 0) + w2.sum(0)
            keep = _keep(ch_scores, n_remove)
            new1, new2 = _shrink_linear(fc1, out_idx=keep), _shrink_linear(fc2, in_idx=keep)
            set_module(net, u["fc1_name"], new1)
            set_module(net, u["fc2_name"], new2)
            shapes["linears"][u["fc1_name"]] = [new1.out_features, new1.in_features]
            shapes["linears"][u["fc2_name"]] = [new2.out_features, new2.in_features]
    return shapes


def merge_shapes(old, new):
    """A pruned checkpoint pruned again: the newer widths win."""
    old = old or {"linears": {}, "n_head": {}}
    return {"linears": {**old["linears"], **new["linears"]}, "n_head": {**old["n_head"], **new["n_head"]}}


def train_batches(split, cfg, n, start=0):
    """n train batches (x uint8, y) from the train sampler, as train.py draws them (seeded, without replacement)."""
    loader = data.Loader(split, cfg["batch_size"], 1, cfg["seed"], 0, 1, "cpu", start_step=start, prefetch=1)
    try:
        for step in range(start, start + n):
            x, y, _ = loader.get(step)[0]
            yield x, y
    finally:
        loader.close()


def finetune(net, ck, cfg, train_split, meta):
    """finetune_iters AdamW steps with train.py's loss (and its augmentation), constant LR, grad clip 1."""
    tcfg = {**classifier_losses.LOSS_DEFAULTS, **FINETUNE_DEFAULTS, **ck.get("config", {})}
    loss_fn = classifier_losses.make_loss_fn(tcfg, meta["task"], None)
    in_chans = ck["model_args"]["in_chans"]
    groups = models.param_groups(net, tcfg["weight_decay"])
    opt = common.make_optimizer(groups, cfg["finetune_lr"], (tcfg["beta1"], tcfg["beta2"]), "cpu")
    net.train()
    losses = []
    for it, (x, y) in enumerate(train_batches(train_split, cfg, cfg["finetune_iters"])):
        x = data.to_float(x, meta["mean"], meta["std"], in_chans, meta.get("imagenet_norm", False))
        if tcfg.get("augment", True):
            gen = torch.Generator().manual_seed(cfg["seed"] * 1009 + it)
            x = data.augment(x, gen, hflip=tcfg.get("hflip", False))
        loss = loss_fn(net(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    net.eval()
    return losses

# -----------------------------------------------------------------------------
# the summary line


def summarize(kind, cfg, path, before, after, extra):
    rec = {"export": kind, "time": datetime.datetime.now().isoformat(timespec="seconds"), "ckpt": cfg["ckpt"],
           "file": path, "metric_name": cfg["metric"], **after, "before": before,
           "delta": {"size_x": round(before["size_mb"] / after["size_mb"], 3),
                     "latency_x": round(before["latency_ms"] / after["latency_ms"], 3),
                     "metric": round(after["metric"] - before["metric"], 5)}, **extra}
    if "params" in after:
        rec["delta"]["params_frac"] = round(1 - after["params"] / before["params"], 4)
    with open(os.path.join(cfg["out_dir"], "export.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)
    size = times_word(before["size_mb"], after["size_mb"], "smaller", "larger")
    speed = times_word(before["latency_ms"], after["latency_ms"], "faster", "slower")
    print(f"{kind}: {before['size_mb']:.2f} -> {after['size_mb']:.2f} MB ({size}) | "
          f"latency {before['latency_ms']:.2f} -> {after['latency_ms']:.2f} ms ({speed}) | "
          f"{cfg['metric']} {before['metric']:.4f} -> {after['metric']:.4f} ({rec['delta']['metric']:+.4f}) | {path}", flush=True)
    return rec

# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)
    if not cfg["ckpt"]:
        raise ValueError("pass the checkpoint to export: --ckpt=out/<run>/best.pt")
    if not os.path.isfile(cfg["ckpt"]):
        raise FileNotFoundError(f"{cfg['ckpt']} not found: train first (python train.py --out_dir=out/<run>) or fix --ckpt")
    kinds = ["onnx", "int8", "pruned"] if cfg["to"] == "all" else [cfg["to"]]
    if any(k not in ("onnx", "int8", "pruned") for k in kinds):
        raise ValueError(f"to must be onnx, int8, pruned or all, got {cfg['to']!r}")
    if "onnx" in kinds:
        try:
            require_onnx(cfg)
        except ImportError as e:
            if cfg["to"] != "all":
                raise
            print(f"onnx: skipped, {e}; the other exports go on", flush=True)
            kinds.remove("onnx")
    cfg["out_dir"] = cfg["out_dir"] or os.path.dirname(os.path.abspath(cfg["ckpt"]))
    os.makedirs(cfg["out_dir"], exist_ok=True)
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])

    # --- the original: model, data, its size / latency / metric
    net, ck = load_model(cfg["ckpt"], cfg["use_ema"])
    if ck.get("export") == "int8":
        raise ValueError(f"{cfg['ckpt']} is already int8; export from the fp32 checkpoint (best.pt or pruned.pt)")
    meta = {**ck["meta"]}
    data_dir = cfg["data_dir"] or meta["data_dir"]
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        raise FileNotFoundError(f"{data_dir}/meta.json not found (the data {cfg['ckpt']} was trained on): pass --data_dir=<prepared folder>")
    eval_split = data.PreparedSplit(data_dir, cfg["split"])
    model_args, in_chans = ck["model_args"], ck["model_args"]["in_chans"]
    base = Preprocessed(net, meta, in_chans).eval()
    xb = torch.from_numpy(np.array(eval_split.images[: cfg["latency_batch"]])).unsqueeze(1).float() / 255.0
    base_logits = eval_logits(base, eval_split, cfg["eval_batch_size"], cfg["max_eval_images"])
    runs.check_finite_outputs(base_logits.numpy(), net)  # a diverged run: say so, not scikit-learn's NaN error
    before = {"size_mb": saved_size_mb({"model": net.state_dict(), "model_args": model_args, "meta": meta}),
              "metric": metric_of(base_logits, eval_split, meta, cfg["metric"]), "params": models.get_num_params(net)}
    print(f"export.py | {cfg['ckpt']} | {model_args['model']} | {before['params'] / 1e6:.2f}M params | "
          f"{cfg['split']} {cfg['metric']} {before['metric']:.4f} on {len(base_logits)} images | threads {torch.get_num_threads()}")
    saved_ck = {"model_args": model_args, "meta": meta, "config": ck.get("config", {}), "source": cfg["ckpt"],
                "pruned_shapes": ck.get("pruned_shapes")}
    pending = {}  # kind -> (path, after, extra, forward): timed together at the end, then summarized

    # --- ONNX
    if "onnx" in kinds:
        path = os.path.join(cfg["out_dir"], "model.onnx")
        export_onnx(base, xb[:2], path, cfg)  # batch 2 at export; the checks below use other batch sizes
        add_onnx_metadata(path, meta, model_args)
        try:
            ort = tracking.require("onnxruntime", "onnxruntime", "checking model.onnx against torch")
        except ImportError as e:
            print(f"onnx: wrote {path}; not verified: {e}", flush=True)
        else:
            so = ort.SessionOptions()
            so.intra_op_num_threads = torch.get_num_threads()
            # ORT's threads otherwise busy-wait after each run and slow the torch forward timed next to it
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            run_ort = lambda x: torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])  # noqa: E731
            onnx_logits = eval_logits(run_ort, eval_split, cfg["eval_batch_size"], cfg["max_eval_images"])
            after = {"size_mb": os.path.getsize(path) / 1e6,
                     "metric": metric_of(onnx_logits, eval_split, meta, cfg["metric"])}
            pending["onnx"] = (path, after, {
                "max_abs_diff": float((onnx_logits - base_logits).abs().max()), "opset": cfg["opset"],
                "exporter": "dynamo" if cfg["onnx_dynamo"] else "torchscript", "onnxruntime": ort.__version__},
                run_ort)

    # --- int8
    if "int8" in kinds:
        mode = resolve_quant_mode(cfg["quant_mode"], model_args["model"])
        fp32, _ = load_model(cfg["ckpt"], cfg["use_ema"])  # quantization rewrites modules: start from a fresh copy
        calib = []
        if mode == "static":
            norm = lambda x: data.to_float(x, meta["mean"], meta["std"], in_chans, meta.get("imagenet_norm", False))  # noqa: E731
            shards = data.eval_shards(eval_split, cfg["eval_batch_size"], 0, 1)
            calib = [norm(x) for _, (_, x, _) in zip(range(cfg["calib_batches"]), shards)]
        q = quantize(fp32, mode, calib)
        qpre = Preprocessed(q, meta, in_chans).eval()
        path = os.path.join(cfg["out_dir"], "int8.pt")
        common.save_checkpoint({**saved_ck, "model": q.state_dict(), "export": "int8", "quant_mode": mode}, path)
        q_logits = eval_logits(qpre, eval_split, cfg["eval_batch_size"], cfg["max_eval_images"])
        after = {"size_mb": os.path.getsize(path) / 1e6, "metric": metric_of(q_logits, eval_split, meta, cfg["metric"])}
        pending["int8"] = (path, after, {
            "quant_mode": mode, "engine": torch.backends.quantized.engine, "int8_layers": count_int8_layers(q),
            "max_abs_diff": float((q_logits - base_logits).abs().max())}, qpre)

    # --- structured pruning (+ optional fine-tune)
    if "pruned" in kinds:
        pnet, _ = load_model(cfg["ckpt"], cfg["use_ema"])
        prunable_before = count_prunable(pnet)
        scores = None
        train_split = None
        if cfg["prune_importance"] == "taylor" or cfg["finetune_iters"] > 0:
            train_split = data.PreparedSplit(data_dir, "train")
        if cfg["prune_importance"] == "taylor":
            tcfg = {**classifier_losses.LOSS_DEFAULTS, **ck.get("config", {})}
            batches = list(train_batches(train_split, cfg, cfg["importance_batches"]))
            scores = taylor_scores(pnet, batches, classifier_losses.make_loss_fn(tcfg, meta["task"], None), meta, in_chans)
        elif cfg["prune_importance"] != "l1":
            raise ValueError(f"prune_importance must be l1 or taylor, got {cfg['prune_importance']!r}")
        shapes = merge_shapes(ck.get("pruned_shapes"), prune_model(pnet, cfg["prune_amount"], scores, cfg["prune_heads"]))
        pre_ft_metric = None
        losses = []
        if cfg["finetune_iters"] > 0:
            ppre = Preprocessed(pnet, meta, in_chans).eval()
            pre_ft_metric = metric_of(eval_logits(ppre, eval_split, cfg["eval_batch_size"], cfg["max_eval_images"]),
                                      eval_split, meta, cfg["metric"])
            losses = finetune(pnet, ck, cfg, train_split, meta)
        path = os.path.join(cfg["out_dir"], "pruned.pt")
        common.save_checkpoint({**saved_ck, "model": pnet.state_dict(), "export": "pruned", "pruned_shapes": shapes,
                                "prune": {k: cfg[k] for k in ("prune_amount", "prune_importance", "prune_heads", "finetune_iters")}},
                               path)
        ppre = Preprocessed(pnet, meta, in_chans).eval()
        p_logits = eval_logits(ppre, eval_split, cfg["eval_batch_size"], cfg["max_eval_images"])
        prunable_after = count_prunable(pnet)
        after = {"size_mb": os.path.getsize(path) / 1e6, "params": models.get_num_params(pnet),
                 "metric": metric_of(p_logits, eval_split, meta, cfg["metric"])}
        pending["pruned"] = (path, after, {
            "prunable_params_before": prunable_before, "prunable_params_after": prunable_after,
            "prunable_frac_removed": round(1 - prunable_after / prunable_before, 4),
            "importance": cfg["prune_importance"], "n_head_kept": sorted(set(shapes["n_head"].values())) or None,
            "metric_before_finetune": pre_ft_metric, "finetune_iters": cfg["finetune_iters"],
            "finetune_loss_first_last": [losses[0], losses[-1]] if losses else None}, ppre)

    # --- latency: the fp32 model and every variant in one alternating run (one fp32 figure for all rows), then the rows
    lat = latency_ms({"fp32": base, **{k: v[3] for k, v in pending.items()}}, xb, cfg["latency_iters"],
                     cfg["latency_warmup"])
    before["latency_ms"] = lat["fp32"]
    return {kind: summarize(kind, cfg, path, dict(before), {**after, "latency_ms": lat[kind]}, extra)
            for kind, (path, after, extra, _) in pending.items()}


if __name__ == "__main__":
    configurator.cli(main)
