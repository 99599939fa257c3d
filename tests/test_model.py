"""model.py against the reference implementations: torchvision and timm state dicts load into our ConvNeXt / ViT
and give the same logits; stem / head / position-embedding adaptation; optimizer groups; linear probe; checkpointing."""

import urllib.error
import warnings

import pytest
import torch

import model as M

timm = pytest.importorskip("timm")  # a test dependency (requirements-test.txt): the reference implementation
torchvision = pytest.importorskip("torchvision")


def randomize(net, seed=0):
    """Make every key's mapping matter: the weight matrices are random already; move biases and norms away from
    their constant init (0 / 1) and layer scale from 1e-6 to O(0.3) so the residual branches dominate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("gamma", "layer_scale")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 or name.endswith(("cls_token", "class_token")) or not p.any():  # (tv ViT head: zeros)
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def saved(net, path):
    torch.save(net.state_dict(), path)
    return str(path)


def max_diff(a, b):
    return (a - b).abs().max().item()

# -----------------------------------------------------------------------------
# same logits as the references


@pytest.mark.parametrize("ref_name, ours_name", [("tv:convnext_tiny", "convnext_tiny"), ("timm:convnext_atto", "convnext_atto")])
def test_convnext_matches_reference(tmp_path, ref_name, ours_name):
    torch.manual_seed(0)
    lib, name = ref_name.split(":")
    ref = randomize(torchvision.models.get_model(name) if lib == "tv" else timm.create_model(name))
    ours = M.build_model(ours_name, num_classes=1000, in_chans=3, image_size=64).eval()
    report = M.load_pretrained(ours, saved(ref, tmp_path / "w.pth"))
    assert report["layout"] == ("torchvision" if lib == "tv" else "timm")
    assert not report["missing"] and not report["unexpected"] and not report["reset"], report
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert want.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    assert max_diff(got, want) <= 1e-4
    with torch.no_grad():  # channels_last input, the layout train.py can ask for
        assert max_diff(ours(x.contiguous(memory_format=torch.channels_last)), want) <= 1e-4


@pytest.mark.parametrize("ref_name, ours_name", [("timm:vit_tiny_patch16_224", "vit_tiny"), ("tv:vit_b_16", "vit_base")])
def test_vit_matches_reference(tmp_path, ref_name, ours_name):
    torch.manual_seed(0)
    lib, name = ref_name.split(":")
    ref = randomize(torchvision.models.get_model(name) if lib == "tv" else timm.create_model(name))
    ours = M.build_model(ours_name, num_classes=1000, in_chans=3, image_size=224).eval()
    report = M.load_pretrained(ours, saved(ref, tmp_path / "w.pth"))
    assert not report["missing"] and not report["unexpected"] and not report["reset"], report
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert want.abs().max() > 0.5
    assert max_diff(got, want) <= 1e-4


def test_vit_pos_embed_resampled_like_timm(tmp_path):
    """A 224 px checkpoint in a 64 px model: position embeddings resampled 14x14 -> 4x4 as timm does."""
    torch.manual_seed(0)
    ref224 = randomize(timm.create_model("vit_tiny_patch16_224"))
    path = saved(ref224, tmp_path / "w.pth")
    # timm's own resampling (checkpoint_filter_fn); dynamic_img_size also resamples for other input sizes
    ref64 = timm.create_model("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True).eval()
    ref64.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(torch.load(path), ref64))
    ours = M.build_model("vit_tiny", num_classes=1000, in_chans=3, image_size=64).eval()
    report = M.load_pretrained(ours, path)
    assert report["adapted"] == ["pos_embed 196->16 tokens"]
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        assert max_diff(ours(x), ref64(x)) <= 1e-4
        x96 = torch.randn(1, 3, 96, 96)  # a 96 px input into the 64 px model: resampled on the fly
        assert max_diff(ours(x96), ref64(x96)) <= 1e-4


def test_head_reset_keeps_backbone(tmp_path):
    torch.manual_seed(0)
    ref = randomize(timm.create_model("convnext_atto"))
    ours = M.build_model("convnext_atto", num_classes=5, in_chans=3, image_size=64).eval()
    report = M.load_pretrained(ours, saved(ref, tmp_path / "w.pth"))
    assert sorted(report["reset"]) == ["head.bias", "head.weight"] and not report["missing"]
    assert ours.head.weight.shape == (5, 320) and ours.head.bias.abs().max() == 0  # fresh init, not a slice
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_diff(ours.forward_features(x), ref.forward_head(ref.forward_features(x), pre_logits=True)) <= 1e-4
        assert ours(x).shape == (2, 5)

# -----------------------------------------------------------------------------
# 1-channel X-rays meet 3-channel checkpoints: gray model(g) == RGB model(g, g, g)


@pytest.mark.parametrize("name, ref_fn", [
    ("convnext_atto", lambda: timm.create_model("convnext_atto")),
    ("tv:resnet18", lambda: torchvision.models.resnet18()),
    ("vit_cxr", lambda: M.build_model("vit_cxr", num_classes=1000, in_chans=3, image_size=64)),
])
def test_gray_adaptation(tmp_path, name, ref_fn):
    torch.manual_seed(0)
    path = saved(randomize(ref_fn()), tmp_path / "w.pth")
    rgb = M.build_model(name, num_classes=1000, in_chans=3, image_size=64).eval()
    gray = M.build_model(name, num_classes=1000, in_chans=1, image_size=64).eval()
    M.load_pretrained(rgb, path)
    report = M.load_pretrained(gray, path)
    assert len(report["adapted"]) == 1 and "3->1 channels" in report["adapted"][0]
    g = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        want = rgb(g.repeat(1, 3, 1, 1))
        assert max_diff(gray(g), want) <= 1e-5 * max(1.0, want.abs().max().item())  # fp32 rounding (resnet: ~1e3 logits)


@pytest.mark.parametrize("name", ["tv:densenet121", "tv:efficientnet_b0"])
def test_torchvision_models_gray_n_classes(name):
    net = M.build_model(name, num_classes=7, in_chans=1, image_size=64).eval()
    first = dict(net.named_parameters())[net.first_conv]
    assert first.shape[1] == 1
    with torch.no_grad():
        assert net(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    assert M.build_model(**net.model_args).state_dict().keys() == net.state_dict().keys()


def test_file_formats(tmp_path):
    """safetensors, a nanorad checkpoint {'model': ...} with DDP / compile prefixes, all load the same."""
    torch.manual_seed(0)
    src = randomize(M.build_model("vit_cxr", num_classes=3, in_chans=1, image_size=32))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        want = src(x)
    torch.save({"model": {"_orig_mod.module." + k: v for k, v in src.state_dict().items()}, "model_args": src.model_args},
               tmp_path / "ckpt.pt")
    paths = [str(tmp_path / "ckpt.pt")]
    try:
        from safetensors.torch import save_file
        save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
        paths.append(str(tmp_path / "w.safetensors"))
    except ImportError:
        pass
    for path in paths:
        dst = M.build_model(**src.model_args).eval()
        report = M.load_pretrained(dst, path)
        assert report["layout"] == "nanorad" and not report["missing"] and not report["unexpected"]
        with torch.no_grad():
            assert torch.equal(dst(x), want)


def test_torchvision_weights_offline_error(monkeypatch, tmp_path):
    """Without network the error says what failed and how to proceed (a local file)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, whatever this machine has downloaded

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # offline even on a machine with network
    net = M.build_model("convnext_tiny", num_classes=2, image_size=64)
    with pytest.raises(RuntimeError) as e:
        M.load_pretrained(net, "torchvision:ConvNeXt_Tiny_Weights.IMAGENET1K_V1")
    msg = str(e.value)
    assert "could not download ConvNeXt_Tiny_Weights.IMAGENET1K_V1" in msg and "pretrained_path=" in msg
    assert "convnext_tiny-983f1562.pth" in msg
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        M.load_pretrained(net, "torchvision:ConvNeXt_Tiny_Weights.NOPE")


def test_mismatched_checkpoint_is_an_error(tmp_path):
    path = saved(timm.create_model("convnext_atto"), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="does not fit convnext_femto"):
        M.load_pretrained(M.build_model("convnext_femto", num_classes=2, image_size=64), path)

# -----------------------------------------------------------------------------
# sizes and FLOPs


def test_vit_cxr_size_and_tokens():
    net = M.build_model("vit_cxr", num_classes=14, in_chans=1, image_size=224)
    n = M.get_num_params(net)
    print(f"vit_cxr: {n / 1e6:.3f}M parameters, {net.grid}x{net.grid} tokens at 224 px")
    assert 4e6 <= n <= 6e6 and net.grid == 14
    assert M.get_num_params(net, non_embedding=True) == n - net.pos_embed.numel()


def test_estimate_flops_counts_attention():
    """vit_tiny at 224 against the closed form: patch embedding + 12 x (qkv, proj, mlp, attention) + head."""
    net = M.build_model("vit_tiny", num_classes=10, in_chans=3, image_size=224)
    T, C = 197, 192
    macs = 196 * C * 3 * 16 * 16 + 12 * (T * 12 * C * C + 2 * T * T * C) + C * 10
    assert M.estimate_flops(net, 224, 3) == pytest.approx(2 * macs, rel=0.01)
    assert net.training  # restored

# -----------------------------------------------------------------------------
# optimizer groups, linear probe, gradient checkpointing


@pytest.mark.parametrize("name", ["convnext_atto", "vit_cxr", "tv:resnet18"])
def test_param_groups(name):
    net = M.build_model(name, num_classes=4, in_chans=1, image_size=32)
    groups = M.param_groups(net, weight_decay=0.05, layer_decay=0.75, lr_backbone_mult=0.5)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in net.parameters()), "every parameter in exactly one group"
    names = {id(p): n for n, p in net.named_parameters()}
    for g in groups:
        assert {"params", "weight_decay", "lr_scale", "name"} <= g.keys()
        for p in g["params"]:
            n = names[id(p)]
            no_decay = p.ndim < 2 or n.endswith(("pos_embed", "cls_token", "gamma"))
            assert (g["weight_decay"] == 0.0) == no_decay, n
            assert (g["lr_scale"] == 1.0) == M.is_head_param(net, n), n  # head 1, everything else decayed
    # monotone in depth: parameters in registration order (input -> output) never get a smaller scale
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    ordered = [scale[id(p)] for n, p in net.named_parameters() if not n.startswith(("cls_token", "pos_embed"))]
    assert ordered == sorted(ordered) and ordered[0] < ordered[-1]
    ids, num_layers = net.layer_ids()
    assert min(scale.values()) == pytest.approx(0.5 * 0.75 ** (num_layers + 1))
    # defaults: few groups; frozen parameters in none
    assert len(M.param_groups(net, 0.05)) == 4
    M.freeze_backbone(net)
    groups = M.param_groups(net, 0.05, 0.75)
    assert sum(len(g["params"]) for g in groups) == 2 and all(g["name"].startswith("head") for g in groups)


@pytest.mark.parametrize("name", ["tv:resnet18", "vit_cxr"])
def test_linear_probe_leaves_backbone_identical(name):
    torch.manual_seed(0)
    net = M.build_model(name, num_classes=3, in_chans=1, image_size=32)
    groups = M.param_groups(net, weight_decay=0.1)  # built before freezing, as train.py does
    opt = torch.optim.AdamW(groups, lr=1e-2)
    M.freeze_backbone(net)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(2):
        loss = net(torch.randn(4, 1, 32, 32)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = net.state_dict()
    for k in before:
        if M.is_head_param(net, k):
            assert not torch.equal(before[k], after[k]), f"head {k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"backbone {k} changed (BN stats or weight decay)"
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    M.unfreeze(net)
    net.train()
    assert all(m.training for m in net.modules()) and all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("name", ["convnext_atto", "vit_cxr"])
def test_grad_checkpoint_same_grads(name):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = M.build_model(name, num_classes=3, in_chans=1, image_size=32, drop_path=0.2, grad_checkpoint=ckpt)
        x = torch.randn(2, 1, 32, 32)
        torch.manual_seed(1)  # same drop-path masks: checkpoint replays the RNG state
        net(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


@pytest.mark.parametrize("name", ["convnext_atto", "vit_cxr"])
def test_no_graph_breaks(name):
    import torch._dynamo
    net = M.build_model(name, num_classes=3, in_chans=1, image_size=32, drop_path=0.1, dropout=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = torch._dynamo.explain(net)(torch.randn(2, 1, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    dynamo = [str(w.message) for w in caught if "Dynamo" in str(w.message)]
    assert not dynamo, dynamo  # e.g. the CPU small-map depthwise path's lru_cache, traced through under compile


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match="convnext_tiny.*vit_cxr"):
        M.build_model("convnext_huge", num_classes=2)
    with pytest.raises(ValueError, match="tv:resnet50"):
        M.build_model("tv:resnet5O", num_classes=2)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (4, 4), (3, 5), (7, 7), (8, 8)])
def test_convnext_small_map_depthwise_equals_conv(hw):
    """The CPU path for small feature maps (one tap matrix per channel) gives the conv's outputs and gradients."""
    torch.manual_seed(0)
    blk = M.ConvNeXtBlock(12)
    with torch.no_grad():
        blk.dwconv.bias.normal_()
    x = torch.randn(5, 12, *hw, requires_grad=True)
    g = torch.randn(5, 12, *hw)
    ours = blk.depthwise(x)
    ref = blk.dwconv(x)
    assert ours.shape == ref.shape and (ours - ref).abs().max() < 1e-5
    grads = torch.autograd.grad(ours, (x, blk.dwconv.weight, blk.dwconv.bias), g)
    grads_ref = torch.autograd.grad(ref, (x, blk.dwconv.weight, blk.dwconv.bias), g)
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max() < 1e-4
    xl = x.detach().contiguous(memory_format=torch.channels_last)  # the layout inside the network
    assert (blk.depthwise(xl) - ref).abs().max() < 1e-5
