"""
ModernBERT (Warner et al. 2024, "Smarter, Better, Faster, Longer"): a bidirectional encoder with rotary position
embeddings, GeGLU feed-forward layers, pre-LayerNorm without biases, and attention that alternates between global
(every `global_attn_every_n_layers`-th layer, the first included) and local (a window of `local_attention`
tokens, +-local_attention/2 around each query). Clinical ModernBERT and the answerdotai checkpoints share it.

    enc, args = load_modernbert("path/to/Clinical-ModernBERT")   # a Hugging Face folder: config.json + model.safetensors
    h = enc(input_ids, attention_mask)                             # (B, T, hidden_size): equal to transformers' ModernBertModel
    pooled = enc.pool(h, attention_mask)                           # [CLS] or masked mean (config's classifier_pooling)

The parameter names are Hugging Face's (embeddings.tok_embeddings, layers.i.attn.Wqkv, ...), so a folder's state
dict loads as it is; a ModernBertFor* file's 'model.' prefix is stripped and its task head dropped. Unpadding (the
reference's packed variable-length path) is not implemented: padding keys are masked instead, which gives the
same hidden states at every real token.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as model_lib

# what a config.json may leave out: the values of transformers' ModernBertConfig (answerdotai/ModernBERT-base)
BERT_DEFAULTS = dict(
    vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12,
    hidden_activation="gelu", max_position_embeddings=8192, norm_eps=1e-5, norm_bias=False, attention_bias=False,
    mlp_bias=False, local_attention=128, global_attn_every_n_layers=3, layer_types=None, global_rope_theta=160000.0,
    local_rope_theta=10000.0, pad_token_id=50283, embedding_dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0,
    classifier_pooling="cls")

ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "relu": F.relu}


def bert_args_from_config(cfg):
    """Plain args (stored in checkpoints) from a Hugging Face ModernBERT config.json dict. Both layouts are read:
    layer_types + rope_parameters (transformers >= 5) and global_attn_every_n_layers + global/local_rope_theta."""
    a = {k: cfg.get(k, v) for k, v in BERT_DEFAULTS.items()}
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope:
        a["global_rope_theta"] = float(rope["full_attention"].get("rope_theta", a["global_rope_theta"]))
    if "sliding_attention" in rope:
        a["local_rope_theta"] = float(rope["sliding_attention"].get("rope_theta", a["local_rope_theta"]))
    for kind in ("full_attention", "sliding_attention"):
        t = (rope.get(kind) or {}).get("rope_type", "default")
        if t != "default":
            raise ValueError(f"ModernBERT config: rope_type {t!r} for {kind} is not supported (only 'default' RoPE)")
    if a["layer_types"] is None:
        n = a["global_attn_every_n_layers"]
        a["layer_types"] = ["sliding_attention" if i % n else "full_attention" for i in range(a["num_hidden_layers"])]
    a["layer_types"] = list(a["layer_types"])
    if len(a["layer_types"]) != a["num_hidden_layers"]:
        raise ValueError(f"ModernBERT config: layer_types has {len(a['layer_types'])} entries for "
                         f"num_hidden_layers={a['num_hidden_layers']}")
    if a["hidden_activation"] not in ACTIVATIONS:
        raise ValueError(f"ModernBERT config: hidden_activation {a['hidden_activation']!r} is not one of {sorted(ACTIVATIONS)}")
    if a["hidden_size"] % a["num_attention_heads"]:
        raise ValueError(f"ModernBERT config: hidden_size {a['hidden_size']} is not divisible by "
                         f"num_attention_heads {a['num_attention_heads']}")
    return a

# -----------------------------------------------------------------------------
# layers


def rope_cos_sin(T, head_dim, theta, device):
    """(T, head_dim) cos and sin of the rotary angles; the two halves of a head share frequencies (GPT-NeoX layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    ang = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv_freq[None]  # (T, hs/2)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs): rotate each (i, i + hs/2) pair by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def norm(a, width):
    return nn.LayerNorm(width, eps=a["norm_eps"], bias=a["norm_bias"])


class Embeddings(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.tok_embeddings = nn.Embedding(a["vocab_size"], a["hidden_size"])
        self.norm = norm(a, a["hidden_size"])
        self.drop = nn.Dropout(a["embedding_dropout"])

    def forward(self, ids):
        return self.drop(self.norm(self.tok_embeddings(ids)))


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        C = a["hidden_size"]
        self.n_head, self.dropout = a["num_attention_heads"], a["attention_dropout"]
        self.Wqkv = nn.Linear(C, 3 * C, bias=a["attention_bias"])
        self.Wo = nn.Linear(C, C, bias=a["attention_bias"])

    def forward(self, x, cos, sin, mask):
        B, T, C = x.shape
        q, k, v = self.Wqkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return F.dropout(self.Wo(y.transpose(1, 2).reshape(B, T, C)), self.dropout, self.training)


class GeGLU(nn.Module):
    """Wi makes [input, gate] (2 x intermediate_size); out = Wo(act(input) * gate)."""

    def __init__(self, a):
        super().__init__()
        C, H = a["hidden_size"], a["intermediate_size"]
        self.Wi = nn.Linear(C, 2 * H, bias=a["mlp_bias"])
        self.Wo = nn.Linear(H, C, bias=a["mlp_bias"])
        self.act, self.drop = ACTIVATIONS[a["hidden_activation"]], nn.Dropout(a["mlp_dropout"])

    def forward(self, x):
        h, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.drop(self.act(h) * gate))


class Layer(nn.Module):
    def __init__(self, a, i):
        super().__init__()
        C = a["hidden_size"]
        self.attn_norm = nn.Identity() if i == 0 else norm(a, C)  # the embeddings' LayerNorm serves layer 0
        self.attn = Attention(a)
        self.mlp_norm = norm(a, C)
        self.mlp = GeGLU(a)
        self.local = a["layer_types"][i] == "sliding_attention"

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))

# -----------------------------------------------------------------------------
# the encoder


class ModernBert(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.args = a
        self.embeddings = Embeddings(a)
        self.layers = nn.ModuleList([Layer(a, i) for i in range(a["num_hidden_layers"])])
        self.final_norm = norm(a, a["hidden_size"])
        self.width, self.pad_id = a["hidden_size"], a["pad_token_id"]
        self.apply(self.init_weights)

    @staticmethod
    def init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, ids, attention_mask=None):
        """ids (B, T) int64, attention_mask (B, T) 1 = token, 0 = padding (None: ids != pad_token_id) -> (B, T, C)."""
        B, T = ids.shape
        a = self.args
        if attention_mask is None:
            attention_mask = ids != self.pad_id
        keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): padding keys invisible to every query
        pos = torch.arange(T, device=ids.device)
        band = (pos[:, None] - pos[None, :]).abs() <= a["local_attention"] // 2  # (T, T) the local window
        masks = {False: keys, True: keys & band}
        hs = a["hidden_size"] // a["num_attention_heads"]
        rope = {False: rope_cos_sin(T, hs, a["global_rope_theta"], ids.device),
                True: rope_cos_sin(T, hs, a["local_rope_theta"], ids.device)}
        x = self.embeddings(ids)
        for layer in self.layers:
            cos, sin = rope[layer.local]
            x = layer(x, cos.to(x.dtype), sin.to(x.dtype), masks[layer.local])
        return self.final_norm(x)

    def pool(self, h, attention_mask):
        """(B, C): the first token ([CLS]) or the mean over real tokens, as config's classifier_pooling says."""
        if self.args["classifier_pooling"] == "mean":
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp(min=1)
        return h[:, 0]

    def layer_ids(self):
        """Layer-wise LR decay ids: embeddings 0, layer i -> i + 1, final_norm -> L + 1."""
        L = len(self.layers)
        ids = {n: (int(n.split(".")[1]) + 1 if n.startswith("layers.") else L + 1 if n.startswith("final_norm") else 0)
               for n, _ in self.named_parameters()}
        return ids, L

# -----------------------------------------------------------------------------
# Hugging Face folders


def read_config(path):
    """config.json of a Hugging Face ModernBERT folder -> plain args."""
    cfg = model_lib.read_hf_config(path, "modernbert", "text_init for text_encoder='modernbert' is a Hugging Face "
                                   "ModernBERT folder (config.json + model.safetensors), e.g. a download of "
                                   "answerdotai/ModernBERT-base")
    return bert_args_from_config(cfg)


def read_state_dict(path):
    """The encoder's tensors of a folder's model.safetensors (or pytorch_model.bin), HF names, 'model.' stripped."""
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        sd = load_file(st)
    elif os.path.isfile(pt):
        sd = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin (sharded files: merge "
                                f"them with transformers' save_pretrained(max_shard_size='100GB'))")
    sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k.startswith(("embeddings.", "layers.", "final_norm."))}  # MLM / task heads dropped


def load_modernbert(path, **overrides):
    """(ModernBert with the folder's weights, its args). overrides: dropouts or pooling, e.g. mlp_dropout=0.1."""
    a = {**read_config(path), **overrides}
    enc = ModernBert(a)
    sd = read_state_dict(path)
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not match its config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return enc, a
