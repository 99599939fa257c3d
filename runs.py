"""
One loader for every checkpoint nanorad writes: load_run(path) -> (model, meta, config). A plain classifier or a
fusion model (train.py), a pruned or int8 export (export.py), a CLIP (train_clip.py), a GPT (train_gpt.py), each
rebuilt from its model_args (a checkpoint never pickles code); model_input() turns stored uint8 pixels into that
model's input. The pruned / int8 rebuilding pieces live here because export.py (a command) writes them and every
reader needs them.
"""

import os
import warnings
from collections import OrderedDict

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import fusion
import model as models
import model_clip
from model_gpt import GPT, gpt_config_from_dict

# -----------------------------------------------------------------------------
# one loader for every checkpoint family: load_run(path) -> (model, meta, config)
# plain classifier and fusion model (train.py), pruned / int8 export (export.py), CLIP (train_clip.py), GPT
# (train_gpt.py); each rebuilt from its model_args, so a checkpoint never pickles code

RUN_INFO_KEYS = ("script", "iter", "iter_num", "best_metric", "export", "quant_mode", "pruned_shapes", "source",
                 "tokenizer")


def load_run(path, device="cpu", weights="model", reader=None):
    """Any checkpoint nanorad writes -> (model in eval mode on device, meta, config). meta: what the run knew about
    its data (classes, task, mean / std, data_dir; a GPT's `data` dict); config: the run's knobs. The model carries
    .model_args and .run_info (iter, script, export kind, pruned shapes, tokenizer: the other small keys).
    weights: model | ema (the EMA copy, when trained with ema_decay > 0). reader: the calling command (e.g.
    "evaluate.py"): a checkpoint of a family it does not read is an error that names the command that does."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found: train one first (python train.py ...) or point at "
                                f"out/<run>/best.pt")
    ck = common.load_checkpoint(path)
    script = common.checkpoint_script(ck)
    if reader is not None and reader not in common.READ_BY.get(script, ()):
        readers = common.READ_BY.get(script, ())
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
    net.run_info = {"script": script, "path": path, **{k: ck[k] for k in RUN_INFO_KEYS if k in ck and k != "script"}}
    meta = ck.get("meta") or ck.get("data") or {}
    return net.to(device).eval(), meta, ck.get("config", {})


def build_from_checkpoint(ck, script=None):
    """The untrained module a checkpoint's weights fit: its family's builder on model_args, then the export
    surgery (pruned widths, int8 structure). load_run loads the weights into it."""
    script = script or common.checkpoint_script(ck)
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


# -----------------------------------------------------------------------------
# inference (optionally with TTA)


def activation(logits, task):
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)


@torch.no_grad()
def predict(net, images, meta, batch_size=64, tta=0, tta_seed=0, device="cpu", inputs=None):
    """Probabilities (N, C) for uint8 images (N, H, W). inputs: a fusion model's per-sample arrays
    (fusion.split_inputs), row i = image i. TTA: mean of the plain view and `tta` views from data.augment with a
    generator seeded per batch, so the result does not depend on anything else."""
    task = meta["task"]
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i:i + batch_size]))[:, None].to(device)
        x = model_input(x, meta, net.model_args)
        kw = fusion.batch_inputs(inputs, np.arange(i, i + len(x)), device)  # {} for an image-only model
        p = activation(net(x, **kw).float(), task)
        if tta > 0:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(tta_seed * 1_000_003 + i)
            for _ in range(tta):
                p += activation(net(data.augment(x, gen), **kw).float(), task)
            p /= tta + 1
        out.append(p.cpu().numpy())
    C = len(meta["classes"])
    probs = np.concatenate(out) if out else np.zeros((0, C), np.float32)
    check_finite_outputs(probs, net)
    return probs


def check_finite_outputs(probs, net):
    """NaN / inf probabilities come from a run that diverged (or a float16 overflow): one sentence naming the
    checkpoint, the iteration it was saved at and what to try, instead of scikit-learn's "Input contains NaN"."""
    bad = ~np.isfinite(probs).all(axis=1)
    if not bad.any():
        return
    info = getattr(net, "run_info", {})
    it = info.get("iter", info.get("iter_num"))
    where = f"{info['path']} (saved at iter {it})" if info.get("path") else "the model"
    raise ValueError(f"{where} outputs NaN or inf for {int(bad.sum())} of {len(bad)} images: the run diverged. "
                     f"Train it again with a lower --learning_rate, --grad_clip=1.0 (or lower) and --dtype=float32, "
                     f"from a checkpoint before the loss in its metrics.jsonl became NaN")


# -----------------------------------------------------------------------------
# a CLIP's inputs: the image tower's normalization (dataset / imagenet / clip stats), captions to features

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def norm_stats(meta, cfg):
    """Per-channel (mean, std) in [0, 1] pixel units of the run's input normalization (norm, in_chans)."""
    C, norm = cfg["in_chans"], cfg["norm"]
    if norm not in ("dataset", "imagenet", "clip"):
        raise ValueError(f"norm must be dataset, imagenet or clip, got {norm!r}")
    if norm == "dataset":
        return [float(meta["mean"])] * C, [float(meta["std"])] * C
    m, s = (CLIP_MEAN, CLIP_STD) if norm == "clip" else (data.IMAGENET_MEAN, data.IMAGENET_STD)
    return (list(m), list(s)) if C == 3 else ([sum(m) / 3] * C, [sum(s) / 3] * C)


def images_to_float(x, meta, cfg):
    """uint8 (B,1,H,W) or float in [0, 1] -> the normalized (B,in_chans,H,W) input of the image tower."""
    mean, std = norm_stats(meta, cfg)
    return data.to_float(x, mean, std, len(mean))


def images_to_unit(x, meta, cfg):
    """The inverse of images_to_float: a normalized input -> gray (B,1,H,W) in [0, 1] pixel units."""
    m, s = norm_stats(meta, cfg)
    return x[:, :1] * s[0] + m[0]


def trim(tokens, lengths):
    """Cut the padding columns every row of the batch has: exact for both towers (causal: padding comes after the
    pooled end token; BERT: padding is masked), and the attention cost follows the longest caption."""
    return tokens[:, :max(1, int(lengths.max()))]


@torch.no_grad()
def encode_texts(raw, tok, texts, cfg, device, batch=256):
    out = []
    for a in range(0, len(texts), batch):
        ids, lengths = tok(texts[a:a + batch], cfg["context_length"])
        t = trim(torch.tensor(ids), torch.tensor(lengths)).to(device)
        with common.autocast(device, cfg["dtype"]):
            out.append(raw.encode_text(t).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, cfg["embed_dim"])


def negative_query(query, negative="auto"):
    """The negative sentence --query is ranked against: "auto" -> "No <query>." (the wording reports use to rule a
    finding out), a sentence with "{}" -> the sentence with the query in it, "" -> none (plain cosine)."""
    if not negative:
        return ""
    if negative == "auto":
        q = query.strip().rstrip(".")
        return f"No {q[:1].lower()}{q[1:]}."
    return negative.format(query) if "{}" in negative else negative


def negation_aware(s_pos, s_neg, scale):
    """CheXzero's negation-aware probability of the positive prompt: softmax(scale * [s_pos, s_neg])[0], elementwise
    over similarities to a positive and a negative prompt (scale = the CLIP's logit scale)."""
    return torch.softmax(scale * torch.stack([s_pos, s_neg]), 0)[0]


@torch.no_grad()
def rank_by_query(raw, tok, img, query, cfg, device, negative="auto"):
    """Scores of image embeddings img (N, D) for a text query, with the sentence ranked against. With a negative
    sentence the score is negation_aware(cos(img, query), cos(img, negative), the model's logit scale): a text tower
    that mostly encodes which words occur puts "left pleural effusion" next to "No left pleural effusion." and plain
    cosine then ranks by the words; the difference ranks by the finding."""
    neg = negative_query(query, negative)
    e = encode_texts(raw, tok, [query] + ([neg] if neg else []), cfg, device)
    score = img @ e[0]
    if neg:
        score = negation_aware(score, img @ e[1], float(raw.logit_scale.detach().exp()))
    return score, neg
