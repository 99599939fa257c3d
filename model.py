"""
Every network nanorad trains, in one file, nanoGPT-style.

Image classifiers (build_model):
  convnext_{atto,femto,pico,nano,tiny,small,base}  ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s")
  vit_{tiny,small,base}                            ViT/16 (Dosovitskiy et al. 2021), loads timm / torchvision weights
  vit_cxr                                          ~5M-param ViT with a convolutional stem for chest X-rays
  tv:<name>                                        any torchvision classifier (tv:densenet121, tv:resnet50, ...)

Pretrained weights: load_pretrained(model, path) reads torchvision, timm or nanorad files (.pth/.pt/.safetensors)
or downloads "torchvision:ConvNeXt_Tiny_Weights.IMAGENET1K_V1". 3-channel stems meet 1-channel X-rays by
summing the RGB filters; a head with another number of classes is re-initialized.

Fine-tuning: param_groups (weight decay, layer-wise LR decay, backbone LR multiplier), freeze_backbone /
unfreeze (linear probe), estimate_flops (for MFU).
"""

import functools
import hashlib
import math
import json
import os
import pickle
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from torch.utils.checkpoint import checkpoint

import common

# -----------------------------------------------------------------------------
# shared building blocks: drop path, the pre-LN transformer Block (ViT here; text towers and GPT reuse it)


def drop_path(x, p, training):
    """Stochastic depth (Huang et al. 2016): drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        return drop_path(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class SelfAttention(nn.Module):
    """Multi-head self-attention, fused qkv projection, F.scaled_dot_product_attention (flash / mem-efficient)."""

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True, is_causal=False):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd={n_embd} must be divisible by n_head={n_head}"
        self.n_head, self.dropout, self.is_causal = n_head, dropout, is_causal
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v in that order (timm qkv, torch in_proj)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=self.is_causal and attn_mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x); its weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


ACTS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


def activation(name):
    if name not in ACTS:
        raise ValueError(f"unknown activation {name!r}: choose one of {sorted(ACTS)}")
    return ACTS[name]


class MLP(nn.Module):
    def __init__(self, n_embd, hidden, dropout=0.0, bias=True, act="gelu"):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.act = activation(act)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), x + mlp(ln(x)), each branch with drop path. The one block of the
    image ViTs, the CLIP towers (act="quick_gelu" for OpenAI's weights, is_causal for the text tower) and fusion;
    model_gpt.py keeps its own (KV cache, ALiBi, RoPE)."""

    def __init__(self, n_embd, n_head, mlp_ratio=4.0, dropout=0.0, drop_path=0.0, bias=True, is_causal=False, eps=1e-6,
                 act="gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, dropout, bias, is_causal)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps, bias=bias)
        self.mlp = MLP(n_embd, int(n_embd * mlp_ratio), dropout, bias, act)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path(self.attn(self.ln_1(x), attn_mask))
        x = x + self.drop_path(self.mlp(self.ln_2(x)))
        return x


class Classifier(nn.Module):
    """What every image model shares: the head's names, the input conv, frozen-backbone train()."""
    head_names = ("head",)  # module names of the classifier head (is_head_param, freeze_backbone, head reset)
    first_conv = ""  # parameter name of the input conv (RGB -> gray adaptation when loading)
    frozen_backbone = False

    def train(self, mode=True):
        super().train(mode)
        if self.frozen_backbone:
            # linear probe: the frozen backbone is a fixed feature extractor, so BatchNorm must not update its
            # running stats and dropout / drop path must not add noise; only the head trains
            for name, m in self.named_children():
                _eval_outside_head(self, name, m)
        return self

    def layer_ids(self):
        """Map parameter name -> layer id for layer-wise LR decay, plus num_layers. This default (used by tv:
        models) cuts the backbone's modules, in registration order (= input to output), into 13 equal runs 0..12."""
        names = [n for n, _ in self.named_parameters() if not _under_head(self, n)]
        modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
        num_layers = min(12, len(modules))
        index = {m: i for i, m in enumerate(modules)}
        ids = {n: index[n.rsplit(".", 1)[0]] * (num_layers + 1) // len(modules) for n in names}
        return ids, num_layers


def _under_head(model, name):
    return any(name == h or name.startswith(h + ".") for h in model.head_names)


def _eval_outside_head(model, name, module):
    """Put `module` (called `name` in model) in eval mode, except the parts of it that belong to the head."""
    if _under_head(model, name):
        return
    if not any(h.startswith(name + ".") for h in model.head_names):
        module.train(False)  # holds no part of the head (e.g. 'net.features' of a tv: model)
        return
    for child_name, child in module.named_children():  # holds the head (e.g. 'net' holds 'net.fc'): recurse
        _eval_outside_head(model, f"{name}.{child_name}", child)


def init_weights(module):
    """N(0, 0.02) for Linear / conv: the ConvNeXt / ViT reference code's trunc_normal_(std=.02) truncates at +-2
    (absolute, i.e. 100 std), which never triggers, and trunc_normal_ is 4x slower to sample."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

# -----------------------------------------------------------------------------
# ConvNeXt (Liu et al. 2022). Layout follows the paper: patchify stem, 4 stages of blocks, a LayerNorm + 2x2
# stride-2 conv between stages. The block runs its LayerNorm and MLP channels-last on a (B, H, W, C) view, as the
# reference code does (nn.Linear is the fastest 1x1 conv), and the model keeps activations in channels_last memory
# so that the permutes are free views instead of copies.

CONVNEXT_SIZES = {  # depths, dims: paper Table / timm for the small "atto..nano" variants
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}


@dataclass
class ConvNeXtConfig:
    depths: tuple = (3, 3, 9, 3)
    dims: tuple = (96, 192, 384, 768)
    in_chans: int = 3
    num_classes: int = 1000
    drop_path: float = 0.0  # max stochastic depth rate, linearly increasing over blocks (paper: 0.1 tiny, 0.4 small)
    dropout: float = 0.0  # before the head
    layer_scale_init: float = 1e-6  # paper Sec. 2.6 (from CaiT)
    grad_checkpoint: bool = False


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over C of a (B, C, H, W) tensor (a free permute when the tensor is channels_last)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def _tap_index(H, W, k):
    """For a k x k 'same' conv on an H x W map: index of the kernel tap linking input pixel q to output pixel p,
    as an (H*W, H*W) long tensor [q, p], with k*k where q is out of p's reach."""
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)
    dy, dx = y[:, None] - y[None, :] + k // 2, x[:, None] - x[None, :] + k // 2  # [q, p]: q - p + k // 2
    inside = (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)
    return torch.where(inside, dy * k + dx, k * k)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, drop_path=0.0, layer_scale_init=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.drop_path = drop_path

    def depthwise(self, x):
        """The 7x7 depthwise conv. On a GPU or under torch.compile, the conv as it is. Eager on a CPU, PyTorch's
        depthwise kernels are 2-3x faster forward + backward on channels_last input (whose output the block's permute
        to (B, H, W, C) then gets for free), and on maps of <= 16 pixels (the last stages at small image sizes) the
        conv is done as one (HW x HW) matrix per channel gathered from the kernel taps, 10-20x faster still. Same
        numbers up to float rounding (tests/test_model.py)."""
        conv, (B, C, H, W) = self.dwconv, x.shape
        eager_cpu = x.device.type == "cpu" and not (_counting_flops or torch.compiler.is_compiling())
        if eager_cpu and H * W <= 16:
            taps = _tap_index(H, W, conv.kernel_size[0])  # (HW_in, HW_out) -> kernel tap, k*k = out of reach
            w = F.pad(conv.weight.reshape(C, -1), (0, 1))  # (C, k*k + 1): the last tap is a zero
            xc = x.permute(1, 0, 2, 3).contiguous().view(C, B, H * W)
            y = torch.bmm(xc, w[:, taps])  # (C, B, HW_out)
            if y.requires_grad:  # its gradient comes back strided (the permute below): CPU bmm backward would copy it
                y.register_hook(torch.Tensor.contiguous)  # one matrix at a time, ~10% of a 64 px ConvNeXt-atto step
            return y.view(C, B, H, W).permute(1, 0, 2, 3) + conv.bias.view(1, C, 1, 1)
        if eager_cpu:
            x = x.contiguous(memory_format=torch.channels_last)
        # The weight through a reshape round trip (views, no copy): on channels_last input the weight gradient comes
        # back channels_last, i.e. differing from the (C, 1, k, k) parameter's strides in the size-1 dim only, and DDP,
        # comparing strides literally, warned "Grad strides do not match bucket view strides". Now it matches.
        w = conv.weight.flatten(1).view_as(conv.weight)
        return F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x):  # (B, C, H, W), channels_last memory
        y = self.depthwise(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        h = F.gelu(self.fc1(self.norm(y)))  # (B, H, W, 4C)
        # layer scale: multiply whichever is smaller, the (C, 4C) fc2 weight (early stages: large feature maps) or
        # the (B, H, W, C) output (late stages: 7x7 maps, 768-wide weights). Saves one pass over big activations.
        if h.numel() // 4 > self.fc2.weight.numel():
            y = F.linear(h, self.fc2.weight * self.gamma[:, None], self.fc2.bias * self.gamma)
        else:
            y = self.fc2(h) * self.gamma
        return x + drop_path(y.permute(0, 3, 1, 2), self.drop_path, self.training)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim, dim, depth, drop_paths, layer_scale_init):
        super().__init__()
        self.downsample_norm = LayerNorm2d(in_dim, eps=1e-6) if in_dim is not None else None
        self.downsample = nn.Conv2d(in_dim, dim, kernel_size=2, stride=2) if in_dim is not None else None
        self.blocks = nn.ModuleList([ConvNeXtBlock(dim, drop_paths[i], layer_scale_init) for i in range(depth)])


class ConvNeXt(Classifier):
    first_conv = "stem.weight"

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.stem = nn.Conv2d(c.in_chans, c.dims[0], kernel_size=4, stride=4)  # "patchify": 4x4 non-overlapping
        self.stem_norm = LayerNorm2d(c.dims[0], eps=1e-6)
        rates = torch.linspace(0, c.drop_path, sum(c.depths)).tolist()
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(c.depths, c.dims)):
            start = sum(c.depths[:i])
            in_dim = c.dims[i - 1] if i > 0 else None
            self.stages.append(ConvNeXtStage(in_dim, dim, depth, rates[start:start + depth], c.layer_scale_init))
        self.norm = nn.LayerNorm(c.dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.dims[-1], c.num_classes)
        self.apply(init_weights)

    def forward_features(self, x):
        # channels_last from the stem on: the permutes to (B, H, W, C) are then free views and LayerNorm / Linear read
        # contiguous memory (a 1-channel input is both layouts at once, so the stem output is converted explicitly)
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        x = self.stem_norm(x.contiguous(memory_format=torch.channels_last))
        for stage in self.stages:
            if stage.downsample is not None:
                x = stage.downsample(stage.downsample_norm(x))
            for block in stage.blocks:
                if self.config.grad_checkpoint and self.training:
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return self.norm(x.mean((2, 3)))  # global average pool, then LayerNorm (B, C)

    def forward(self, x):
        return self.head(self.head_drop(self.forward_features(x)))

    def layer_ids(self):
        # the ConvNeXt / BEiT fine-tuning recipe: stem 0, stage 0 -> 1, stage 1 -> 2, stage 2 in groups of 3 blocks,
        # stage 3 one id; a downsample layer shares the id of the stage it opens; final norm + head on top
        depths = self.config.depths
        n_groups = math.ceil(depths[2] / 3)
        stage_first = [1, 2, 3, 3 + n_groups]
        num_layers = 3 + n_groups
        ids = {}
        for name, _ in self.named_parameters():
            if name.startswith("stem"):
                ids[name] = 0
            elif name.startswith("stages."):
                parts = name.split(".")
                s = int(parts[1])
                block = int(parts[3]) if parts[2] == "blocks" else 0
                ids[name] = stage_first[s] + (block // 3 if s == 2 else 0)
            else:
                ids[name] = num_layers + 1
        return ids, num_layers

    @staticmethod
    def convert_state_dict(sd):
        """timm / torchvision ConvNeXt keys -> ours. Returns (state_dict, layout)."""
        if any(k.startswith("features.") for k in sd):
            out = {}
            for k, v in sd.items():
                m = re.match(r"features\.(\d+)\.(.*)", k)
                if m:
                    i, rest = int(m.group(1)), m.group(2)
                    if i == 0:
                        k = {"0": "stem", "1": "stem_norm"}[rest.split(".")[0]] + rest[1:]
                    elif i % 2 == 0:  # features.2/4/6 = downsample layers (LayerNorm2d, conv)
                        k = f"stages.{i // 2}." + {"0": "downsample_norm", "1": "downsample"}[rest.split(".")[0]] + rest[1:]
                    else:  # features.1/3/5/7 = stages of CNBlocks: block.0 dwconv, .2 norm, .3 fc1, .5 fc2
                        j, rest = rest.split(".", 1)
                        rest = {"layer_scale": "gamma"}.get(rest, rest)
                        for a, b in (("block.0.", "dwconv."), ("block.2.", "norm."), ("block.3.", "fc1."), ("block.5.", "fc2.")):
                            rest = rest.replace(a, b)
                        k = f"stages.{i // 2}.blocks.{j}.{rest}"
                k = k.replace("classifier.0.", "norm.").replace("classifier.2.", "head.")
                out[k] = v
            return out, "torchvision"
        if "stem.0.weight" in sd:
            rules = [(r"^stem\.0\.", "stem."), (r"^stem\.1\.", "stem_norm."),
                     (r"^stages\.(\d+)\.downsample\.0\.", r"stages.\1.downsample_norm."),
                     (r"^stages\.(\d+)\.downsample\.1\.", r"stages.\1.downsample."),
                     (r"\.conv_dw\.", ".dwconv."), (r"\.mlp\.fc1\.", ".fc1."), (r"\.mlp\.fc2\.", ".fc2."),
                     (r"^head\.norm\.", "norm."), (r"^head\.fc\.", "head.")]
            return {_rename(k, rules): v for k, v in sd.items()}, "timm"
        return sd, "nanorad"


def _rename(key, rules):
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key

# -----------------------------------------------------------------------------
# ViT (Dosovitskiy et al. 2021): patch embedding (or a conv stem), [CLS] token, learned position embeddings,
# pre-LN Blocks, LayerNorm -> Linear on the [CLS] token.
#
# vit_cxr: a convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better") sized for
# chest X-rays: three 3x3 conv-BN-ReLU at full resolution (narrow: 8/16/16 channels, they see fine texture such as
# nodules and lines), two 3x3 stride-2 conv-BN-ReLU (-> 1/4 resolution, 64/128 channels), then the feature map is cut
# into 4x4 patches, each projected linearly to n_embd (a 4x4 stride-4 conv). The effective patch is 16 px, so
# 224 px -> 14x14 = 196 tokens, the token count of ViT/16: attention cost stays that of a standard ViT, while 28x28
# (8 px patches) would cost 4x the tokens and ~16x the attention. The stem costs ~0.6 GFLOPs at 224 px.

# vit_cxr's shape is a choice, not the seed's: the seed describes tokens at H/4 x W/4 from the stem (3,136 at
# 224 px, ~16x the attention cost of 196); train.py's n_layer / n_head / n_embd / mlp_ratio / patch_size knobs set any
# of it (patch_size=4 is the seed's token grid).
VIT_SHAPE_KNOBS = ("n_layer", "n_head", "n_embd", "mlp_ratio", "patch_size")
VIT_SIZES = {  # n_layer, n_head, n_embd (timm / torchvision ViT-Ti/S/B)
    "tiny": (12, 3, 192),
    "small": (12, 6, 384),
    "base": (12, 12, 768),
}


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16  # effective patch (stem downsampling included)
    in_chans: int = 3
    num_classes: int = 1000
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # after position embedding, attention weights, residual projections and before the head
    drop_path: float = 0.0  # max stochastic depth rate, linearly increasing over blocks
    stem_chans: tuple = ()  # () = plain patch embedding; 5 widths = conv stem (3 stride-1, 2 stride-2 conv-BN-ReLU)
    grad_checkpoint: bool = False


class ConvBNReLU(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)  # BN brings the bias
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ViT(Classifier):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"ViT: image_size={c.image_size} must be a multiple of the patch size {c.patch_size}")
        if c.stem_chans:
            assert len(c.stem_chans) == 5 and c.patch_size % 4 == 0, "conv stem: 5 widths and a patch size multiple of 4"
            strides = (1, 1, 1, 2, 2)
            chans = (c.in_chans,) + tuple(c.stem_chans)
            self.stem = nn.Sequential(*[ConvBNReLU(chans[i], chans[i + 1], strides[i]) for i in range(5)])
            self.patch_embed = nn.Conv2d(chans[-1], c.n_embd, kernel_size=c.patch_size // 4, stride=c.patch_size // 4)
            self.first_conv = "stem.0.conv.weight"
        else:
            self.stem = None
            self.patch_embed = nn.Conv2d(c.in_chans, c.n_embd, kernel_size=c.patch_size, stride=c.patch_size)
            self.first_conv = "patch_embed.weight"
        self.grid = c.image_size // c.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.n_embd))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, c.n_embd))
        self.pos_drop = nn.Dropout(c.dropout)
        rates = torch.linspace(0, c.drop_path, c.n_layer).tolist()
        self.blocks = nn.ModuleList([Block(c.n_embd, c.n_head, c.mlp_ratio, c.dropout, rates[i]) for i in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.n_embd, eps=1e-6)
        self.head_drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.n_embd, c.num_classes)
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, x):
        if self.stem is not None:
            x = self.stem(x)
        x = self.patch_embed(x)  # (B, C, h, w)
        h, w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # (B, T, C) tokens in raster order
        pos = self.pos_embed
        if h != self.grid or w != self.grid:  # another input size than built for: resample (shapes are static)
            pos = resample_pos_embed(pos, (h, w))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.config.grad_checkpoint and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_f(x)[:, 0]  # the [CLS] token (B, C)

    def forward(self, x):
        return self.head(self.head_drop(self.forward_features(x)))

    def layer_ids(self):
        # BEiT recipe: embeddings (stem, patch, cls, pos) 0, block i -> i + 1, final norm + head n_layer + 1
        n = self.config.n_layer
        ids = {}
        for name, _ in self.named_parameters():
            if name.startswith("blocks."):
                ids[name] = int(name.split(".")[1]) + 1
            elif name.startswith(("ln_f", "head")):
                ids[name] = n + 1
            else:
                ids[name] = 0
        return ids, n

    @staticmethod
    def convert_state_dict(sd):
        """timm / torchvision ViT keys -> ours. Returns (state_dict, layout)."""
        if "conv_proj.weight" in sd or "encoder.pos_embedding" in sd:
            rules = [(r"^class_token$", "cls_token"), (r"^conv_proj\.", "patch_embed."),
                     (r"^encoder\.pos_embedding$", "pos_embed"), (r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."),
                     (r"\.self_attention\.in_proj_weight$", ".attn.c_attn.weight"),
                     (r"\.self_attention\.in_proj_bias$", ".attn.c_attn.bias"),
                     (r"\.self_attention\.out_proj\.", ".attn.c_proj."),
                     (r"\.mlp\.0\.", ".mlp.c_fc."), (r"\.mlp\.3\.", ".mlp.c_proj."),
                     (r"^encoder\.ln\.", "ln_f."), (r"^heads\.head\.", "head.")]
            return {_rename(k, rules): v for k, v in sd.items()}, "torchvision"
        if "patch_embed.proj.weight" in sd:
            rules = [(r"^patch_embed\.proj\.", "patch_embed."), (r"\.norm1\.", ".ln_1."), (r"\.norm2\.", ".ln_2."),
                     (r"\.attn\.qkv\.", ".attn.c_attn."), (r"\.attn\.proj\.", ".attn.c_proj."),
                     (r"\.mlp\.fc1\.", ".mlp.c_fc."), (r"\.mlp\.fc2\.", ".mlp.c_proj."), (r"^norm\.", "ln_f.")]
            return {_rename(k, rules): v for k, v in sd.items()}, "timm"
        return sd, "nanorad"


def resample_pos_embed(pos, new_grid, num_prefix=1):
    """Bicubic resampling of a square grid of position embeddings (1, prefix + g*g, C) to new_grid=(h, w),
    with timm's settings (align_corners=False, antialias) so timm-resampled checkpoints agree with ours."""
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    g = math.isqrt(grid.shape[1])
    assert g * g == grid.shape[1], f"position embedding of {grid.shape[1]} tokens is not a square grid"
    grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)

# -----------------------------------------------------------------------------
# any torchvision classifier: built with weights=None, head sized to num_classes, the input conv swapped for in_chans


class TorchvisionClassifier(Classifier):
    def __init__(self, name, num_classes, in_chans=3, image_size=224, grad_checkpoint=False):
        super().__init__()
        import torchvision
        kwargs = {"num_classes": num_classes}
        if name.startswith("vit_"):
            kwargs["image_size"] = image_size  # torchvision's ViT asserts the input size it was built for
        if name in ("inception_v3", "googlenet"):
            kwargs.update(aux_logits=False, init_weights=True)  # the aux heads only matter for their ImageNet recipe
        if grad_checkpoint:
            if not name.startswith("densenet"):
                raise ValueError(f"grad_checkpoint is available for our models and tv:densenet*, not tv:{name}; "
                                 f"pass --grad_checkpoint=False")
            kwargs["memory_efficient"] = True  # torchvision's own checkpointing of the dense layers
        self.net = torchvision.models.get_model(name, weights=None, **kwargs)
        # the head: the last Linear / conv that outputs num_classes (fc, classifier, classifier.1, heads.head, ...)
        heads = [n for n, m in self.net.named_modules()
                 if (isinstance(m, nn.Linear) and m.out_features == num_classes)
                 or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]
        assert heads, f"tv:{name}: found no layer with {num_classes} outputs to call the head"
        self.head_names = ("net." + heads[-1],)
        # the input conv: the first conv that reads 3 channels
        conv_name = next(n for n, m in self.net.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3)
        self.first_conv = f"net.{conv_name}.weight"
        if in_chans != 3:
            parent_name, _, attr = conv_name.rpartition(".")
            parent = self.net.get_submodule(parent_name)  # '' -> self.net itself
            old = getattr(parent, attr)
            new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                            old.groups, old.bias is not None, old.padding_mode)
            with torch.no_grad():  # keep torchvision's init, adapted the way pretrained stems are
                new.weight.copy_(adapt_input_conv(old.weight, in_chans))
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            setattr(parent, attr, new)

    def forward(self, x):
        return self.net(x)

    @staticmethod
    def convert_state_dict(sd):
        if all(k.startswith("net.") for k in sd):
            return sd, "nanorad"
        return {"net." + k: v for k, v in sd.items()}, "torchvision"  # timm resnets share torchvision's names


def set_stochastic_depth(net, drop_path, model):
    """drop_path for a torchvision model: its StochasticDepth layers (ConvNeXt, Swin, EfficientNet, MaxViT, ...) get
    rates rising linearly over depth from 0 to drop_path, as our models' (0 turns off torchvision's own default rate);
    a model without them refuses drop_path > 0 rather than ignoring it."""
    from torchvision.ops import StochasticDepth
    layers = [m for m in net.modules() if isinstance(m, StochasticDepth)]
    if not layers and drop_path > 0:
        raise ValueError(f"{model} has no stochastic depth layers for drop_path={drop_path}: use --drop_path=0 (or a "
                         f"model that has them: tv:convnext_*, tv:swin_*, tv:efficientnet_*, our convnext_* / vit_*)")
    for m, p in zip(layers, torch.linspace(0, drop_path, len(layers)).tolist()):
        m.p = p


def adapt_input_conv(w, in_chans):
    """(O, 3, kh, kw) RGB filters -> (O, in_chans, kh, kw). Gray: sum the RGB filters, so a gray image gives the
    same activations as the RGB model fed the gray image in all three channels (what timm does)."""
    if in_chans == w.shape[1]:
        return w
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)

# -----------------------------------------------------------------------------
# build_model: name -> network; every model carries .model_args so a checkpoint can rebuild it


def build_model(model, num_classes, in_chans=1, image_size=224, drop_path=0.0, dropout=0.0, grad_checkpoint=False,
                **vit_shape):
    """vit_shape (ViTs only): n_layer, n_head, n_embd, mlp_ratio, patch_size; 0 or absent = the named size's own.
    Only the ones set go into model_args: the default models' model_args (and their checkpoints) stay as they were."""
    unknown = set(vit_shape) - set(VIT_SHAPE_KNOBS)
    assert not unknown, f"build_model: unknown arguments {sorted(unknown)}"
    vit_shape = {k: v for k, v in vit_shape.items() if v}
    model_args = dict(model=model, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                      drop_path=drop_path, dropout=dropout, grad_checkpoint=grad_checkpoint, **vit_shape)
    family, _, size = model.partition("_")
    if vit_shape and not (family == "vit" and (size in VIT_SIZES or size == "cxr")):
        raise ValueError(f"{', '.join(f'{k}={v}' for k, v in vit_shape.items())} shape a ViT (vit_*, vit_cxr), not "
                         f"{model!r}: leave them at 0")
    if family == "convnext" and size in CONVNEXT_SIZES:
        depths, dims = CONVNEXT_SIZES[size]
        net = ConvNeXt(ConvNeXtConfig(depths, dims, in_chans, num_classes, drop_path, dropout, grad_checkpoint=grad_checkpoint))
    elif family == "vit" and (size in VIT_SIZES or size == "cxr"):
        if size == "cxr":  # ~5M params: ViT-Ti width, 10 blocks, conv stem (see the ViT section)
            arch = dict(n_layer=10, n_head=3, n_embd=192, stem_chans=(8, 16, 16, 64, 128))
        else:
            n_layer, n_head, n_embd = VIT_SIZES[size]
            arch = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        arch.update(vit_shape)
        if arch["n_embd"] % arch["n_head"]:
            raise ValueError(f"{model}: n_embd={arch['n_embd']} must be a multiple of n_head={arch['n_head']}")
        if "stem_chans" in arch and arch.get("patch_size", 16) % 4:
            raise ValueError(f"vit_cxr: patch_size={arch['patch_size']} must be a multiple of 4 (the conv stem "
                             f"downsamples 4x; 4 = one token per stem pixel, H/4 x W/4 tokens)")
        net = ViT(ViTConfig(image_size=image_size, in_chans=in_chans, num_classes=num_classes, dropout=dropout,
                            drop_path=drop_path, grad_checkpoint=grad_checkpoint, **arch))
    elif model.startswith("tv:"):
        import torchvision
        name = model[3:]
        valid = torchvision.models.list_models(module=torchvision.models)
        if name not in valid:
            raise ValueError(f"unknown torchvision classifier {model!r}; valid: " + ", ".join("tv:" + v for v in valid))
        if dropout:
            print(f"build_model: {model} keeps torchvision's own dropout; dropout={dropout} is ignored")
        net = TorchvisionClassifier(name, num_classes, in_chans, image_size, grad_checkpoint)
        set_stochastic_depth(net, drop_path, model)
    else:
        valid = [f"convnext_{s}" for s in CONVNEXT_SIZES] + [f"vit_{s}" for s in VIT_SIZES] + ["vit_cxr", "tv:<name>"]
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(valid)} (tv:densenet121, tv:resnet50, ...)")
    net.model_args = model_args
    return net

# -----------------------------------------------------------------------------
# pretrained weights: torchvision / timm / nanorad files, or a torchvision weights name to download

MIN_BACKBONE_LOADED = 0.9  # load_pretrained refuses a file that fills less of the backbone (issue 13: 0/128 trained on)


def read_hf_config(folder, model_type, fix):
    """config.json of a Hugging Face model folder as a dict (model_bert.py and model_gpt.py read theirs with it); a
    missing file is one sentence ending in `fix`, another model_type is refused."""
    f = os.path.join(folder, "config.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f} not found: {fix}")
    with open(f) as fh:
        cfg = json.load(fh)
    if cfg.get("model_type", model_type) != model_type:
        raise ValueError(f"{f}: model_type is {cfg['model_type']!r}, only {model_type!r} is read here")
    return cfg


def read_weights(path):
    """The one weights reader of nanorad (model_clip.py and model_gpt.py use it too): a .safetensors file through the
    safetensors package, anything else through torch.load(weights_only=True), so no code in a file ever runs. A
    checkpoint {'model' | 'state_dict' | 'model_state_dict': ...} gives its state dict; DDP / torch.compile prefixes
    (module., _orig_mod.) are dropped. Returns {name: tensor}."""
    return _state_dict_of(_load_file(path), path)


def _load_file(path):
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    common.check_torch_file(path, run_file=False)  # text, a zip cut short: a sentence naming the file, not torch's
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as e:
        raise common.damaged_file_error(path, e, run_file=False) from e
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds Python objects other than tensors and plain types, and nanorad runs no code "
                         f"from a weights file (torch.load weights_only=True refused it: "
                         f"{str(e).strip().splitlines()[0][:150]}); use a plain state dict (.pth / .safetensors) from a "
                         f"source you trust") from e


def _state_dict_of(obj, path):
    for key in ("model", "state_dict", "model_state_dict"):  # nanorad checkpoints {'model': ...}, lightning-style files
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict {{name: tensor}}; pass a file saved with "
                         f"torch.save(model.state_dict(), ...) or a nanorad checkpoint")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items()}


def _torchvision_file(weights_name):
    """The cached file of a torchvision weights enum (downloaded when absent), after checking that its sha256 starts
    with the hex digits torchvision puts in the file name (convnext_tiny-983f1562.pth): a file placed in the cache by
    hand is checked before anything reads it. torch.hub's own loader skips that check for cached files and unpickles
    them with weights_only=False (issue 13)."""
    import torchvision
    try:
        weights = torchvision.models.get_weight(weights_name)
    except (KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"unknown torchvision weights {weights_name!r} ({e}); names look like "
                         f"torchvision:ConvNeXt_Tiny_Weights.IMAGENET1K_V1 or torchvision:ResNet50_Weights.IMAGENET1K_V2") from e
    file = weights.url.rsplit("/", 1)[-1]
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", file)
    m = re.search(r"-([a-f0-9]{6,})\.", file)
    prefix = m.group(1) if m else None
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, cached, hash_prefix=prefix, progress=False)
        except OSError as e:  # URLError, socket timeouts, DNS failures are all OSErrors
            raise RuntimeError(
                f"could not download {weights_name} from {weights.url} ({type(e).__name__}: {e}). Offline? Download the "
                f"file on a machine with internet, copy it here and pass its path instead (pretrained_path=/path/to/{file}), "
                f"or put it in {os.path.dirname(cached)}/ where torchvision looks first.") from e
    if prefix is not None:
        h = hashlib.sha256()
        with open(cached, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if not h.hexdigest().startswith(prefix):
            raise ValueError(f"{cached} is not torchvision's {weights_name}: its sha256 starts {h.hexdigest()[:len(prefix)]}, "
                             f"the file name promises {prefix}, so it is another file, a broken download or a tampered "
                             f"one, and it was not read; delete it to download it again, or copy the file from "
                             f"{weights.url} there")
    return cached


def _read_state_dict(path):
    """(state dict, model_args or None): the model_args of a nanorad checkpoint say which script wrote it."""
    if path.startswith("torchvision:"):
        return read_weights(_torchvision_file(path.split(":", 1)[1])), None
    obj = _load_file(path)
    args = obj.get("model_args") if isinstance(obj, dict) and isinstance(obj.get("model_args"), dict) else None
    return _state_dict_of(obj, path), args


def _check_checkpoint_kind(path, args, name):
    """A checkpoint of another nanorad script or model gets a sentence saying what it is and what reads it."""
    if args is None:
        return
    if "image_model" in args or "embed_dim" in args:
        raise ValueError(f"{path} is a train_clip.py checkpoint (a CLIP model, image tower {args.get('image_model')!r}), "
                         f"not weights of an image classifier {name}: train_clip.py reads it (--init_from=resume, "
                         f"--teacher_ckpt), and train.py with --modalities reads its image tower as the vision encoder; "
                         f"pretrained_path / image_init take a train.py checkpoint or torchvision / timm weights")
    if "vocab_size" in args and "n_layer" in args:
        raise ValueError(f"{path} is a train_gpt.py checkpoint (a report GPT, {args['n_layer']} layers), not weights of "
                         f"an image classifier {name}: train_gpt.py reads it (--init_from=pretrained --pretrained_path={path}) "
                         f"and sample.py generates from it (--ckpt_path={path}); pretrained_path / image_init take a "
                         f"train.py checkpoint or torchvision / timm weights")
    if args.get("model") == "fusion":
        raise ValueError(f"{path} is a fusion checkpoint (train.py --modalities={args.get('modalities')!r}), not weights "
                         f"of an image classifier {name}: resume it with the same --modalities, or start a fusion run's "
                         f"vision encoder from it (train.py --modalities=... --init_from=pretrained --pretrained_path={path})")
    if "model" in args and args["model"] != name:
        raise ValueError(f"{path} holds a {args['model']} model but model={name!r}: use --model={args['model']} or "
                         f"another checkpoint")


def load_image_init(net, path):
    """load_pretrained for a tower/encoder started from an image model's weights (train_clip.py and train_gpt.py
    image_init): a missing file gets the fix in its message (train the image model first)."""
    require_weights(path, "image_init", "--image_init='' to start it from scratch")
    return load_pretrained(net, path)


def require_weights(path, knob, otherwise):
    """Raise FileNotFoundError naming the knob, the recipe that writes `path` and the other way (`otherwise`) when a
    weights file to start from does not exist; 'torchvision:<Weights.NAME>' is always there."""
    if not path.startswith("torchvision:") and not os.path.exists(path):
        recipe = _recipe_writing(path)
        how = f"{recipe} writes it" if recipe else "python train.py --out_dir=<run> writes <run>/best.pt"
        raise FileNotFoundError(f"{knob}={path!r} does not exist: train the image model first ({how}) or pass {otherwise}")


def _recipe_writing(path):
    """The command that writes checkpoint `path`: the config/ recipe whose out_dir is its folder, or None."""
    run, folder = os.path.dirname(os.path.normpath(path)), os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
    for cfg in sorted(os.listdir(folder)):
        with open(os.path.join(folder, cfg)) as f:
            if re.search(rf"^out_dir\s*=\s*[\"']{re.escape(run)}/?[\"']", f.read(), re.M):
                return f"python train.py config/{cfg}"
    return None


def load_pretrained(model, path):
    """Load weights from `path` (file or 'torchvision:<Weights.NAME>') into model, in place. Converts torchvision /
    timm key layouts, sums RGB stem filters for in_chans=1, resamples ViT position embeddings, and re-initializes
    a head whose number of classes differs. A file that fills less than MIN_BACKBONE_LOADED of the backbone, or a
    checkpoint of another script, is refused. Returns {'layout', 'missing', 'unexpected', 'reset', 'adapted'}."""
    raw = unwrap(model)
    name = raw.model_args["model"]
    sd, args = _read_state_dict(path)
    _check_checkpoint_kind(path, args, name)
    sd, layout = raw.convert_state_dict(sd)
    own = raw.state_dict()
    load, reset, adapted, mismatched = {}, [], [], []
    for k, v in sd.items():
        if k not in own:
            continue
        want = own[k].shape
        if v.shape == want:
            load[k] = v
        elif _under_head(raw, k.rsplit(".", 1)[0]):
            reset.append(k)  # another number of classes: keep a fresh head
        elif k == raw.first_conv and v.ndim == 4 and v.shape[0] == want[0] and v.shape[2:] == want[2:]:
            load[k] = adapt_input_conv(v, want[1])
            adapted.append(f"{k} {v.shape[1]}->{want[1]} channels")
        elif k == "pos_embed" and v.shape[-1] == want[-1]:
            load[k] = resample_pos_embed(v, (raw.grid, raw.grid))
            adapted.append(f"pos_embed {v.shape[1] - 1}->{want[1] - 1} tokens")
        elif v.numel() == want.numel() and [d for d in v.shape if d != 1] == [d for d in want if d != 1]:
            load[k] = v.reshape(want)  # 1x1 conv <-> Linear (timm conv_mlp), (C,1,1) <-> (C,) layer scale
        else:
            mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(want)}")
    if mismatched:
        raise ValueError(f"{path} ({layout} layout) does not fit {name}: " + "; ".join(mismatched[:5])
                         + (f" and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""))
    missing = [k for k in own if k not in load and k not in reset]
    unexpected = [k for k in sd if k not in own]
    backbone = [k for k in own if not _under_head(raw, k.rsplit(".", 1)[0])]
    n_loaded = sum(k in load for k in backbone)
    if n_loaded < MIN_BACKBONE_LOADED * len(backbone):
        expected = [k for k in backbone if k not in load]
        raise ValueError(
            f"{path}{f' ({layout} layout)' if n_loaded else ''} does not fit {name}: only {n_loaded}/{len(backbone)} of its backbone tensors (head "
            f"excluded) are in the file, so the run would train from scratch while calling itself pretrained; {name} "
            f"expects {expected[:3]}, the file has {unexpected[:3] or list(sd)[:3]}; pass weights of the same architecture "
            f"(a train.py checkpoint of {name}, or its torchvision / timm file) or --init_from=scratch")
    raw.load_state_dict(load, strict=False)
    for head in raw.head_names:  # fresh head (also when the model was trained before: reset means reset)
        if any(k.startswith(head + ".") for k in reset):
            raw.get_submodule(head).apply(init_weights)
    report = dict(layout=layout, missing=missing, unexpected=unexpected, reset=reset, adapted=adapted)
    print(f"load_pretrained: {path} ({layout} layout) -> {name}: loaded {len(load)}/{len(own)} tensors"
          f" | head reset: {reset or 'no'} | adapted: {adapted or 'none'} | missing {len(missing)}{missing[:3] if missing else ''}"
          f" | unexpected {len(unexpected)}{unexpected[:3] if unexpected else ''}")
    return report

# -----------------------------------------------------------------------------
# size, FLOPs, optimizer groups, freezing


def unwrap(model):
    """The raw model under DDP (.module) and torch.compile (._orig_mod)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def get_num_params(model, non_embedding=False):
    """Parameter count; non_embedding=True leaves out position embeddings (as nanoGPT does)."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= sum(p.numel() for name, p in model.named_parameters() if name.endswith(("pos_embed", "pos_embedding", "wpe.weight")))
    return n


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs):
    B, nh, T, hs = q
    S = k[2]
    return 2 * B * nh * T * S * hs * 2  # q @ k^T and att @ v, 2 FLOPs per multiply-add


_counting_flops = False  # True inside count_flops: the CPU fast paths step aside so the plain ops are counted


def count_flops(net, fn):
    """Forward FLOPs of fn() (2 per multiply-add), counted by torch.utils.flop_counter in eval mode without grad.
    The model's FLOPs as its layers define them: CPU-only fast paths (ConvNeXtBlock.depthwise's tap matrices) are
    off while counting, so ours and timm's counts agree and MFU means the same on every device."""
    global _counting_flops
    from torch.utils.flop_counter import FlopCounterMode
    # the CPU flash-attention kernel has no formula in flop_counter (the CUDA ones do): count it like them
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    raw = unwrap(net)
    was_training = raw.training
    raw.eval()
    _counting_flops = True
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=extra) as counter:
            fn()
    finally:
        _counting_flops = False
        raw.train(was_training)
    return counter.get_total_flops()


def estimate_flops(model, image_size, in_chans):
    """Forward FLOPs for one image (2 per multiply-add); a train step ~= 3x."""
    raw = unwrap(model)
    p = next(raw.parameters())
    x = torch.zeros(1, in_chans, image_size, image_size, device=p.device, dtype=p.dtype)
    return count_flops(raw, lambda: raw(x))


NO_DECAY = ("pos_embed", "cls_token", "class_token", "pos_embedding", "gamma", "layer_scale",
            "relative_position_bias_table", "absolute_pos_embed")


def is_head_param(model, name):
    name = re.sub(r"^(module\.|_orig_mod\.)+", "", name)
    return _under_head(unwrap(model), name)


def param_groups(model, weight_decay, layer_decay=1.0, lr_backbone_mult=1.0):
    """AdamW groups: weight decay only on >=2-D weights (not norms, biases, position embeddings, tokens, layer
    scale); lr_scale = layer_decay ** (num_layers + 1 - layer_id) (BEiT / ConvNeXt fine-tuning), times lr_backbone_mult
    outside the head. Each trainable parameter lands in exactly one group; frozen ones in none."""
    raw = unwrap(model)
    ids, num_layers = raw.layer_ids()
    groups = {}
    for name, p in raw.named_parameters():
        if not p.requires_grad:
            continue
        head = _under_head(raw, name)
        decay = p.ndim >= 2 and not any(key in name for key in NO_DECAY)
        layer = num_layers + 1 if head else (ids[name] if layer_decay != 1.0 else num_layers + 1)
        scale = layer_decay ** (num_layers + 1 - layer) * (1.0 if head else lr_backbone_mult)
        key = ("head" if head else f"layer{layer}" if layer_decay != 1.0 else "backbone") + ("_decay" if decay else "_no_decay")
        g = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale, "name": key})
        g["params"].append(p)
    return list(groups.values())


def freeze_backbone(model):
    """Linear probe: only the head trains; the backbone gets requires_grad=False and stays in eval mode (BatchNorm
    running stats, dropout, drop path frozen) even across model.train() calls, until unfreeze()."""
    raw = unwrap(model)
    for name, p in raw.named_parameters():
        p.requires_grad_(_under_head(raw, name))
    raw.frozen_backbone = True
    raw.train(raw.training)


def unfreeze(model):
    raw = unwrap(model)
    for p in raw.parameters():
        p.requires_grad_(True)
    raw.frozen_backbone = False
    raw.train(raw.training)
