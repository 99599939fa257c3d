"""
GPT for radiology captions and reports, split out of model.py (which holds the image classifiers).

nanoGPT lineage, written for nanorad: pre-LN blocks, fused QKV projection, attention through
F.scaled_dot_product_attention, tied input/output embeddings, GPT-2's scaled residual init.
Additions: position scheme knob (learned | alibi | rope), gradient checkpointing, a KV cache for
generation, Hugging Face GPT-2 checkpoints from a local directory, and an image prefix
(cond='image': n_prefix visual tokens from an image encoder, ClipCap-style) for report generation.

Attention kernels (torch.nn.functional.scaled_dot_product_attention):
- learned / rope: is_causal=True with no mask -> the flash kernel on a CUDA GPU (bf16/fp16).
- alibi: the bias is an additive float attn_mask (1, n_head, Tq, Tk). The flash kernel takes no
  mask, so SDPA falls back to the memory-efficient kernel (still fused: no T x T softmax in HBM,
  it reads the mask) when the mask has the query's dtype, else to the math kernel. We build the
  mask once per (Tq, Tk) and cast it to q's dtype so the memory-efficient kernel stays eligible.
  bench.py measures flash vs memory-efficient on a GPU. The mask costs n_head*T*T elements.
- generation with a KV cache: one query against the whole cache needs no causal mask.
"""

import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import model as model_lib

# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    block_size: int = 256  # max sequence length incl. the image prefix (learned positions); alibi/rope extrapolate
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for the matmuls
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0  # 0.0 for pretraining, 0.1+ for finetuning small data
    bias: bool = True  # biases in Linear and LayerNorm (GPT-2: True)
    pos: str = "learned"  # learned | alibi | rope
    grad_checkpoint: bool = False  # recompute each block in backward: ~30% slower, activations O(n_layer) smaller
    n_prefix: int = 0  # image-conditioned: visual tokens before the text (0 = text only)
    image_encoder: str = "conv"  # conv (PrefixConvEncoder below) or a model.build_model name, e.g. convnext_atto
    image_size: int = 64  # input images are (B, in_chans, image_size, image_size) floats, already normalized
    in_chans: int = 1
    prefix_width: int = 128  # channels of the conv encoder / features per prefix token from a backbone
    n_classes: int = 0  # image-conditioned: a multi-label finding head on the pooled visual tokens whose probabilities
    #                     are n_classes more prefix tokens (0 = none); block_size must hold n_prefix + n_classes + text
    aux_cls_weight: float = 0.0  # weight of that head's BCE loss added to the LM loss when labels are given
    finding_tags: str = "soft"  # soft: a finding token mixes absent/present by the probability p | hard: present
    #                             iff p >= the class's threshold (prefix.thresholds, e.g. chosen for F1 on validation)
    layer_norm_eps: float = 1e-5
    rope_base: float = 10000.0


POS_SCHEMES = ("learned", "alibi", "rope")

# -----------------------------------------------------------------------------
# position schemes: ALiBi slopes/bias and rotary embeddings


def alibi_slopes(n_head):
    """Press et al. 2022: geometric slopes 2^(-8/n), ...; non-powers of two interleave the next power's slopes."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n_head).is_integer():
        return power_of_2(n_head)
    closest = 2 ** math.floor(math.log2(n_head))
    return power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_head - closest]


def alibi_bias(slopes, Tq, Tk, device):
    """(1, nh, Tq, Tk) additive bias: -slope * distance, -inf above the diagonal. Queries are the last Tq positions."""
    q_pos = torch.arange(Tk - Tq, Tk, device=device).view(Tq, 1)
    k_pos = torch.arange(Tk, device=device).view(1, Tk)
    dist = (q_pos - k_pos).float()
    bias = -slopes.view(-1, 1, 1) * dist  # (nh, Tq, Tk)
    bias = bias.masked_fill(dist < 0, float("-inf"))
    return bias.unsqueeze(0)


def rope_cos_sin(positions, head_dim, base, device):
    """cos, sin of shape (T, head_dim/2) for the rotary embedding (Su et al. 2021), NeoX half-split layout."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = positions.float().view(-1, 1) * inv_freq.view(1, -1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, nh, T, hs); rotate the pairs (x[:half], x[half:]) by the position angle."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


# -----------------------------------------------------------------------------
# transformer blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}"
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, ctx, kv=None):
        """ctx: dict(rope=(cos, sin) | None, mask=tensor | None, is_causal=bool). kv: cached (k, v) or None.
        Returns y and the (k, v) to cache."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if ctx["rope"] is not None:
            cos, sin = ctx["rope"]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        mask = ctx["mask"]
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)  # memory-efficient kernel needs the mask in the query's dtype
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=ctx["is_causal"],
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"; needed for identical logits with HF weights
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, ctx, kv=None):
        a, kv = self.attn(self.ln_1(x), ctx, kv)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


# -----------------------------------------------------------------------------
# image prefix: encoder -> mapping network -> n_prefix tokens of width n_embd


class PrefixConvEncoder(nn.Module):
    """Small conv net: 4 stride-2 stages (GroupNorm, so batch size and DDP do not change the output), then an
    adaptive pool to a g x g grid, one token per cell (g*g = n_prefix) so laterality survives into the text."""

    def __init__(self, in_chans, width, n_prefix):
        super().__init__()
        g = math.isqrt(n_prefix)
        assert g * g == n_prefix, f"image_encoder='conv' needs a square n_prefix (4, 9, 16, ...), got {n_prefix}"
        chans = [in_chans, width // 4, width // 2, width, width]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8 if cout % 8 == 0 else 1, cout), nn.GELU()]
        self.net = nn.Sequential(*layers)
        self.grid = g

    def forward(self, x):
        f = F.adaptive_avg_pool2d(self.net(x), self.grid)  # (B, width, g, g)
        return f.flatten(2).transpose(1, 2), None  # (B, n_prefix, width); no finding logits of its own


class BackbonePrefixEncoder(nn.Module):
    """Any model.build_model classifier with num_classes = n_prefix * width (+ n_classes), its outputs reshaped into
    tokens (and the last n_classes read as finding logits: the backbone's own classifier, which load_class_head can
    start from an image model trained on the same findings)."""

    def __init__(self, name, in_chans, image_size, width, n_prefix, n_classes=0):
        super().__init__()
        self.net = model_lib.build_model(name, num_classes=n_prefix * width + n_classes, in_chans=in_chans,
                                         image_size=image_size)
        self.n_prefix, self.width, self.n_classes = n_prefix, width, n_classes

    def forward(self, x):
        out = self.net(x)
        tokens = out[:, :self.n_prefix * self.width].reshape(x.size(0), self.n_prefix, self.width)
        return tokens, (out[:, self.n_prefix * self.width:] if self.n_classes else None)

    @torch.no_grad()
    def load_class_head(self, path, classes):
        """Copy the classifier head of a train.py checkpoint over the same classes (same order) into the finding rows
        of this head, so the report model starts with the image model's findings, not a fresh head. Returns the
        names of the tensors copied ([] when the file is not such a checkpoint or its classes differ)."""
        if not os.path.isfile(path):
            return []
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or list((ck.get("meta") or {}).get("classes") or []) != list(classes):
            return []
        sd, _ = self.net.convert_state_dict(ck["model"])
        copied, nc = [], self.n_classes
        for name, p in self.net.named_parameters():
            v = sd.get(name)
            if model_lib.is_head_param(self.net, name) and v is not None and v.shape[0] == nc and v.shape[1:] == p.shape[1:]:
                p[-nc:].copy_(v)
                copied.append(name)
        return copied


class ImagePrefix(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.image_encoder == "conv":
            self.encoder = PrefixConvEncoder(config.in_chans, config.prefix_width, config.n_prefix)
        else:
            self.encoder = BackbonePrefixEncoder(config.image_encoder, config.in_chans, config.image_size,
                                                 config.prefix_width, config.n_prefix, config.n_classes)
        # mapping network (ClipCap, Mokady et al. 2021): features -> the language model's embedding space
        self.mapping = nn.Sequential(nn.Linear(config.prefix_width, config.n_embd), nn.GELU(),
                                     nn.Linear(config.n_embd, config.n_embd))
        self.prefix_pos = nn.Parameter(torch.zeros(1, config.n_prefix, config.n_embd))
        # auxiliary finding head (Liu et al. 2019, "Clinically accurate chest X-ray report generation"; R2Gen-style
        # multi-task setups): supervising the encoder with the labels makes the visual tokens carry the findings
        # from the first steps, before the language model has learned to look at them
        # (a backbone encoder has it built in: the last n_classes outputs of its own classifier; the conv encoder
        # gets a linear head on the pooled visual tokens)
        self.cls_head = nn.Linear(config.n_embd, config.n_classes) if config.n_classes > 0 and config.image_encoder == "conv" else None
        # ... and the head's probabilities become one more prefix token per finding (semantic tags before the text,
        # as in Jing et al. 2018): token_k = absent_k + p_k * (present_k - absent_k), so the language model reads
        # "effusion: 0.9" directly instead of decoding it from the visual tokens. finding_tags='hard' feeds the
        # decision p_k >= threshold_k instead (0 or 1): the report then names exactly the findings the head calls at
        # its operating point (thresholds chosen for F1 on validation by train_gpt.py), where greedy decoding from a
        # soft p would name a finding only when the model believes it more likely than not (p ~ 0.5, too strict for F1)
        assert config.finding_tags in ("soft", "hard"), f"finding_tags must be soft or hard, got {config.finding_tags!r}"
        self.hard = config.finding_tags == "hard"
        if config.n_classes > 0:
            self.finding_emb = nn.Parameter(0.02 * torch.randn(2, config.n_classes, config.n_embd))
            self.register_buffer("thresholds", torch.full((config.n_classes,), 0.5))

    def forward(self, images, tags=None):
        """images (B, C, H, W) -> prefix tokens (B, n_prefix [+ n_classes], n_embd), finding logits (B, n_classes) | None.
        tags: (B, n_classes) floats in [0, 1], NaN = the head decides: the finding tokens' values where given (training
        with the true labels here is teacher forcing of the tags; train_gpt.py's tag_forcing)."""
        feats, logits = self.encoder(images)  # (B, n_prefix, width), the backbone's finding logits or None
        tokens = self.mapping(feats) + self.prefix_pos
        if self.cls_head is not None:
            logits = self.cls_head(tokens.mean(dim=1))
        if logits is None:
            return tokens, None
        p = torch.sigmoid(logits.float())
        if self.hard:
            p = (p >= self.thresholds).float()
        if tags is not None:
            p = torch.where(torch.isnan(tags), p, tags.to(p.dtype))
        p = p.to(tokens.dtype).unsqueeze(-1)  # (B, n_classes, 1)
        absent, present = self.finding_emb[0], self.finding_emb[1]
        return torch.cat([tokens, absent + p * (present - absent)], dim=1), logits


# -----------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.pos in POS_SCHEMES, f"pos must be one of {POS_SCHEMES}, got {config.pos!r}"
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        if config.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.pos == "alibi":
            self.register_buffer("alibi_slopes", torch.tensor(alibi_slopes(config.n_head)), persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.prefix = ImagePrefix(config) if config.n_prefix > 0 else None
        self.prefix_len = config.n_prefix + config.n_classes if config.n_prefix > 0 else 0  # positions before the text
        self._mask_cache = {}

        for name, module in self.named_modules():
            if name.startswith("prefix.encoder"):
                continue  # the image encoder keeps PyTorch's (or its pretrained) init
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                # GPT-2 paper: residual projections scaled by 1/sqrt(N) with N = 2 residual adds per layer
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    # --- sizes, FLOPs, optimizer groups

    def get_num_params(self, non_embedding=True):
        """Parameter count; non_embedding drops the position table (wte stays: it is tied to lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T=None):
        """Training FLOPs per token: 6N for the matmuls (fwd 2N + bwd 4N) + 12*L*H*Q*T for attention
        scores and values (PaLM, Chowdhery et al. 2022, appendix B; as in nanoGPT)."""
        cfg = self.config
        T = T or cfg.block_size
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        n = self.get_num_params()
        if self.prefix is not None:  # the image encoder runs once per image, not per token: not counted here
            n -= sum(p.numel() for p in self.prefix.parameters())
        return 6 * n + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops, T=None):
        """Model FLOPs utilization: achieved (flops_per_token * tokens / dt) over peak_flops (common.device_peak_flops)."""
        if not peak_flops:
            return None
        return self.flops_per_token(T) * tokens_per_iter / dt / peak_flops

    def param_groups(self, weight_decay, prefix_lr_mult=1.0):
        """Decay every >=2-D tensor (matmuls, embeddings, convs); not biases, norms, prefix_pos. The image prefix
        (encoder, mapping, finding head) learns at prefix_lr_mult x the lr. For common.make_optimizer."""
        groups = []
        for part, scale in (("lm", 1.0), ("prefix", prefix_lr_mult)):
            params = {pn: p for pn, p in self.named_parameters()
                      if p.requires_grad and pn.startswith("prefix.") == (part == "prefix")}
            decay = [p for pn, p in params.items() if p.dim() >= 2 and not pn.endswith("prefix_pos")]
            no_decay = [p for pn, p in params.items() if not (p.dim() >= 2 and not pn.endswith("prefix_pos"))]
            groups += [dict(params=ps, weight_decay=wd, lr_scale=scale, name=f"{part}_{kind}")
                       for ps, wd, kind in ((decay, weight_decay, "decay"), (no_decay, 0.0, "no_decay")) if ps]
        return groups

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. GPT-2's 1024 -> 256) by slicing the position table."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    # --- forward

    def _attn_ctx(self, pos0, T, device):
        """What every layer needs to attend T new positions after pos0 cached ones."""
        cfg = self.config
        Tk = pos0 + T
        ctx = dict(rope=None, mask=None, is_causal=False)
        if cfg.pos == "rope":
            ctx["rope"] = rope_cos_sin(torch.arange(pos0, Tk, device=device), cfg.n_embd // cfg.n_head, cfg.rope_base, device)
        if cfg.pos == "alibi":
            key = (T, Tk, str(device))
            if key not in self._mask_cache:
                if len(self._mask_cache) > 8:
                    self._mask_cache.clear()
                self._mask_cache[key] = alibi_bias(self.alibi_slopes.to(device), T, Tk, device)
            ctx["mask"] = self._mask_cache[key]
        elif pos0 == 0:
            ctx["is_causal"] = True  # flash kernel eligible
        elif T > 1:  # several new queries after a cache: causal mask aligned to the bottom right
            ctx["mask"] = torch.ones(T, Tk, dtype=torch.bool, device=device).tril(diagonal=pos0)
        return ctx

    def _embed(self, idx, images, pos0, tags=None):
        """Token embeddings (after an image prefix when images is given) + learned positions; also returns the
        finding logits of the image prefix (None without images or a finding head)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        cls_logits = None
        if images is not None:
            assert self.prefix is not None, "images given but the model has n_prefix=0 (text only)"
            prefix, cls_logits = self.prefix(images, tags)
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        if self.config.pos == "learned":
            T = x.size(1)
            assert pos0 + T <= self.config.block_size, (
                f"sequence of {pos0 + T} positions > block_size={self.config.block_size} (learned positions "
                f"cannot extrapolate; use pos='alibi' or 'rope')")
            x = x + self.transformer.wpe(torch.arange(pos0, pos0 + T, device=idx.device))
        return self.transformer.drop(x), cls_logits

    def _blocks(self, x, pos0=0, cache=None):
        ctx = self._attn_ctx(pos0, x.size(1), x.device)
        new_cache = []
        for i, block in enumerate(self.transformer.h):
            if self.config.grad_checkpoint and self.training and torch.is_grad_enabled() and cache is None:
                x = checkpoint(lambda t, b=block: b(t, ctx)[0], x, use_reentrant=False)
                kv = None
            else:
                x, kv = block(x, ctx, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.transformer.ln_f(x), new_cache

    def forward(self, idx, targets=None, images=None, loss_reduction="mean", labels=None, tags=None):
        """idx: (B, T) token ids; targets: (B, T) ids with -1 = ignored (padding, prompt); images: (B, C, H, W)
        floats for an image-conditioned model (the prefix goes before idx); labels: (B, n_classes) {0, 1} findings
        (NaN = unknown) add aux_cls_weight * BCE of the finding head to the loss; tags: (B, n_classes) values for the
        finding tokens (NaN = the head's), see ImagePrefix.forward. Returns (logits (B, T, V), loss)."""
        x, cls_logits = self._embed(idx, images, 0, tags)
        x, _ = self._blocks(x)
        if images is not None:
            x = x[:, self.prefix_len:]  # logits only for text positions
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1, reduction=loss_reduction)
            if labels is not None and cls_logits is not None and self.config.aux_cls_weight > 0:
                known = ~torch.isnan(labels)
                bce = F.binary_cross_entropy_with_logits(cls_logits.float()[known], labels[known].float())
                loss = loss + self.config.aux_cls_weight * bce
        return logits, loss

    @torch.no_grad()
    def classify(self, images):
        """Finding probabilities (B, n_classes) from the prefix's auxiliary head."""
        assert self.prefix is not None and self.config.n_classes > 0, "the model has no finding head (n_classes=0)"
        return torch.sigmoid(self.prefix(images)[1].float())

    # --- generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos=None, images=None,
                 use_cache=True, generator=None):
        """Continue idx (B, T) by max_new_tokens. temperature=0 is greedy. eos: stop when every row has emitted it
        (finished rows keep emitting eos). With use_cache, each step runs one token through the KV cache; when the
        window is full (block_size), it crops to the last block_size positions and recomputes, like nanoGPT."""
        n_prefix = self.prefix_len if images is not None else 0
        window = self.config.block_size - n_prefix  # text tokens that fit after the prefix
        assert window > 0, f"block_size={self.config.block_size} leaves no room after the {n_prefix} prefix positions"
        cache, done = None, torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if cache is not None and use_cache and idx.size(1) <= window:
                x, _ = self._embed(idx[:, -1:], None, n_prefix + idx.size(1) - 1)
                x, cache = self._blocks(x, n_prefix + idx.size(1) - 1, cache)
            else:
                ctx_idx = idx[:, -window:]
                x, _ = self._embed(ctx_idx, images, 0)
                x, cache = self._blocks(x, 0, [None] * self.config.n_layer if use_cache else None)
            logits = self.lm_head(x[:, -1, :]).float()
            next_id = sample_logits(logits, temperature, top_k, top_p, generator)
            if eos is not None:
                next_id = torch.where(done, torch.full_like(next_id, eos), next_id)
                done |= next_id == eos
            idx = torch.cat([idx, next_id.view(-1, 1)], dim=1)
            if eos is not None and bool(done.all()):
                break
        return idx

    # --- Hugging Face GPT-2 from a local directory

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """A GPT-2 checkpoint saved by transformers (config.json + model.safetensors or pytorch_model.bin).
        overrides: dropout, block_size (crop), grad_checkpoint, n_prefix, ... Returns a GPT with identical logits."""
        cfg_file = os.path.join(path, "config.json")
        hf = model_lib.read_hf_config(path, "gpt2", f"a Hugging Face GPT-2 folder is needed (pretrained_path=<folder>, "
                                                    f"e.g. from huggingface-cli download gpt2 --local-dir {path})")
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{cfg_file}: activation_function={hf['activation_function']!r}, GPT here uses tanh-GELU")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights", True) is False:
            raise ValueError(f"{cfg_file}: non-default attention scaling is not supported")
        n_embd = hf.get("n_embd", 768)
        config = GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                           n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                           dropout=0.0, bias=True, pos="learned",
                           layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))
        crop = overrides.pop("block_size", None)
        for k, v in overrides.items():
            assert k in {f.name for f in fields(GPTConfig)}, f"unknown GPTConfig field {k!r}"
            setattr(config, k, v)
        model = cls(config)
        sd_hf = _read_hf_weights(path)
        sd_hf = {k.removeprefix("transformer."): v for k, v in sd_hf.items()}
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        sd = model.state_dict()
        loaded = set()
        for k, v in sd_hf.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
                continue  # causal-mask buffers; lm_head is tied to wte
            ours = "transformer." + k
            if ours not in sd:
                raise KeyError(f"{path}: unexpected GPT-2 weight {k!r}")
            if k.endswith(transposed):
                v = v.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
            if v.shape != sd[ours].shape:
                raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(sd[ours].shape)}")
            with torch.no_grad():
                sd[ours].copy_(v)
            loaded.add(ours)
        missing = [k for k in sd if k.startswith("transformer.") and k not in loaded]
        if missing:
            raise KeyError(f"{path}: GPT-2 weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if crop is not None and crop < config.block_size:
            model.crop_block_size(crop)
        return model


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0 = argmax; top_k keeps the k largest; top_p keeps the
    smallest set of tokens whose probability mass reaches top_p (Holtzman et al. 2020)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).view(-1)


def _read_hf_weights(path):
    """state dict (float32) from model.safetensors or pytorch_model.bin, read by model.read_weights."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            sd = model_lib.read_weights(os.path.join(path, name))
            return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")


def gpt_config_from_dict(d):
    """GPTConfig from a checkpoint's model_args (plain dict); unknown keys are an error naming them."""
    valid = {f.name for f in fields(GPTConfig)}
    bad = sorted(set(d) - valid)
    if bad:
        raise KeyError(f"model_args has unknown GPTConfig fields {bad}; valid: {sorted(valid)}")
    return GPTConfig(**d)


def gpt_config_to_dict(config):
    return asdict(config)
