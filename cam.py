"""
Where the model looked: Grad-CAM for conv nets, attention rollout for ViTs; used by evaluate.py --cam and --image.
"""

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import data
import metrics
import runs

# -----------------------------------------------------------------------------
# heatmaps: Grad-CAM on the last 4-D feature map (conv nets), attention rollout for ViTs


def _forward_with_hooks(net, x, hooks):
    """One no-grad forward pass for the hooks to observe; the hooks are removed even if it raises."""
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()


def _trace_outputs(net, x):
    """(name, module, output shape) of every module, in the order their forward calls finish."""
    seen, hooks = [], []
    for name, m in net.named_modules():
        if name:
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: seen.append((name, mod, tuple(out.shape)))
                if torch.is_tensor(out) else None))
    _forward_with_hooks(net, x, hooks)
    return seen


def _square(n):
    s = int(round(math.sqrt(n)))
    return s if s * s == n else 0


def find_cam_target(net, x):
    """Pick the heatmap method. Returns (method, target):
    'rollout' + list of attention modules that own a fused qkv Linear and a head count (ViT; the weights are
    recomputed from q, k in a hook, since F.scaled_dot_product_attention never materialises them), else
    'gradcam' + the module whose output is the last NCHW feature map (conv nets), else
    'gradcam_tokens' + the module whose output is the last (B, T, D) token sequence with a square grid."""
    seen = _trace_outputs(net, x)
    attn = [m for _, m, _ in seen if _qkv(m) is not None and _heads(m)]
    if attn:
        return "rollout", list(dict.fromkeys(attn))
    for name, m, shape in reversed(seen):
        if len(shape) == 4 and shape[2] == shape[3] and shape[2] > 1:
            return "gradcam", m
    for name, m, shape in reversed(seen):
        if len(shape) == 3 and shape[1] > 1:
            prefix = shape[1] - _square_floor(shape[1])
            if prefix <= 8 and _square(shape[1] - prefix) > 1:
                return "gradcam_tokens", m
    raise ValueError("no heatmap target: the model has neither a 4-D feature map nor a token sequence")


def _square_floor(n):
    return int(math.isqrt(n)) ** 2


def _qkv(m):
    """The fused q,k,v projection of an attention module (timm `qkv`, nanoGPT `c_attn`), or None."""
    for k in ("qkv", "c_attn"):
        lin = getattr(m, k, None)
        if isinstance(lin, torch.nn.Linear) and lin.out_features == 3 * lin.in_features:
            return lin
    return None


def _heads(m):
    for k in ("num_heads", "n_head", "nh", "heads"):
        v = getattr(m, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return 0


def _normalize_maps(cam, size):
    cam = F.interpolate(cam[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo = cam.flatten(1).min(1).values[:, None, None]
    hi = cam.flatten(1).max(1).values[:, None, None]
    return ((cam - lo) / (hi - lo).clamp(min=1e-8)).detach().cpu().numpy()


def heatmaps(net, x, class_idx, method, target):
    """Heatmaps (B, H, W) in [0, 1] for class class_idx[b] of each image x[b]. Attention rollout shows where
    the cls token looks, the same for every class; Grad-CAM is class-specific."""
    size = x.shape[-1]
    class_idx = torch.as_tensor(class_idx)
    if method == "rollout":
        atts, hooks = [], []
        for m in target:
            nh = _heads(m)

            def hook(mod, inp, out, nh=nh):
                B, T, three_d = out.shape
                q, k, _ = out.detach().reshape(B, T, 3, nh, three_d // (3 * nh)).permute(2, 0, 3, 1, 4)
                atts.append(torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1).mean(1))  # (B, T, T)
            hooks.append(_qkv(m).register_forward_hook(hook))
        _forward_with_hooks(net, x, hooks)
        T = atts[0].shape[-1]
        eye = torch.eye(T)
        R = eye.expand_as(atts[0]).clone()
        for a in atts:  # Abnar & Zuidema 2020: add the residual, renormalise, multiply through the layers
            a = 0.5 * a + 0.5 * eye
            R = (a / a.sum(-1, keepdim=True)) @ R
        prefix = T - _square_floor(T)
        g = _square(T - prefix)
        rows = R[:, 0, prefix:] if prefix > 0 else R[:, :, :].mean(1)
        return _normalize_maps(rows.reshape(-1, g, g), size)
    store = {}
    h = target.register_forward_hook(lambda mod, inp, out: store.__setitem__("a", out))
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)  # also makes a frozen backbone's activations need grad
            logits = net(xg)
            act = store["a"]
            score = logits.gather(1, class_idx[:, None].to(logits.device)).sum()
            grad, = torch.autograd.grad(score, act)
    finally:
        h.remove()
    act, grad = act.detach(), grad.detach()
    if method == "gradcam":  # Selvaraju et al. 2017: channel weights = spatially averaged gradients
        cam = F.relu((grad.mean((2, 3), keepdim=True) * act).sum(1))
    else:  # tokens (B, T, D): the same on the patch grid, prefix tokens (cls, registers) dropped
        T = act.shape[1]
        prefix = T - _square_floor(T)
        act, grad = act[:, prefix:], grad[:, prefix:]
        g = _square(act.shape[1])
        cam = F.relu((grad.mean(1, keepdim=True) * act).sum(-1)).reshape(-1, g, g)
    return _normalize_maps(cam, size)


def overlay(gray_u8, heat, min_size=224, strength=1.0):
    """Gray image (H, W) uint8 + heat (h, w) in [0,1] -> RGB uint8, a jet-like colour map at 40% x strength. Small
    images are enlarged (an integer factor, to >= 224 px) so that the overlay can be read. strength: the predicted
    probability of the class the map explains, so that a map normalised to its own maximum is not drawn saturated
    for a prediction near 0 (issue 36); 1 = the map alone."""
    from PIL import Image
    k = math.ceil(min_size / max(gray_u8.shape))
    if k > 1:
        gray_u8 = np.array(Image.fromarray(gray_u8).resize((gray_u8.shape[1] * k, gray_u8.shape[0] * k), Image.BILINEAR))
    H, W = gray_u8.shape
    heat = F.interpolate(torch.as_tensor(heat)[None, None].float(), size=(H, W), mode="bilinear",
                         align_corners=False)[0, 0].numpy()
    color = _heat_colors(heat) * 255
    base = np.repeat(gray_u8[..., None].astype(np.float64), 3, -1)
    a = 0.4 * float(np.clip(strength, 0.0, 1.0))
    return np.clip((1 - a) * base + a * color, 0, 255).astype(np.uint8)


def _heat_colors(heat):
    """The overlay's jet-like colour map: heat in [0,1] -> RGB in [0,1] (blue = 0, red = 1)."""
    return np.stack([np.clip(1.5 - np.abs(4 * heat - k), 0, 1) for k in (3, 2, 1)], -1)


def save_cam_png(path, rgb, method, class_name, prob, title=""):
    """Write an overlay (from overlay()) as a PNG a reader can interpret alone: a title naming the image, the method,
    the class and its probability, and a colour bar for the heat scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=100)
    ax.imshow(rgb)
    ax.set_axis_off()
    ax.set_title(f"{title + chr(10) if title else ''}{method}: {class_name}, p = {prob:.2f}", fontsize=10)
    cmap = ListedColormap(_heat_colors(np.linspace(0, 1, 256)))
    bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(f"{method} (normalized to the image's max), opacity 0.4 x p", fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def cam_cases(probs, labels, task, n):
    """Per class: (the n most confident true positives, the n worst errors) as row positions."""
    onehot = metrics.as_multilabel(labels, probs.shape[1], task)
    out = []
    for c in range(probs.shape[1]):
        y, p = onehot[:, c], probs[:, c]
        pos = np.nonzero(y == 1)[0]
        tp = pos[np.argsort(-p[pos], kind="stable")][:n]
        known = np.nonzero(~np.isnan(y))[0]
        err = np.abs(y[known] - p[known])
        order = np.argsort(-err, kind="stable")[:n]
        out.append((tp, known[order][err[order] > 0.5]))  # errors = wrong side of 0.5, the worst first
    return out


def write_cams(net, meta, images, probs, labels, classes, model_cols, n, cam_dir, tb=None, device="cpu"):
    """Heatmap overlays for the n most confident true positives and n worst errors of each class. net: a
    runs.load_run model (its model_args), meta: the run's meta (normalization, task)."""
    os.makedirs(cam_dir, exist_ok=True)
    x0 = runs.model_input(torch.from_numpy(np.array(images[:1]))[:, None].to(device), meta, net.model_args)
    method, target = find_cam_target(net, x0)
    written = 0
    for c, (tp, worst) in enumerate(cam_cases(probs, labels, meta["task"], n)):
        for kind, rows in (("tp", tp), ("err", worst)):
            if len(rows) == 0:
                continue
            u8 = np.array(images[np.sort(rows)])
            order = np.argsort(np.argsort(rows))  # images were read in sorted order (memmap-friendly)
            x = runs.model_input(torch.from_numpy(u8)[:, None].to(device), meta, net.model_args)
            maps = heatmaps(net, x, [model_cols[c]] * len(rows), method, target)
            for k, r in enumerate(rows):
                j = order[k]
                img = overlay(u8[j], maps[j], strength=float(probs[r, c]))
                fname = f"{metrics.safe_name(classes[c])}_{kind}{k}_row{int(r)}_p{probs[r, c]:.2f}.png"
                title = f"{'confident true positive' if kind == 'tp' else 'worst error'} {k}, row {int(r)}"
                save_cam_png(os.path.join(cam_dir, fname), img, method, classes[c], float(probs[r, c]), title)
                if tb is not None:
                    tb.add_image(f"cam/{classes[c]}/{kind}{k}", img, 0, dataformats="HWC")
                written += 1
    return method, written


def load_image(path, size):
    """A PNG/JPG/DICOM exactly as prepare stores it (data.decode_image): grayscale, the long side resized to
    `size` keeping the aspect ratio, padded black to size x size. Returns uint8 (size, size)."""
    return np.array(data.decode_image(path, size), dtype=np.uint8)
