"""
Multimodal fusion classifier (MDF-Net style, Hsieh et al. 2023): an image encoder, a text encoder over the
clinical indication (or any other text column) and an MLP over clinical variables (age, sex, view, ...), fused
by concatenation + MLP or by cross-attention (image tokens attend to text tokens), then a 2-layer head.

    net = build_fusion(modalities="all", vision_model="convnext_atto", num_classes=10, image_size=64,
                       clinical_spec=spec, clinical_dim=clinical_dim(spec))
    logits = net(x, text_tokens=tokens, clinical=feats)      # any input a chosen modality does not use may be None

Modalities: 'vision' | 'text' | 'clinical' | 'vision,text' | 'vision,clinical' | 'text,clinical' | 'all'.
The vision-only row of an ablation is this model with modalities='vision' (same head, same recipe), so the
table measures what text and clinical variables add, not a change of head.

Encoders (what stage 1 of finetune_mode='two_stage' freezes; model.freeze_backbone works on this model
because head_names = ('clinical', 'fusion', 'head', 'vision_head'), + 'text' with text_with_head):
  vision   'model': any model.py image network (convnext_*, vit_*, vit_cxr, tv:<name>) with its head replaced
           by Identity; optionally initialised from a train.py / train_clip.py checkpoint or any load_pretrained file.
           'clip': model_clip.py's CLIP ViT image tower (BiomedCLIP's, an open_clip / HF CLIP's, or a train_clip.py
           checkpoint's) without its projection: pooled = ln_post([CLS]) = encode_image before the projection,
           tokens = ln_post(patch tokens) for cross-attention; vision_args holds the tower's architecture
  text     'small': token + position embeddings, model.Block x n, LayerNorm, masked mean pooling, over UTF-8
           bytes (or a tokenizer.py byte-BPE file); 'clip': the text tower of model_clip.py (CLIP causal
           transformer or BERT) from a train_clip.py checkpoint or open_clip / HF / BiomedCLIP weights;
           'modernbert': model_bert.py's ModernBERT from a Hugging Face folder (Clinical ModernBERT), its
           tokenizer.json read with the `tokenizers` package
The clinical MLP is trained with fusion + head in both stages: there is no pretrained clinical encoder; with
text_with_head=True a from-scratch text encoder is too (frozen at its random init, it would only give the head
random features of the indication). vision_logits=True keeps the image model's classifier beside the fused head. A small
text encoder can start from another fusion run (text_init=<text-only run>/best.pt), as the image encoder starts
from the quick start; modality_dropout drops whole modalities per training sample (ModDrop).

Plumbing from a prepared data set (data.PreparedSplit, {split}_index.csv):
  spec = clinical_spec(train_split.index, "age,sex,view")     # train-split statistics, stored in model_args
  arrays = split_inputs(split, net.model_args)                 # {'text_tokens': (N,T) int64, 'clinical': (N,D) f32}
  kw = batch_inputs(arrays, idx, device)                       # idx: the sample indices a Loader / eval shard gives
Missing clinical values (empty cells) become value 0 plus a missing-indicator feature: never NaN.
"""

import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as models
import model_bert
import model_clip
import tokenizer
import tracking

MODALITIES = ("vision", "text", "clinical")
MISSING = ("", "nan", "none", "na", "n/a", "null", "unknown")  # lower-cased cell values read as missing

# -----------------------------------------------------------------------------
# modalities knob


def parse_modalities(s):
    """'all' | comma list of vision/text/clinical -> tuple in canonical order."""
    s = s.strip().lower()
    if s == "all":
        return MODALITIES
    got = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in got if m not in MODALITIES]
    if bad or not got:
        raise ValueError(f"modalities={s!r}: use 'all' or a comma list of {', '.join(MODALITIES)} (e.g. 'vision,text'); "
                         f"unknown: {bad}")
    return tuple(m for m in MODALITIES if m in got)

# -----------------------------------------------------------------------------
# clinical variables: numeric -> z-score + missing flag; categorical -> one-hot + missing flag


def _missing(v):
    return v is None or str(v).strip().lower() in MISSING


def _as_float(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def clinical_spec(rows, columns, max_categories=64):
    """Read the variables' encoding off the training rows (list of dicts from {split}_index.csv). A column whose
    non-missing cells all parse as numbers is numeric (mean/std of train), otherwise categorical (categories
    seen in train, sorted). Returns a list of plain dicts (stored in checkpoints)."""
    cols = [c.strip() for c in columns.split(",") if c.strip()] if isinstance(columns, str) else list(columns)
    if rows and cols:
        absent = [c for c in cols if c not in rows[0]]
        if absent:
            raise KeyError(f"clinical_columns {absent} are not columns of the index csv; its columns: {sorted(rows[0])}")
    spec = []
    for c in cols:
        vals = [r[c] for r in rows if not _missing(r[c])]
        nums = [_as_float(v) for v in vals]
        if vals and all(x is not None for x in nums):
            x = np.asarray(nums, np.float64)
            spec.append({"name": c, "kind": "numeric", "mean": float(x.mean()), "std": float(x.std()) or 1.0})
        else:
            cats = sorted({str(v).strip() for v in vals})
            if len(cats) > max_categories:
                raise ValueError(f"clinical column {c!r} has {len(cats)} categories in the train split (> {max_categories}): "
                                 f"bin it into a few groups in the index csv, or leave it out of clinical_columns")
            spec.append({"name": c, "kind": "categorical", "categories": cats})
    return spec


def clinical_dim(spec):
    return sum(2 if s["kind"] == "numeric" else len(s["categories"]) + 1 for s in spec)


def clinical_features(rows, spec):
    """(N, D) float32: per numeric variable [z-score, missing]; per categorical [one-hot..., missing]. A missing
    or unparseable value is 0 with its flag set; a category unseen in train is all-zero one-hot with the flag."""
    out = np.zeros((len(rows), clinical_dim(spec)), np.float32)
    j = 0
    for s in spec:
        c = s["name"]
        if s["kind"] == "numeric":
            for i, r in enumerate(rows):
                x = None if _missing(r.get(c)) else _as_float(r.get(c))
                if x is None:
                    out[i, j + 1] = 1.0
                else:
                    out[i, j] = (x - s["mean"]) / s["std"]
            j += 2
        else:
            pos = {v: k for k, v in enumerate(s["categories"])}
            miss = j + len(s["categories"])
            for i, r in enumerate(rows):
                k = None if _missing(r.get(c)) else pos.get(str(r.get(c)).strip())
                if k is None:
                    out[i, miss] = 1.0
                else:
                    out[i, j + k] = 1.0
            j = miss + 1
    assert np.isfinite(out).all(), "clinical features must be finite"
    return out

# -----------------------------------------------------------------------------
# text tokens. The small encoder reads ids shifted by one (0 = padding) after a BOS id, so every text, also an
# empty one, has at least one real token to pool over. The CLIP / BERT towers use their own tokenizers.

PAD_ID = 0


class SmallTokens:
    """'byte': UTF-8 bytes (vocab 258, no file); 'bpe': a tokenizer.py JSON (byte-level BPE or char-level)."""

    def __init__(self, kind="byte", path=""):
        self.kind = kind
        if kind == "byte":
            self.encode, base = (lambda t: list(t.encode("utf-8"))), 256
        elif kind == "bpe":
            if not path:
                raise ValueError("text_tokenizer='bpe' needs text_tokenizer_path=<tokenizer.py json> "
                                 "(make one: python tokenizer.py --train=reports.txt --vocab_size=4096 --out=tok.json)")
            tok = tokenizer.load(path)
            self.encode, base = tok.encode, tok.vocab_size
        else:
            raise ValueError(f"small text encoder: text_tokenizer must be byte or bpe, got {kind!r}")
        self.bos_id = base + 1
        self.vocab_size = base + 2

    def __call__(self, texts, T):
        out = np.zeros((len(texts), T), np.int64)
        for i, t in enumerate(texts):
            ids = [self.bos_id] + [k + 1 for k in self.encode(t)]
            out[i, :min(T, len(ids))] = ids[:T]
        return out


class HFTokens:
    """A Hugging Face tokenizer.json (ModernBERT's: [CLS] text [SEP]) through the `tokenizers` package; padding is
    pad_id, which the encoder masks."""

    def __init__(self, path, pad_id):
        f = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(f):
            raise FileNotFoundError(f"text_tokenizer_path={path!r}: no tokenizer.json (the ModernBERT folder holds one)")
        tokenizers = tracking.require("tokenizers", "tokenizers", "text_encoder='modernbert' (its tokenizer.json)")
        self.tok, self.pad_id = tokenizers.Tokenizer.from_file(f), pad_id
        self.tok.no_padding()
        self.tok.no_truncation()

    def __call__(self, texts, T):
        out = np.full((len(texts), T), self.pad_id, np.int64)
        for i, enc in enumerate(self.tok.encode_batch(list(texts))):
            ids = enc.ids[:T - 1] + enc.ids[-1:] if len(enc.ids) > T else enc.ids  # keep [SEP] when truncating
            out[i, :len(ids)] = ids
        return out


def make_tokenizer(args):
    """The tokenizer of a fusion model's text encoder: callable texts -> (N, text_context) int64."""
    if args["text_encoder"] == "small":
        return SmallTokens(args["text_tokenizer"], args["text_tokenizer_path"])
    if args["text_encoder"] == "modernbert":
        return HFTokens(args["text_tokenizer_path"], args["text_args"]["pad_token_id"])
    tok = tokenizer.build_tokenizer(args["text_tokenizer"], args["text_tokenizer_path"], args["text_context"])
    return lambda texts, T: tokenizer.tokenize_numpy(tok, texts, T)[0].astype(np.int64)

# -----------------------------------------------------------------------------
# per-split arrays and per-batch lookup


def split_inputs(split, args, tokenizer=None):
    """The text tokens and clinical features of every sample of a PreparedSplit (row i = sample i), for the
    modalities of a fusion model's args. Text: the args['text_column'] column; clinical: args['clinical_spec']."""
    mods = parse_modalities(args["modalities"])
    rows = split.index
    assert len(rows) == len(split), f"{split.split}_index.csv has {len(rows)} rows for {len(split)} images"
    out = {}
    if "text" in mods:
        col = args["text_column"]
        if rows and col not in rows[0]:
            raise KeyError(f"text_column={col!r} is not a column of {split.split}_index.csv; columns: {sorted(rows[0])}")
        tok = tokenizer or make_tokenizer(args)
        out["text_tokens"] = tok([r[col] or "" for r in rows], args["text_context"])
    if "clinical" in mods:
        out["clinical"] = clinical_features(rows, args["clinical_spec"])
    return out


def batch_inputs(arrays, idx, device):
    """Keyword arguments of FusionClassifier.forward for the samples idx (np.int64 / tensor) of a split."""
    if not arrays:
        return {}
    idx = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64)
    return {k: torch.from_numpy(v[idx]).to(device, non_blocking=True) for k, v in arrays.items()}

# -----------------------------------------------------------------------------
# encoders


class SmallTextEncoder(nn.Module):
    """Token + position embeddings, pre-LN Blocks (bidirectional, padding keys masked), LayerNorm, mean pool."""

    def __init__(self, vocab_size, context, n_embd=128, n_layer=2, n_head=4, dropout=0.0):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.pos_embed = nn.Parameter(torch.randn(1, context, n_embd) * 0.02)  # 'pos_embed': no weight decay
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([models.Block(n_embd, n_head, 4.0, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-6)
        self.width = self.out_dim = n_embd
        nn.init.normal_(self.wte.weight, std=0.02)

    def forward(self, tokens):
        B, T = tokens.shape
        mask = tokens != PAD_ID  # (B, T); position 0 (BOS) is always real
        x = self.drop(self.wte(tokens) + self.pos_embed[:, :T])
        for block in self.blocks:
            x = block(x, attn_mask=mask[:, None, None, :])  # (B, 1, 1, T): padding keys invisible to every query
        x = self.ln_f(x)  # (B, T, C)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1)
        return x, pooled, mask

    def layer_ids(self):
        L = len(self.blocks)
        ids = {n: (int(n.split(".")[1]) + 1 if n.startswith("blocks.") else L + 1 if n.startswith("ln_f") else 0)
               for n, _ in self.named_parameters()}
        return ids, L


class ClipTextEncoder(nn.Module):
    """model_clip.py's text tower (causal CLIP transformer or BERT): hidden states for cross-attention, the
    tower's own pooled + projected embedding (end-of-text token / [CLS]) for concatenation."""

    def __init__(self, a):
        super().__init__()
        a = {**model_clip.CLIP_DEFAULTS, **a}  # clip_args_from_weights gives only what the file shows
        if a["text_model"] == "causal":
            self.tower = model_clip.TextTransformer(a["embed_dim"], a["vocab_size"], a["context_length"], a["text_width"],
                                                    a["text_layers"], a["text_heads"], a["text_mlp_ratio"], a["text_act"],
                                                    a["text_eps"], a["eot_id"], a["text_dropout"], a["grad_checkpoint"])
        elif a["text_model"] == "bert":
            self.tower = model_clip.BertTextEncoder(a["embed_dim"], a["vocab_size"], a["text_width"], a["text_layers"],
                                                    a["text_heads"], a["text_mlp_ratio"], a["text_eps"], a["max_position"],
                                                    a["type_vocab_size"], a["pad_id"], a["text_proj"], a["text_dropout"],
                                                    a["grad_checkpoint"])
        else:
            raise ValueError(f"text tower: text_model must be causal or bert, got {a['text_model']!r}")
        self.kind, self.width, self.out_dim = a["text_model"], a["text_width"], a["embed_dim"]

    def forward(self, tokens):
        t = self.tower
        B, T = tokens.shape
        if self.kind == "bert":
            h = t.hidden_states(tokens)
            return h, t.proj(h[:, 0]), tokens != t.pad_id
        x = t.token_embedding(tokens) + t.pos_embed[:T]
        x = t.ln_final(model_clip.run_blocks(t.blocks, x, t.grad_checkpoint))
        eot = (tokens == t.eot_id).int().argmax(dim=1)
        mask = torch.arange(T, device=tokens.device)[None] <= eot[:, None]  # tokens up to end-of-text (CLIP pad id 0 is '!')
        return x, t.proj(x[torch.arange(B, device=x.device), eot]), mask

    def layer_ids(self):
        ids, n = self.tower.layer_ids()
        return {f"tower.{k}": v for k, v in ids.items()}, n


class ModernBertTextEncoder(nn.Module):
    """model_bert.py's ModernBERT: hidden states (B, T, C) for cross-attention, [CLS] / mean pooling for concat."""

    def __init__(self, a):
        super().__init__()
        self.tower = model_bert.ModernBert(a)
        self.width = self.out_dim = a["hidden_size"]

    def forward(self, tokens):
        mask = tokens != self.tower.pad_id
        h = self.tower(tokens, mask)
        return h, self.tower.pool(h, mask), mask

    def layer_ids(self):
        ids, n = self.tower.layer_ids()
        return {f"tower.{k}": v for k, v in ids.items()}, n


class ClipVisionEncoder(nn.Module):
    """model_clip.py's CLIP ViT image tower without its projection: pooled = ln_post(class token), which is
    CLIP.encode_image(x, normalize=False) before visual.proj; tokens = ln_post(patch tokens) (B, grid^2, width)."""

    def __init__(self, a, tokens=False):
        super().__init__()
        a = {**model_clip.CLIP_DEFAULTS, **a}
        if a["image_model"] != "clip_vit":
            raise ValueError(f"vision_encoder='clip' takes a CLIP ViT image tower, not image_model={a['image_model']!r}: "
                             f"use vision_encoder='model' with --model={a['image_model']} (the tower's network loads as it is)")
        self.tower = model_clip.VisionTransformer(a["embed_dim"], a["image_size"], a["patch_size"], a["vision_width"],
                                                  a["vision_layers"], a["vision_heads"], a["vision_mlp_ratio"], a["in_chans"],
                                                  a["ln_pre"], a["patch_bias"], a["vision_act"], a["vision_eps"],
                                                  a["drop_path"], a["grad_checkpoint"])
        self.tower.proj = nn.Identity()  # the fusion projects each modality itself; CLIP's projection is not used
        self._tokens = tokens
        self.out_dim = self.token_dim = a["vision_width"]

    def forward(self, x):
        t = self.tower
        x = t.patch_embed(x).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        x = torch.cat([t.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1) + t.pos_embed.to(x.dtype)
        x = t.ln_post(model_clip.run_blocks(t.blocks, t.ln_pre(x), t.grad_checkpoint))  # LayerNorm per token
        return x[:, 0], (x[:, 1:] if self._tokens else None)

    def layer_ids(self):
        ids, n = self.tower.layer_ids()
        return {f"tower.{k}": v for k, v in ids.items() if k in dict(self.tower.named_parameters())}, n


def _token_module(net):
    """The submodule whose output is the spatial feature map / token sequence, and its layout."""
    if isinstance(net, models.ConvNeXt):
        return net.stages[-1].blocks[-1], "nchw"
    if isinstance(net, models.ViT):
        return net.ln_f, "tokens_cls"
    if isinstance(net, models.TorchvisionClassifier):
        name = net.model_args["model"][3:]
        for attr in ("features", "layer4"):
            if hasattr(net.net, attr):
                return getattr(net.net, attr), ("nhwc" if name.startswith("swin") else "nchw")
    raise ValueError(f"fusion='cross_attention' needs the spatial features of {net.model_args['model']}, which fusion.py "
                     f"does not know how to reach: use fusion='concat', or a convnext_* / vit_* / tv:resnet* / "
                     f"tv:densenet* / tv:efficientnet* / tv:convnext_* model")


class VisionEncoder(nn.Module):
    """A model.py image network whose head is Identity: forward -> (pooled (B, C), tokens (B, T, Ct) or None)."""

    def __init__(self, name, in_chans, image_size, drop_path=0.0, dropout=0.0, grad_checkpoint=False, tokens=False):
        super().__init__()
        self.net = models.build_model(name, num_classes=1, in_chans=in_chans, image_size=image_size,
                                      drop_path=drop_path, dropout=dropout, grad_checkpoint=grad_checkpoint)
        head = self.net.head_names[0]
        parent, _, attr = head.rpartition(".")
        (self.net.get_submodule(parent) if parent else self.net).__setattr__(attr, nn.Identity())
        self.source_head = head  # where a train.py checkpoint of this network keeps its classifier
        self.net.head_names = ()  # inside the fusion model the whole network is the encoder
        self._tokens, self._layout, self._out = tokens, None, None
        if tokens:
            module, self._layout = _token_module(self.net)
            module.register_forward_hook(self._keep)
        with torch.no_grad():  # feature sizes from one small forward (eval: BatchNorm must not see it)
            was = self.net.training
            self.net.eval()
            pooled, tok = self(torch.zeros(1, in_chans, image_size, image_size))
            self.net.train(was)
        self.out_dim = pooled.shape[-1]
        self.token_dim = tok.shape[-1] if tok is not None else 0

    def _keep(self, module, inputs, output):
        self._out = output

    def forward(self, x):
        pooled = self.net(x)
        if not self._tokens:
            return pooled, None
        out, self._out = self._out, None
        if self._layout == "nchw":
            out = out.flatten(2).transpose(1, 2)  # (B, h*w, C)
        elif self._layout == "nhwc":
            out = out.flatten(1, 2)
        else:
            out = out[:, 1:]  # ViT: the patch tokens after the final LayerNorm (the [CLS] token is `pooled`)
        return pooled, out

    def layer_ids(self):
        ids, n = self.net.layer_ids()
        return {f"net.{k}": v for k, v in ids.items() if k in dict(self.net.named_parameters())}, n


class ClinicalEncoder(nn.Module):
    def __init__(self, in_dim, hidden=64, dropout=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU())
        self.out_dim = hidden

    def forward(self, x):
        return self.net(x)

# -----------------------------------------------------------------------------
# fusion: per-modality LayerNorm + projection, optional cross-attention, MLP; then the 2-layer head


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to text tokens (keys/values), pre-LN, residual, then an MLP (residual)."""

    def __init__(self, d, n_head, dropout=0.0):
        super().__init__()
        assert d % n_head == 0, f"fusion_dim={d} must be divisible by fusion_heads={n_head}"
        self.n_head, self.dropout = n_head, dropout
        self.ln_q, self.ln_kv, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.kv, self.proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.mlp = models.MLP(d, 4 * d, dropout)

    def forward(self, img, txt, txt_mask):
        B, Tq, C = img.shape
        Tk, nh = txt.shape[1], self.n_head
        q = self.q(self.ln_q(img)).view(B, Tq, nh, C // nh).transpose(1, 2)  # (B, nh, Tq, hs)
        k, v = self.kv(self.ln_kv(txt)).split(C, dim=2)
        k = k.view(B, Tk, nh, C // nh).transpose(1, 2)
        v = v.view(B, Tk, nh, C // nh).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=txt_mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        x = img + self.proj(y.transpose(1, 2).reshape(B, Tq, C))
        return x + self.mlp(self.ln_2(x))


class Fusion(nn.Module):
    """modality_dropout p: in training, each sample loses each modality's projected features with probability p
    (zeroed; one modality always stays), so the head cannot lean on the strongest branch alone (gradient starvation
    of the weaker ones: Wu et al. 2022, "Characterizing and overcoming the greedy nature of learning in multi-modal
    deep neural networks"; Neverova et al. 2016 ModDrop)."""

    def __init__(self, dims, d, mode, token_dims=None, n_head=4, dropout=0.3, modality_dropout=0.0):
        super().__init__()
        self.mode, self.modality_dropout = mode, modality_dropout
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(k), nn.Linear(k, d)) for m, k in dims.items()})
        n = len(dims)
        if mode == "cross_attention":
            self.img_tokens = nn.Linear(token_dims["vision"], d)
            self.txt_tokens = nn.Linear(token_dims["text"], d)
            self.xattn = CrossAttention(d, n_head)
            self.ln_x = nn.LayerNorm(d)
            n += 1
        self.mlp = nn.Sequential(nn.Linear(n * d, d), nn.GELU(), nn.Dropout(dropout))

    def forward(self, pooled, tokens=None):
        h = [self.proj[m](pooled[m]) for m in self.proj]  # ModuleDict keeps the canonical modality order
        if self.training and self.modality_dropout > 0 and len(h) > 1:
            B, n = h[0].shape[0], len(h)
            keep = torch.rand(B, n, device=h[0].device) >= self.modality_dropout  # (B, n)
            none = ~keep.any(1)
            keep[none, torch.randint(0, n, (int(none.sum()),), device=keep.device)] = True  # never drop every modality
            h = [x * keep[:, i:i + 1].to(x.dtype) for i, x in enumerate(h)]
        if self.mode == "cross_attention":
            img, (txt, mask) = self.img_tokens(tokens["vision"]), tokens["text"]
            x = self.xattn(img, self.txt_tokens(txt), mask)  # (B, Tv, d)
            h.append(self.ln_x(x.mean(1)))
        return self.mlp(torch.cat(h, dim=1))


class FusionClassifier(models.Classifier):
    # model.freeze_backbone / param_groups / is_head_param treat these as the head: stage 1 of two_stage trains
    # them at the full LR while the vision and text encoders stay frozen (and in eval mode)
    head_names = ("clinical", "fusion", "head", "vision_head")

    def __init__(self, a):
        super().__init__()
        self.modalities = mods = parse_modalities(a["modalities"])
        if a["fusion"] not in ("concat", "cross_attention"):
            raise ValueError(f"fusion must be concat or cross_attention, got {a['fusion']!r}")
        cross = a["fusion"] == "cross_attention"
        if cross and not {"vision", "text"} <= set(mods):
            raise ValueError(f"fusion='cross_attention' lets image tokens attend to text tokens: modalities must hold "
                             f"vision and text, got {a['modalities']!r} (use fusion='concat')")
        dims, token_dims = {}, {}
        if "vision" in mods and a["vision_encoder"] == "clip":
            if not a["vision_args"]:
                raise ValueError("vision_encoder='clip' needs vision_args (the CLIP architecture): pass vision_init=<BiomedCLIP "
                                 "/ open_clip weights or a train_clip.py checkpoint> when building the model")
            self.vision = ClipVisionEncoder({**a["vision_args"], "image_size": a["image_size"], "in_chans": a["in_chans"],
                                             "drop_path": a["drop_path"], "grad_checkpoint": a["grad_checkpoint"]}, tokens=cross)
            dims["vision"], token_dims["vision"] = self.vision.out_dim, self.vision.token_dim
        elif "vision" in mods:
            if a["vision_encoder"] != "model":
                raise ValueError(f"vision_encoder must be model or clip, got {a['vision_encoder']!r}")
            self.vision = VisionEncoder(a["vision_model"], a["in_chans"], a["image_size"], a["drop_path"], a["vision_dropout"],
                                        a["grad_checkpoint"], tokens=cross)
            dims["vision"], token_dims["vision"] = self.vision.out_dim, self.vision.token_dim
        if "text" in mods:
            if a["text_encoder"] == "small":
                self.text = SmallTextEncoder(a["text_vocab_size"], a["text_context"], a["text_width"], a["text_layers"],
                                             a["text_heads"], a["text_dropout"])
            elif a["text_encoder"] == "clip":
                if not a["text_args"]:
                    raise ValueError("text_encoder='clip' needs text_args (the CLIP architecture): pass text_init=<checkpoint "
                                     "or weights file> when building the model")
                self.text = ClipTextEncoder(a["text_args"])
            elif a["text_encoder"] == "modernbert":
                if not a["text_args"]:
                    raise ValueError("text_encoder='modernbert' needs text_args (the ModernBERT config): pass text_init=<Hugging "
                                     "Face ModernBERT folder> when building the model")
                self.text = ModernBertTextEncoder(a["text_args"])
            else:
                raise ValueError(f"text_encoder must be small, clip or modernbert, got {a['text_encoder']!r}")
            dims["text"], token_dims["text"] = self.text.out_dim, self.text.width
        if "clinical" in mods:
            if a["clinical_dim"] < 1:
                raise ValueError("modalities include 'clinical' but no clinical variables: set clinical_columns (e.g. 'age,sex,view')")
            self.clinical = ClinicalEncoder(a["clinical_dim"], a["clinical_hidden"])
            dims["clinical"] = self.clinical.out_dim
        d = a["fusion_dim"]
        self.fusion = Fusion(dims, d, a["fusion"], token_dims, a["fusion_heads"], a["fusion_dropout"], a["modality_dropout"])
        self.head = nn.Sequential(nn.Dropout(a["head_dropout"]), nn.Linear(d, a["head_hidden"]), nn.GELU(),
                                  nn.Dropout(a["head_dropout2"]), nn.Linear(a["head_hidden"], a["num_classes"]))
        for m in (self.fusion, self.head) + ((self.clinical,) if "clinical" in mods else ()):
            m.apply(models.init_weights)
        if a["text_with_head"] and "text" in mods:  # a from-scratch text encoder: nothing to protect by freezing it
            self.head_names = type(self).head_names + ("text",)
        # vision_logits: the image model's own classifier stays, as a residual path beside the fused head (logits =
        # fused head + vision_head(pooled image features)); load_vision_init copies the image model's head into it
        # and the fused head's last layer starts at zero, so training starts from the image model's predictions and
        # the fused head learns what the other modalities add (instead of relearning the image findings from a
        # fresh head in a few hundred steps: the vision row of that recipe ends below the image model it started from)
        self.vision_head = None
        if a["vision_logits"] and "vision" in mods:
            self.vision_head = nn.Linear(dims["vision"], a["num_classes"])
            self.vision_head.apply(models.init_weights)
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def forward(self, x=None, text_tokens=None, clinical=None):
        pooled, tokens = {}, {}
        given = {"vision": x, "text": text_tokens, "clinical": clinical}
        missing = [m for m in self.modalities if given[m] is None]
        if missing:
            raise ValueError(f"FusionClassifier({','.join(self.modalities)}): no input for {missing} "
                             f"(forward(x, text_tokens=..., clinical=...); fusion.batch_inputs makes them)")
        if "vision" in self.modalities:
            pooled["vision"], tokens["vision"] = self.vision(x)
        if "text" in self.modalities:
            h, pooled["text"], mask = self.text(text_tokens)
            tokens["text"] = (h, mask)
        if "clinical" in self.modalities:
            pooled["clinical"] = self.clinical(clinical)
        logits = self.head(self.fusion(pooled, tokens))
        return logits if self.vision_head is None else logits + self.vision_head(pooled["vision"])

    def encoder_names(self):
        return [m for m in ("vision", "text") if m in self.modalities]

    def layer_ids(self):
        """Layer-wise LR decay inside each encoder; the text encoder's depth is rescaled to the vision encoder's."""
        ids, n = {}, None
        if "vision" in self.modalities:
            v, n = self.vision.layer_ids()
            ids.update({f"vision.{k}": i for k, i in v.items()})
        if "text" in self.modalities:
            t, nt = self.text.layer_ids()
            r = 1.0 if n is None else (n + 1) / (nt + 1)
            ids.update({f"text.{k}": round(i * r) for k, i in t.items()})
            n = nt if n is None else n
        return ids, 1 if n is None else n

    def dummy_inputs(self, batch=1, device="cpu"):
        a = self.model_args
        kw = {}
        if "vision" in self.modalities:
            kw["x"] = torch.zeros(batch, a["in_chans"], a["image_size"], a["image_size"], device=device)
        if "text" in self.modalities:
            kw["text_tokens"] = torch.ones(batch, a["text_context"], dtype=torch.long, device=device)
        if "clinical" in self.modalities:
            kw["clinical"] = torch.zeros(batch, a["clinical_dim"], device=device)
        return kw

# -----------------------------------------------------------------------------
# construction from plain args (stored as model_args in checkpoints), weights, FLOPs

FUSION_DEFAULTS = dict(
    model="fusion", modalities="all", fusion="concat", num_classes=10,
    vision_encoder="model", vision_args=None, vision_model="convnext_atto", in_chans=1, image_size=64, drop_path=0.0, vision_dropout=0.0, grad_checkpoint=False,
    text_encoder="small", text_column="indication", text_tokenizer="byte", text_tokenizer_path="", text_context=64,
    text_vocab_size=258, text_width=128, text_layers=2, text_heads=4, text_dropout=0.1, text_args=None,
    clinical_spec=None, clinical_dim=0, clinical_hidden=64,
    fusion_dim=256, fusion_heads=4, fusion_dropout=0.3, modality_dropout=0.0, head_hidden=128, head_dropout=0.3, head_dropout2=0.2,
    vision_logits=False, text_with_head=False)


def build_fusion(**kwargs):
    unknown = set(kwargs) - set(FUSION_DEFAULTS)
    if unknown:
        raise ValueError(f"build_fusion: unknown argument(s) {sorted(unknown)}; valid: {sorted(FUSION_DEFAULTS)}")
    a = {**FUSION_DEFAULTS, **kwargs}
    a["modalities"] = ",".join(parse_modalities(a["modalities"]))
    if a["clinical_spec"] is not None:
        a["clinical_dim"] = clinical_dim(a["clinical_spec"])
    if a["text_encoder"] == "small":
        a["text_vocab_size"] = SmallTokens(a["text_tokenizer"], a["text_tokenizer_path"]).vocab_size
    net = FusionClassifier(a)
    net.model_args = a
    return net


def build_any(model_args):
    """Rebuild any train.py checkpoint's network: fusion models and plain model.py classifiers."""
    if model_args.get("model") == "fusion":
        return build_fusion(**model_args)
    return models.build_model(**model_args)


def text_args_from(path):
    """(CLIP architecture args, tokenizer settings or None) of a train_clip.py checkpoint or open_clip / HF /
    BiomedCLIP weights, for text_encoder='clip'."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"text_init={path!r} not found: a train_clip.py checkpoint (out/<run>/best.pt) or a "
                                f"CLIP weights file / Hugging Face folder")
    obj = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) and path.endswith((".pt", ".pth")) else None
    if isinstance(obj, dict) and "model_args" in obj and "text_model" in obj["model_args"]:
        c = obj.get("config", {})
        tok = {"text_tokenizer": c.get("tokenizer", "clip"), "text_tokenizer_path": c.get("tokenizer_path", ""),
               "text_context": c.get("context_length", obj["model_args"]["context_length"])}
        return dict(obj["model_args"]), tok
    return model_clip.clip_args_from_weights(path), None


def vision_args_from(path):
    """CLIP architecture args of a train_clip.py checkpoint or open_clip / HF / BiomedCLIP weights, for
    vision_encoder='clip' (the image tower must be a CLIP ViT)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"vision_init={path!r} not found: BiomedCLIP's open_clip_pytorch_model.bin (or any open_clip "
                                f"/ Hugging Face CLIP weights) or a train_clip.py checkpoint (out/<run>/best.pt)")
    obj = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) and path.endswith((".pt", ".pth")) else None
    if isinstance(obj, dict) and "model_args" in obj and "image_model" in obj["model_args"]:
        return dict(obj["model_args"])
    return model_clip.clip_args_from_weights(path)


def _load_clip_vision(net, path):
    """A whole CLIP is built and loaded (model_clip.load_clip_weights: every layout, RGB filters summed for gray input,
    position grid resampled to our image_size), then its image tower minus the projection is copied."""
    a = net.model_args
    clip = model_clip.build_clip(**{**a["vision_args"], "image_size": a["image_size"], "in_chans": a["in_chans"]})
    rep = model_clip.load_clip_weights(clip, path)
    sd = {k[len("visual."):]: v for k, v in clip.state_dict().items() if k.startswith("visual.") and k != "visual.proj.weight"}
    net.vision.tower.load_state_dict(sd, strict=True)
    return f"vision encoder <- {path} ({rep['layout']}, {len(sd)} tensors{'; ' + '; '.join(rep['adapted']) if rep['adapted'] else ''})"


def _load_small_text(net, path):
    """The small text encoder of another fusion run (e.g. a text-only run trained first, the text counterpart of the
    quick start's image network): its architecture and tokenizer must be ours."""
    obj = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None
    if not (isinstance(obj, dict) and obj.get("model_args", {}).get("model") == "fusion" and "text" in
            parse_modalities(obj["model_args"]["modalities"]) and obj["model_args"]["text_encoder"] == "small"):
        raise ValueError(f"text_init={path!r}: text_encoder='small' starts from a train.py fusion checkpoint with a small "
                         f"text encoder (e.g. out/<run with --modalities=text>/best.pt)")
    src, own = obj["model_args"], net.model_args
    diff = [k for k in ("text_tokenizer", "text_tokenizer_path", "text_context", "text_width", "text_layers", "text_heads")
            if src[k] != own[k]]
    if diff:
        raise ValueError(f"text_init={path}: its text encoder differs in {', '.join(f'{k}={src[k]!r}' for k in diff)}: "
                         f"set the same values")
    sd = {k[len("text."):]: v for k, v in obj["model"].items() if k.startswith("text.")}
    net.text.load_state_dict(sd, strict=True)
    return f"text encoder <- {path} (small, {len(sd)} tensors)"


def load_text_init(net, path):
    """Copy the text tower of a CLIP checkpoint / weights file (or a ModernBERT folder) into net.text (strict)."""
    if isinstance(getattr(net, "text", None), SmallTextEncoder):
        return _load_small_text(net, path)
    if isinstance(getattr(net, "text", None), ModernBertTextEncoder):
        net.text.tower.load_state_dict(model_bert.read_state_dict(path), strict=True)
        return f"text encoder <- {path} (ModernBERT, {len(net.text.tower.state_dict())} tensors)"
    if not isinstance(getattr(net, "text", None), ClipTextEncoder):
        raise ValueError("text_init loads a CLIP / BERT text tower: set text_encoder='clip' (and modalities with text)")
    obj = torch.load(path, map_location="cpu", weights_only=True) if path.endswith((".pt", ".pth")) else None
    if isinstance(obj, dict) and "model_args" in obj and isinstance(obj.get("model"), dict):
        sd = obj["model"]
    else:
        clip = model_clip.build_clip(**net.model_args["text_args"])
        model_clip.load_clip_weights(clip, path)
        sd = clip.state_dict()
    sd = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    net.text.tower.load_state_dict(sd, strict=True)
    return f"text encoder <- {path} ({len(sd)} tensors)"


def _require_classifier(net, path, head=None):
    """vision_logits needs the image model's classifier (head: the source's, as vision_head's state dict): weights
    without one (torchvision / timm / CLIP files, other classes) are refused rather than leaving vision_head at random."""
    if net.vision_head is not None and head is None:
        raise ValueError(f"vision_logits=True keeps the image model's classifier, but {path} is not a train.py "
                         f"checkpoint with one over {net.vision_head.out_features} classes: start from a train.py "
                         f"checkpoint of the same classes, or set --vision_logits=False")


def _source_head(sd, args, fc, vision_head):
    """The classifier of a train.py / fusion checkpoint as vision_head's state dict (same shape), or None."""
    if vision_head is None:
        return None
    if args.get("model") == "fusion":
        head = {k[len("vision_head."):]: t for k, t in sd.items() if k.startswith("vision_head.")}
    elif "image_model" in args:
        return None  # a CLIP's image tower has no classifier
    else:
        head = {k[len(fc) + 1:]: t for k, t in sd.items() if k.startswith(fc + ".")}
    own = vision_head.state_dict()
    return head if head.keys() == own.keys() and all(head[k].shape == own[k].shape for k in own) else None


def load_vision_init(net, path):
    """Vision encoder weights from a train.py checkpoint, a train_clip.py checkpoint whose image tower is a
    model.py network (visual.net.*), or anything model.load_pretrained reads; the source head is dropped. With
    vision_encoder='clip': a CLIP ViT image tower from open_clip / HF / BiomedCLIP weights or a train_clip.py checkpoint."""
    if isinstance(net.vision, ClipVisionEncoder):
        _require_classifier(net, path)
        return _load_clip_vision(net, path)
    v = net.vision.net
    obj = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) and path.endswith((".pt", ".pth")) else None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "model_args" in obj:
        sd, args = obj["model"], obj["model_args"]
        if args.get("model") == "fusion":
            sd = {k[len("vision.net."):]: t for k, t in sd.items() if k.startswith("vision.net.")}
            name = args["vision_model"]
        elif "image_model" in args:
            sd = {k[len("visual.net."):]: t for k, t in sd.items() if k.startswith("visual.net.")}
            name = args["image_model"]
        else:
            name = args["model"]
        if name != v.model_args["model"]:
            raise ValueError(f"vision_init={path} holds a {name} image network but vision model is "
                             f"{v.model_args['model']!r}: use --model={name}")
        own = v.state_dict()
        head = _source_head(sd, args, net.vision.source_head, net.vision_head)
        sd = {k: t for k, t in sd.items() if k in own}  # the source's head (num_classes or embed_dim) is not ours
        missing = [k for k in own if k not in sd]
        if missing:
            raise ValueError(f"vision_init={path}: the checkpoint lacks {missing[:5]} of {v.model_args['model']}")
        v.load_state_dict(sd, strict=True)
        _require_classifier(net, path, head)
        if head is not None:
            net.vision_head.load_state_dict(head)
        return f"vision encoder <- {path} ({len(sd)} tensors{'; its classifier -> vision_head' if head else ''})"
    _require_classifier(net, path)
    models.load_pretrained(v, path)
    return f"vision encoder <- {path} (load_pretrained)"


def estimate_flops(net, device="cpu"):
    """Forward FLOPs of one sample (all its modalities), as model.estimate_flops counts them."""
    raw = models.unwrap(net)
    return models.count_flops(raw, lambda: raw(**raw.dummy_inputs(1, device)))


def fusion_args_from_cfg(cfg, num_classes, train_split):
    """build_fusion kwargs from train.py's config (knob names as in train.py) and the train split (clinical stats)."""
    a = dict(modalities=cfg["modalities"], fusion=cfg["fusion_mode"], num_classes=num_classes, vision_model=cfg["model"],
             vision_encoder=cfg.get("vision_encoder", "model"),
             in_chans=cfg["in_chans"], image_size=cfg["image_size"], drop_path=cfg["drop_path"], vision_dropout=cfg["dropout"],
             grad_checkpoint=cfg["grad_checkpoint"], text_encoder=cfg["text_encoder"], text_column=cfg["text_column"],
             text_tokenizer=cfg["text_tokenizer"], text_tokenizer_path=cfg["text_tokenizer_path"],
             text_context=cfg["text_context"], text_width=cfg["text_width"], text_layers=cfg["text_layers"],
             text_heads=cfg["text_heads"], fusion_dim=cfg["fusion_dim"], fusion_dropout=cfg["fusion_dropout"],
             modality_dropout=cfg.get("modality_dropout", 0.0), vision_logits=cfg.get("vision_logits", False),
             text_with_head=cfg.get("text_with_head", False),
             head_dropout=cfg["head_dropout"], head_dropout2=cfg["head_dropout2"])
    mods = parse_modalities(cfg["modalities"])
    if "clinical" in mods:
        a["clinical_spec"] = clinical_spec(train_split.index, cfg["clinical_columns"])
    if "text" in mods and cfg["text_encoder"] == "clip":
        if not cfg["text_init"]:
            raise ValueError("text_encoder='clip' needs text_init=<train_clip.py checkpoint or CLIP weights file>")
        a["text_args"], tok = text_args_from(cfg["text_init"])
        if tok is not None and cfg["text_tokenizer"] == "auto":  # the tokenizer the CLIP was trained with
            a.update(text_tokenizer=tok["text_tokenizer"], text_tokenizer_path=tok["text_tokenizer_path"],
                     text_context=min(cfg["text_context"], tok["text_context"]))
    if "vision" in mods and a["vision_encoder"] == "clip":
        if not cfg.get("vision_init"):
            raise ValueError("vision_encoder='clip' needs vision_init=<BiomedCLIP open_clip_pytorch_model.bin, open_clip / HF "
                             "CLIP weights, or a train_clip.py checkpoint>")
        a["vision_args"] = vision_args_from(cfg["vision_init"])
    if "text" in mods and cfg["text_encoder"] == "modernbert":
        if not cfg["text_init"]:
            raise ValueError("text_encoder='modernbert' needs text_init=<Hugging Face ModernBERT folder: config.json + "
                             "model.safetensors + tokenizer.json>")
        a["text_args"] = model_bert.read_config(cfg["text_init"])
        if cfg["text_tokenizer"] == "auto":
            a.update(text_tokenizer="hf", text_tokenizer_path=cfg["text_tokenizer_path"] or cfg["text_init"])
    if a["text_tokenizer"] == "auto":
        a["text_tokenizer"] = "byte" if cfg["text_encoder"] == "small" else "clip"
    if cfg["text_column"] == "text" and "text" in mods:
        print("fusion: text_column='text' feeds the report itself; labels mined from reports (CheXpert, MIMIC, the "
              "phantom) are then readable from the input and the AUC measures the labeler, not the model")
    return a
