"""
CLIP for radiology (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"):
an image tower and a text tower, each ending in a linear projection to a shared embedding, plus a learnable
temperature. This module holds the CLIP towers, split out of model.py; model.build_model is imported only for
image towers that are not CLIP ViTs.

Towers (build_clip(**args); args are plain types, stored in checkpoints as model_args):
  image_model = "clip_vit"          ViT/16 with the switches of the checkpoints we load:
                                      OpenAI / open_clip   ln_pre, patch conv without bias, LN eps 1e-5,
                                                           QuickGELU (OpenAI) or GELU (open_clip ViT-B-16)
                                      timm (BiomedCLIP)    no ln_pre, patch conv with bias, eps 1e-6, GELU
                                    pooling: final LN on the class token, then the projection.
  image_model = <model.py name>     any build_model() network (convnext_atto, vit_small, tv:resnet50, ...) whose
                                    classifier head, sized embed_dim, is the projection.
  text_model = "causal"             CLIP's text transformer: token + position embeddings, pre-LN blocks with a
                                    causal mask, final LN at the end-of-text token, projection.
  text_model = "bert"               BERT encoder (post-LN, HF BertModel weights), [CLS] pooling, projection
                                    ('linear' or BiomedCLIP's 'mlp': Linear-GELU-Linear, no biases).

Weights (load_clip_weights(model, path, layout="auto") -> report):
  open_clip   state dict of open_clip.CLIP (ViT-B-16 .pt / .bin / .safetensors, OpenAI's converted files)
  hf          a Hugging Face CLIPModel folder or file (openai/clip-vit-base-patch16: pytorch_model.bin or
              model.safetensors + config.json)
  biomedclip  open_clip checkpoint with a timm ViT trunk (visual.trunk.*) and an HF BERT text tower
              (text.transformer.*, text.proj.*): microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
clip_args_from_weights(path) reads the architecture off the weights (and config.json when there is one).

Losses (train_clip.py's objective, exact under DDP: features are gathered with gradients): clip_loss (symmetric
InfoNCE over the global batch) and distill_loss (CLIP-KD: KL over the batch's similarities + feature cosine).
"""

import json
import math
import os
import re

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import model as models

# -----------------------------------------------------------------------------
# architecture presets (plain dicts; build_clip(**PRESETS[name]) or a config file's knobs)

_OPENAI_B16 = dict(
    embed_dim=512, image_model="clip_vit", image_size=224, patch_size=16, vision_width=768, vision_layers=12,
    vision_heads=12, in_chans=3, ln_pre=True, patch_bias=False, vision_act="quick_gelu", vision_eps=1e-5,
    text_model="causal", vocab_size=49408, context_length=77, text_width=512, text_layers=12, text_heads=8,
    text_act="quick_gelu", text_eps=1e-5, eot_id=49407, pad_id=0, text_proj="linear")
PRESETS = {
    "openai_vit_b16": _OPENAI_B16,  # openai/clip-vit-base-patch16, open_clip ViT-B-16-quickgelu 'openai'
    "open_clip_vit_b16": {**_OPENAI_B16, "vision_act": "gelu", "text_act": "gelu"},  # open_clip ViT-B-16 (laion2b ...)
    "biomedclip": {**_OPENAI_B16, "ln_pre": False, "patch_bias": True, "vision_act": "gelu", "vision_eps": 1e-6,
                   "text_model": "bert", "vocab_size": 30522, "context_length": 256, "text_width": 768,
                   "text_layers": 12, "text_heads": 12, "text_act": "gelu", "text_eps": 1e-12, "eot_id": 3,
                   "pad_id": 0, "text_proj": "mlp", "max_position": 512, "type_vocab_size": 2},
}

# -----------------------------------------------------------------------------
# the CLIP towers' transformer: model.Block (pre-LN, fused qkv, F.scaled_dot_product_attention), with OpenAI's init


def _upgrade_block_keys(module, state_dict, prefix, *args):
    """Checkpoints written before the towers used model.Block kept the MLP at blocks.<i>.c_fc / c_proj; model.Block
    keeps it at blocks.<i>.mlp.c_fc / c_proj (a load_state_dict pre-hook: old nanorad CLIP files still load)."""
    old = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.(c_fc|c_proj)\.")
    for k in [k for k in state_dict if old.match(k)]:
        state_dict[old.sub(lambda m: f"{prefix}blocks.{m.group(1)}.mlp.{m.group(2)}.", k)] = state_dict.pop(k)


def _init_clip_blocks(blocks, width):
    """OpenAI CLIP's initialisation (open_clip init_parameters): attention in-projection std width^-0.5, output
    projections width^-0.5 (2 layers)^-0.5, MLP input (2 width)^-0.5. With the generic 0.02 a small tower starts
    with every image (and every caption) mapped to almost the same point, and InfoNCE stays stuck at ln(B)."""
    layers = max(1, len(blocks))
    attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    for b in blocks:
        nn.init.normal_(b.attn.c_attn.weight, std=attn_std)
        nn.init.normal_(b.attn.c_proj.weight, std=proj_std)
        nn.init.normal_(b.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(b.mlp.c_proj.weight, std=proj_std)


def run_blocks(blocks, x, grad_checkpoint):
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if grad_checkpoint and x.requires_grad else block(x)
    return x


# -----------------------------------------------------------------------------
# image towers


class VisionTransformer(nn.Module):
    """CLIP's ViT: patches + class token + positions -> (ln_pre) -> blocks -> ln_post(class token) -> proj."""

    def __init__(self, embed_dim, image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0,
                 in_chans=3, ln_pre=True, patch_bias=False, act="quick_gelu", eps=1e-5, drop_path=0.0,
                 grad_checkpoint=False):
        super().__init__()
        assert image_size % patch_size == 0, f"image_size={image_size} must be a multiple of patch_size={patch_size}"
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_chans, width, patch_size, patch_size, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.pos_embed = nn.Parameter(torch.randn(self.grid ** 2 + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width, eps=eps) if ln_pre else nn.Identity()
        dpr = [drop_path * i / max(1, layers - 1) for i in range(layers)]  # linearly increasing stochastic depth
        self.blocks = nn.ModuleList([models.Block(width, heads, mlp_ratio, drop_path=dpr[i], eps=eps, act=act)
                                     for i in range(layers)])
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.grad_checkpoint = grad_checkpoint
        self.apply(init_weights)
        _init_clip_blocks(self.blocks, width)
        self.register_load_state_dict_pre_hook(_upgrade_block_keys)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        x = run_blocks(self.blocks, self.ln_pre(x), self.grad_checkpoint)
        return self.proj(self.ln_post(x[:, 0]))

    def layer_ids(self):
        """name -> layer id for layer-wise LR decay and unlock_last_n: 0 = embeddings, i+1 = block i, L+1 = head."""
        L = len(self.blocks)
        ids = {}
        for n, _ in self.named_parameters():
            m = re.match(r"blocks\.(\d+)\.", n)
            ids[n] = int(m.group(1)) + 1 if m else (L + 1 if n.startswith(("ln_post", "proj")) else 0)
        return ids, L + 2


class ImageModelTower(nn.Module):
    """Any model.py image network; its classifier head (num_classes = embed_dim) is the projection."""

    def __init__(self, name, embed_dim, image_size, in_chans, drop_path=0.0, grad_checkpoint=False):
        super().__init__()
        import model as models  # read-only use of the classifier zoo
        self.net = models.build_model(name, num_classes=embed_dim, in_chans=in_chans, image_size=image_size,
                                      drop_path=drop_path, grad_checkpoint=grad_checkpoint)

    def forward(self, x):
        return self.net(x)

    def layer_ids(self):
        if hasattr(self.net, "layer_ids"):
            ids, num_layers = self.net.layer_ids()
            ids = {f"net.{n}": i for n, i in ids.items()}
            head = [n for n, _ in self.named_parameters() if n not in ids]
            ids.update({n: num_layers + 1 for n in head})  # the head (= projection) is the last group
            return ids, num_layers + 2
        return {n: 0 for n, _ in self.named_parameters()}, 1


# -----------------------------------------------------------------------------
# text towers


class TextTransformer(nn.Module):
    """CLIP's causal text transformer, pooled at the (first) end-of-text token."""

    def __init__(self, embed_dim, vocab_size=49408, context_length=77, width=512, layers=12, heads=8, mlp_ratio=4.0,
                 act="quick_gelu", eps=1e-5, eot_id=49407, dropout=0.0, grad_checkpoint=False):
        super().__init__()
        self.context_length, self.eot_id = context_length, eot_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList([models.Block(width, heads, mlp_ratio, dropout, is_causal=True, eps=eps, act=act)
                                     for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.grad_checkpoint = grad_checkpoint
        self.apply(init_weights)
        _init_clip_blocks(self.blocks, width)
        self.register_load_state_dict_pre_hook(_upgrade_block_keys)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)

    def forward(self, tokens):
        B, T = tokens.shape
        assert T <= self.context_length, f"{T} tokens > context_length {self.context_length}"
        x = self.token_embedding(tokens) + self.pos_embed[:T]
        x = run_blocks(self.blocks, x, self.grad_checkpoint)
        # the causal mask makes the end-of-text position a summary of the whole caption (padding comes after it);
        # the first eot (CLIP pools at argmax(ids), the same place since eot is the largest id)
        eot = (tokens == self.eot_id).int().argmax(dim=1)
        return self.proj(self.ln_final(x[torch.arange(B, device=x.device), eot]))

    def layer_ids(self):
        L = len(self.blocks)
        ids = {}
        for n, _ in self.named_parameters():
            m = re.match(r"blocks\.(\d+)\.", n)
            ids[n] = int(m.group(1)) + 1 if m else (L + 1 if n.startswith(("ln_final", "proj")) else 0)
        return ids, L + 2


class BertLayer(nn.Module):
    """Post-LN encoder layer (BERT): ln_attn(x + attn(x)), then ln_out(x + fc2(gelu(fc1(x))))."""

    def __init__(self, width, heads, mlp_ratio, eps, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.attn_out = nn.Linear(width, width)
        self.ln_attn = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)
        self.ln_out = nn.LayerNorm(width, eps=eps)

    def forward(self, x, attn_mask):
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for lin in (self.query, self.key, self.value))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p).transpose(1, 2).reshape(B, T, C)
        x = self.ln_attn(x + F.dropout(self.attn_out(y), p, self.training))
        return self.ln_out(x + F.dropout(self.fc2(F.gelu(self.fc1(x))), p, self.training))


class BertTextEncoder(nn.Module):
    """BERT (HF BertModel weights) + [CLS] pooling of the last hidden state + projection (BiomedCLIP's text tower)."""

    def __init__(self, embed_dim, vocab_size=30522, width=768, layers=12, heads=12, mlp_ratio=4.0, eps=1e-12,
                 max_position=512, type_vocab_size=2, pad_id=0, proj="mlp", dropout=0.0, grad_checkpoint=False):
        super().__init__()
        self.pad_id, self.grad_checkpoint, self.dropout = pad_id, grad_checkpoint, dropout
        self.wte = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.wpe = nn.Embedding(max_position, width)
        self.wtt = nn.Embedding(type_vocab_size, width)
        self.ln_emb = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList([BertLayer(width, heads, mlp_ratio, eps, dropout) for _ in range(layers)])
        if proj == "linear":
            self.proj = nn.Linear(width, embed_dim, bias=False)
        elif proj == "mlp":  # open_clip's HFTextEncoder 'mlp': hidden = (width + embed_dim) // 2
            hidden = (width + embed_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))
        elif proj == "none":
            assert width == embed_dim, f"text_proj='none' needs text_width == embed_dim, got {width} and {embed_dim}"
            self.proj = nn.Identity()
        else:
            raise ValueError(f"text_proj must be linear, mlp or none, got {proj!r}")
        self.apply(init_weights)

    def hidden_states(self, tokens):
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos) + self.wtt(torch.zeros_like(tokens))
        x = F.dropout(self.ln_emb(x), self.dropout, self.training)
        mask = (tokens != self.pad_id)[:, None, None, :]  # (B, 1, 1, T): padding keys are invisible
        for layer in self.layers:
            if self.grad_checkpoint and x.requires_grad:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x

    def forward(self, tokens):
        return self.proj(self.hidden_states(tokens)[:, 0])

    def layer_ids(self):
        L = len(self.layers)
        ids = {}
        for n, _ in self.named_parameters():
            m = re.match(r"layers\.(\d+)\.", n)
            ids[n] = int(m.group(1)) + 1 if m else (L + 1 if n.startswith("proj") else 0)
        return ids, L + 2


def init_weights(m):
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


# -----------------------------------------------------------------------------
# CLIP


class CLIP(nn.Module):
    def __init__(self, visual, text, init_logit_scale=math.log(1 / 0.07)):
        super().__init__()
        self.visual, self.text = visual, text
        # the temperature of the softmax, learned in log space; CLIP starts at 1/0.07 and caps it at 100
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def encode_image(self, images, normalize=True):
        f = self.visual(images)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=True):
        f = self.text(tokens)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, images=None, tokens=None):
        """-> (image features or None, text features or None, logit scale exp'ed); features are L2-normalized.
        logit_scale goes through forward so DDP sees it used."""
        img = self.encode_image(images) if images is not None else None
        txt = self.encode_text(tokens) if tokens is not None else None
        return img, txt, self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale=100.0):
        self.logit_scale.clamp_(0, math.log(max_scale))


CLIP_DEFAULTS = dict(
    embed_dim=512, image_model="clip_vit", image_size=224, patch_size=16, vision_width=768, vision_layers=12,
    vision_heads=12, vision_mlp_ratio=4.0, in_chans=3, ln_pre=True, patch_bias=False, vision_act="quick_gelu",
    vision_eps=1e-5, drop_path=0.0, text_model="causal", vocab_size=49408, context_length=77, text_width=512,
    text_layers=12, text_heads=8, text_mlp_ratio=4.0, text_act="quick_gelu", text_eps=1e-5, eot_id=49407, pad_id=0,
    text_proj="linear", max_position=512, type_vocab_size=2, text_dropout=0.0, grad_checkpoint=False)


def build_clip(**kwargs):
    """CLIP from plain keyword args (CLIP_DEFAULTS lists them); .model_args keeps the full dict for checkpoints."""
    unknown = set(kwargs) - set(CLIP_DEFAULTS)
    if unknown:
        raise ValueError(f"build_clip: unknown argument(s) {sorted(unknown)}; valid: {sorted(CLIP_DEFAULTS)}")
    a = {**CLIP_DEFAULTS, **kwargs}
    if a["image_model"] == "clip_vit":
        visual = VisionTransformer(a["embed_dim"], a["image_size"], a["patch_size"], a["vision_width"], a["vision_layers"],
                                   a["vision_heads"], a["vision_mlp_ratio"], a["in_chans"], a["ln_pre"], a["patch_bias"],
                                   a["vision_act"], a["vision_eps"], a["drop_path"], a["grad_checkpoint"])
    else:
        visual = ImageModelTower(a["image_model"], a["embed_dim"], a["image_size"], a["in_chans"], a["drop_path"],
                                 a["grad_checkpoint"])
    if a["text_model"] == "causal":
        text = TextTransformer(a["embed_dim"], a["vocab_size"], a["context_length"], a["text_width"], a["text_layers"],
                               a["text_heads"], a["text_mlp_ratio"], a["text_act"], a["text_eps"], a["eot_id"],
                               a["text_dropout"], a["grad_checkpoint"])
    elif a["text_model"] == "bert":
        text = BertTextEncoder(a["embed_dim"], a["vocab_size"], a["text_width"], a["text_layers"], a["text_heads"],
                               a["text_mlp_ratio"], a["text_eps"], a["max_position"], a["type_vocab_size"], a["pad_id"],
                               a["text_proj"], a["text_dropout"], a["grad_checkpoint"])
    else:
        raise ValueError(f"text_model must be causal or bert, got {a['text_model']!r}")
    model = CLIP(visual, text)
    model.model_args = a
    return model


# -----------------------------------------------------------------------------
# losses on the features, exact under DDP (train_clip.py's objective)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our slice (an all_reduce, so gloo works too)."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.B = tdist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, x.contiguous())
        parts[ctx.rank] = x  # not needed for the values; keeps the local rows bit-identical
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)
        return grad[ctx.rank * ctx.B:(ctx.rank + 1) * ctx.B]


def gather_with_grad(x, dist):
    return _GatherWithGrad.apply(x) if dist.ddp else x


def clip_loss(img, txt, scale, dist, margin=None, weight=None):
    """Symmetric InfoNCE of this rank's rows against every rank's features: mean over local pairs of
    (CE(image -> texts) + CE(text -> images)) / 2. With DDP's gradient averaging (and the gathered gradients
    summed back) the parameter gradients equal those of one process holding the whole batch.
    margin (B,): subtracted from the positive cosine (AM-softmax); weight (B,): per-pair loss weight."""
    all_img, all_txt = gather_with_grad(img, dist), gather_with_grad(txt, dist)
    B = img.shape[0]
    labels = torch.arange(B, device=img.device) + dist.rank * B
    logits_i = scale * img @ all_txt.t()  # (B, N)
    logits_t = scale * txt @ all_img.t()  # (B, N)
    if margin is not None:
        rows = torch.arange(B, device=img.device)
        m = torch.zeros_like(logits_i).index_put_((rows, labels), scale * margin)
        logits_i, logits_t = logits_i - m, logits_t - m
    per = 0.5 * (F.cross_entropy(logits_i, labels, reduction="none") + F.cross_entropy(logits_t, labels, reduction="none"))
    if weight is not None:
        per = per * weight
    return per.mean()


def distill_loss(img, txt, scale, teacher, dist, temperature=1.0, feature=0.0):
    """CLIP-KD on this rank's rows against the global batch. teacher = (image features, text features, logit scale)
    of the same pairs (normalized, no grad). Relational term: KL(teacher || student) between the softmax over the
    batch of each image's text similarities and of each text's image similarities, both at scale / temperature,
    times temperature^2; feature term (weight `feature`): mean (1 - cosine) between student and teacher embeddings."""
    t_img, t_txt, t_scale = teacher
    all_img, all_txt = gather_with_grad(img, dist), gather_with_grad(txt, dist)
    all_t_img, all_t_txt = gather_with_grad(t_img, dist), gather_with_grad(t_txt, dist)
    kl = 0.0
    for s_logits, t_logits in ((img @ all_txt.t(), t_img @ all_t_txt.t()), (txt @ all_img.t(), t_txt @ all_t_img.t())):
        log_p_s = F.log_softmax(s_logits * (scale / temperature), dim=-1)
        log_p_t = F.log_softmax(t_logits * (t_scale / temperature), dim=-1)
        kl = kl + 0.5 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    loss = kl * temperature ** 2
    if feature:
        if img.shape[-1] != t_img.shape[-1]:
            raise ValueError(f"distill_feature needs equal embedding widths: student embed_dim={img.shape[-1]}, "
                             f"teacher {t_img.shape[-1]}; set --embed_dim={t_img.shape[-1]} or --distill_feature=0")
        loss = loss + feature * 0.5 * ((1 - (img * t_img).sum(-1)).mean() + (1 - (txt * t_txt).sum(-1)).mean())
    return loss


# -----------------------------------------------------------------------------
# loading open_clip, Hugging Face and BiomedCLIP weights: convert to our names, then a strict load


def _read_state_dict(path):
    """A file (.pt/.pth/.bin/.safetensors) or a folder holding model.safetensors / pytorch_model.bin / open_clip_*."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path} holds no model.safetensors, pytorch_model.bin or open_clip_pytorch_model.bin")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weights {path} not found (a local open_clip / Hugging Face / BiomedCLIP file)")
    return models.read_weights(path), path  # open_clip / nanorad checkpoints unwrapped, DDP prefixes dropped


def detect_layout(sd):
    if any(k.startswith("vision_model.") for k in sd):
        return "hf"
    if any(k.startswith("visual.trunk.") for k in sd) or any(k.startswith("text.transformer.") for k in sd):
        return "biomedclip"
    if "visual.conv1.weight" in sd or "token_embedding.weight" in sd:
        return "open_clip"
    if any(k.startswith("visual.patch_embed") for k in sd) and "logit_scale" in sd:
        return "nanorad"
    raise ValueError("unrecognised CLIP state dict: expected open_clip (visual.conv1.*), Hugging Face (vision_model.*), "
                     f"BiomedCLIP (visual.trunk.*) or nanorad keys; first keys: {list(sd)[:5]}")


def _block_map(prefix_in, prefix_out, style):
    """Regex rules for one transformer stack: open_clip resblocks, HF CLIP encoder layers, timm blocks."""
    if style == "open_clip":
        b = re.escape(prefix_in) + r"(\d+)\."
        return [(b + r"attn\.in_proj_(weight|bias)$", prefix_out + r"\1.attn.c_attn.\2"),
                (b + r"attn\.out_proj\.", prefix_out + r"\1.attn.c_proj."),
                (b + r"mlp\.c_fc\.", prefix_out + r"\1.mlp.c_fc."), (b + r"mlp\.c_proj\.", prefix_out + r"\1.mlp.c_proj."),
                (b + r"(ln_[12])\.", prefix_out + r"\1.\2.")]
    if style == "timm":
        b = re.escape(prefix_in) + r"(\d+)\."
        return [(b + r"attn\.qkv\.", prefix_out + r"\1.attn.c_attn."), (b + r"attn\.proj\.", prefix_out + r"\1.attn.c_proj."),
                (b + r"mlp\.fc1\.", prefix_out + r"\1.mlp.c_fc."), (b + r"mlp\.fc2\.", prefix_out + r"\1.mlp.c_proj."),
                (b + r"norm1\.", prefix_out + r"\1.ln_1."), (b + r"norm2\.", prefix_out + r"\1.ln_2.")]
    assert style == "hf"
    b = re.escape(prefix_in) + r"(\d+)\."
    return [(b + r"self_attn\.out_proj\.", prefix_out + r"\1.attn.c_proj."),
            (b + r"mlp\.fc1\.", prefix_out + r"\1.mlp.c_fc."), (b + r"mlp\.fc2\.", prefix_out + r"\1.mlp.c_proj."),
            (b + r"layer_norm1\.", prefix_out + r"\1.ln_1."), (b + r"layer_norm2\.", prefix_out + r"\1.ln_2.")]


def _rename(sd, rules, dropped):
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            if not any(re.match(d, k) for d in dropped):
                out[k] = v  # left as is: the strict load names it if it is foreign
    return out


def _merge_hf_qkv(sd, prefix_in, prefix_out):
    """HF CLIP keeps q, k, v projections apart; ours are one c_attn (q, k, v stacked)."""
    out = {}
    for k in list(sd):
        m = re.match(re.escape(prefix_in) + r"(\d+)\.self_attn\.q_proj\.(weight|bias)$", k)
        if m:
            i, t = m.groups()
            parts = [sd.pop(f"{prefix_in}{i}.self_attn.{p}_proj.{t}") for p in "qkv"]
            out[f"{prefix_out}{i}.attn.c_attn.{t}"] = torch.cat(parts, 0)
    sd.update(out)
    return sd


def convert_open_clip(sd):
    sd = dict(sd)
    if "visual.proj" in sd:
        sd["visual.proj.weight"] = sd.pop("visual.proj").t()
    if "text_projection" in sd:
        sd["text.proj.weight"] = sd.pop("text_projection").t()
    rules = [(r"^visual\.conv1\.", "visual.patch_embed."), (r"^visual\.class_embedding$", "visual.cls_token"),
             (r"^visual\.positional_embedding$", "visual.pos_embed"),
             (r"^token_embedding\.", "text.token_embedding."), (r"^positional_embedding$", "text.pos_embed"),
             (r"^ln_final\.", "text.ln_final.")]
    rules += _block_map("visual.transformer.resblocks.", "visual.blocks.", "open_clip")
    rules += _block_map("transformer.resblocks.", "text.blocks.", "open_clip")
    return _rename(sd, rules, dropped=[r"^attn_mask$", r"^logit_bias$"])


def convert_hf_clip(sd):
    sd = _merge_hf_qkv(dict(sd), "vision_model.encoder.layers.", "visual.blocks.")
    sd = _merge_hf_qkv(sd, "text_model.encoder.layers.", "text.blocks.")
    rules = [(r"^vision_model\.embeddings\.patch_embedding\.", "visual.patch_embed."),
             (r"^vision_model\.embeddings\.class_embedding$", "visual.cls_token"),
             (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.pos_embed"),
             (r"^vision_model\.pre_layrnorm\.", "visual.ln_pre."), (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
             (r"^visual_projection\.", "visual.proj."),
             (r"^text_model\.embeddings\.token_embedding\.", "text.token_embedding."),
             (r"^text_model\.embeddings\.position_embedding\.weight$", "text.pos_embed"),
             (r"^text_model\.final_layer_norm\.", "text.ln_final."), (r"^text_projection\.", "text.proj.")]
    rules += _block_map("vision_model.encoder.layers.", "visual.blocks.", "hf")
    rules += _block_map("text_model.encoder.layers.", "text.blocks.", "hf")
    return _rename(sd, rules, dropped=[r".*position_ids$"])


def convert_hf_bert(sd, prefix_in, prefix_out):
    """HF BertModel keys under prefix_in (e.g. 'text.transformer.' or '') -> our BertTextEncoder under prefix_out."""
    p = re.escape(prefix_in)
    L = p + r"encoder\.layer\.(\d+)\."
    rules = [(p + r"embeddings\.word_embeddings\.", prefix_out + "wte."),
             (p + r"embeddings\.position_embeddings\.", prefix_out + "wpe."),
             (p + r"embeddings\.token_type_embeddings\.", prefix_out + "wtt."),
             (p + r"embeddings\.LayerNorm\.", prefix_out + "ln_emb."),
             (L + r"attention\.self\.(query|key|value)\.", prefix_out + r"layers.\1.\2."),
             (L + r"attention\.output\.dense\.", prefix_out + r"layers.\1.attn_out."),
             (L + r"attention\.output\.LayerNorm\.", prefix_out + r"layers.\1.ln_attn."),
             (L + r"intermediate\.dense\.", prefix_out + r"layers.\1.fc1."),
             (L + r"output\.dense\.", prefix_out + r"layers.\1.fc2."),
             (L + r"output\.LayerNorm\.", prefix_out + r"layers.\1.ln_out.")]
    # BiomedCLIP pools the last hidden state's [CLS] ('cls_last_hidden_state_pooler'): BERT's pooler is unused
    return _rename(sd, rules, dropped=[p + r"embeddings\.position_ids$", p + r"pooler\."])


def convert_biomedclip(sd):
    sd = dict(sd)
    t = "visual.trunk."
    if t + "cls_token" in sd:
        sd[t + "cls_token"] = sd[t + "cls_token"].reshape(-1)
        sd[t + "pos_embed"] = sd[t + "pos_embed"].reshape(-1, sd[t + "pos_embed"].shape[-1])
    rules = [(r"^visual\.trunk\.patch_embed\.proj\.", "visual.patch_embed."), (r"^visual\.trunk\.cls_token$", "visual.cls_token"),
             (r"^visual\.trunk\.pos_embed$", "visual.pos_embed"), (r"^visual\.trunk\.norm\.", "visual.ln_post."),
             (r"^visual\.head\.proj\.", "visual.proj.")]
    rules += _block_map("visual.trunk.blocks.", "visual.blocks.", "timm")
    sd = _rename(sd, rules, dropped=[])
    return convert_hf_bert(sd, "text.transformer.", "text.")


CONVERTERS = {"open_clip": convert_open_clip, "hf": convert_hf_clip, "biomedclip": convert_biomedclip, "nanorad": dict}


def _adapt(model, sd, report):
    """Checkpoint -> this model's shapes: RGB patch filters summed for 1-channel input; position grid resampled."""
    own = model.state_dict()
    w = sd.get("visual.patch_embed.weight")
    if w is not None and "visual.patch_embed.weight" in own and w.shape[1] != own["visual.patch_embed.weight"].shape[1]:
        if own["visual.patch_embed.weight"].shape[1] == 1 and w.shape[1] == 3:
            sd["visual.patch_embed.weight"] = w.sum(1, keepdim=True)  # gray x (r + g + b) == the RGB net on a gray image
            report["adapted"].append("visual.patch_embed.weight: RGB filters summed for in_chans=1")
    pe = sd.get("visual.pos_embed")
    if pe is not None and "visual.pos_embed" in own and pe.shape != own["visual.pos_embed"].shape:
        g_old, g_new = int(round(math.sqrt(pe.shape[0] - 1))), int(round(math.sqrt(own["visual.pos_embed"].shape[0] - 1)))
        grid = pe[1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
        sd["visual.pos_embed"] = torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(g_new * g_new, -1).to(pe.dtype)])
        report["adapted"].append(f"visual.pos_embed: {g_old}x{g_old} -> {g_new}x{g_new} grid (bicubic)")
    pos = sd.get("text.pos_embed")
    if pos is not None and "text.pos_embed" in own and pos.shape[0] > own["text.pos_embed"].shape[0]:
        sd["text.pos_embed"] = pos[: own["text.pos_embed"].shape[0]]  # a shorter context keeps the first positions
        report["adapted"].append(f"text.pos_embed: first {own['text.pos_embed'].shape[0]} of {pos.shape[0]} positions")
    return sd


def load_clip_weights(model, path, layout="auto", strict=True):
    """Load open_clip / HF / BiomedCLIP / nanorad CLIP weights into a build_clip() model. Returns a report dict.
    The model's architecture must match (clip_args_from_weights(path) reads it off the file)."""
    sd, file = _read_state_dict(path)
    layout = detect_layout(sd) if layout == "auto" else layout
    if layout not in CONVERTERS:
        raise ValueError(f"layout must be auto or one of {sorted(CONVERTERS)}, got {layout!r}")
    sd = CONVERTERS[layout](sd)
    report = {"file": file, "layout": layout, "adapted": []}
    sd = _adapt(model, sd, report)
    own = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{file}: shape mismatch (wrong architecture? see clip_args_from_weights): {bad[:5]}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    report.update(missing=list(missing), unexpected=list(unexpected), loaded=len(sd) - len(unexpected))
    if strict and (missing or unexpected):
        raise ValueError(f"{file} ({layout}): missing {list(missing)[:8]}, unexpected {list(unexpected)[:8]}")
    return report


def clip_args_from_weights(path, layout="auto"):
    """Architecture kwargs for build_clip read off a weights file (+ its config.json for HF). Heads are taken as
    width // 64 where the file does not say (open_clip's and BERT-base's head width)."""
    sd, file = _read_state_dict(path)
    layout = detect_layout(sd) if layout == "auto" else layout
    sd = CONVERTERS[layout](sd)
    count = lambda pre: len({k.split(".")[2] for k in sd if k.startswith(pre)})  # noqa: E731
    w = sd["visual.patch_embed.weight"]
    a = dict(image_model="clip_vit", vision_width=w.shape[0], patch_size=w.shape[-1], in_chans=w.shape[1],
             image_size=w.shape[-1] * int(round(math.sqrt(sd["visual.pos_embed"].shape[0] - 1))),
             vision_layers=count("visual.blocks."), vision_heads=w.shape[0] // 64,
             vision_mlp_ratio=sd["visual.blocks.0.mlp.c_fc.weight"].shape[0] / w.shape[0],
             ln_pre="visual.ln_pre.weight" in sd, patch_bias="visual.patch_embed.bias" in sd)
    if layout == "biomedclip":
        a.update(PRESETS["biomedclip"], **{k: v for k, v in a.items()})
        ww = sd["text.wte.weight"]
        proj = "mlp" if "text.proj.0.weight" in sd else ("linear" if "text.proj.weight" in sd else "none")
        a.update(text_model="bert", vocab_size=ww.shape[0], text_width=ww.shape[1], text_layers=count("text.layers."),
                 text_heads=ww.shape[1] // 64, max_position=sd["text.wpe.weight"].shape[0], text_proj=proj,
                 text_mlp_ratio=sd["text.layers.0.fc1.weight"].shape[0] / ww.shape[1],
                 embed_dim=sd["text.proj.2.weight" if proj == "mlp" else "visual.proj.weight"].shape[0])
        return a
    tw = sd["text.token_embedding.weight"]
    a.update(embed_dim=sd["visual.proj.weight"].shape[0], text_model="causal", vocab_size=tw.shape[0],
             text_width=tw.shape[1], context_length=sd["text.pos_embed"].shape[0], text_layers=count("text.blocks."),
             text_heads=tw.shape[1] // 64, text_mlp_ratio=sd["text.blocks.0.mlp.c_fc.weight"].shape[0] / tw.shape[1],
             eot_id=tw.shape[0] - 1, text_proj="linear")
    cfg_file = os.path.join(os.path.dirname(file), "config.json")
    if layout == "hf" and os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            c = json.load(f)
        v, t = c.get("vision_config", {}), c.get("text_config", {})
        a.update(vision_heads=v.get("num_attention_heads", a["vision_heads"]), text_heads=t.get("num_attention_heads", a["text_heads"]),
                 vision_act=v.get("hidden_act", "quick_gelu"), text_act=t.get("hidden_act", "quick_gelu"),
                 vision_eps=v.get("layer_norm_eps", 1e-5), text_eps=t.get("layer_norm_eps", 1e-5))
        eos = t.get("eos_token_id", 2)
        a["eot_id"] = a["eot_id"] if eos == 2 else eos  # HF's legacy eos_token_id=2 means: pool at argmax(ids)
    elif layout == "hf":
        a.update(vision_act="quick_gelu", text_act="quick_gelu")  # the OpenAI models HF hosts use QuickGELU
    else:
        # the file cannot say: OpenAI's weights (and open_clip's '-quickgelu' models) use QuickGELU, open_clip's
        # own ViT-B-16 trainings GELU; set vision_act / text_act in the config to override
        a.update(vision_act="quick_gelu", text_act="quick_gelu")
    return a


# -----------------------------------------------------------------------------
# parameter groups, LiT locking


def tower_layer_ids(model):
    """name (in the CLIP model) -> (tower, layer id, number of layer ids in that tower)."""
    out = {}
    for tower in ("visual", "text"):
        ids, n = getattr(model, tower).layer_ids()
        for name, i in ids.items():
            out[f"{tower}.{name}"] = (tower, i, n)
    return out


def lock_tower(model, tower, unlock_last_n=0):
    """LiT (Zhai et al. 2022): freeze a tower, except its last `unlock_last_n` layer groups (the final norm +
    projection count as one group, then blocks from the top). Returns the number of trainable tensors left."""
    left = 0
    for name, (t, i, n) in tower_layer_ids(model).items():
        if t != tower:
            continue
        p = model.get_parameter(name)
        p.requires_grad_(i >= n - unlock_last_n)
        left += int(p.requires_grad)
    return left


def clip_param_groups(model, weight_decay, lr_mult_image=1.0, lr_mult_text=1.0, layer_decay_image=1.0, layer_decay_text=1.0):
    """AdamW groups: per tower and layer, lr_scale = tower mult x layer_decay ** (depth from the top); no weight
    decay on biases, norms, embeddings of positions / class token, and the temperature."""
    groups = {}
    ids = tower_layer_ids(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "logit_scale":
            key = ("logit_scale", 1.0, 0.0)
        else:
            tower, i, n = ids[name]
            mult, decay = (lr_mult_image, layer_decay_image) if tower == "visual" else (lr_mult_text, layer_decay_text)
            no_wd = p.ndim < 2 or name.endswith(("pos_embed", "cls_token")) or "wpe" in name or "wtt" in name
            wd = 0.0 if no_wd else weight_decay
            scale = mult * decay ** (n - 1 - i)
            key = (f"{tower}.layer{i}.{'no_decay' if no_wd else 'decay'}", scale, wd)
        g = groups.setdefault(key, {"params": [], "weight_decay": key[2], "lr_scale": key[1], "name": key[0]})
        g["params"].append(p)
    return list(groups.values())
