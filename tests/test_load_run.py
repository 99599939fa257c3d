"""runs.load_run: one loader for every checkpoint family (classifier, fusion, pruned / int8 export, CLIP, GPT),
and evaluate.py on what it rebuilds."""

import csv
import os

import numpy as np
import pytest
import torch

import data
import evaluate
import export
import fusion
import model_clip
import model as models
import runs
import sample
import train
from model_gpt import GPT, GPTConfig, gpt_config_to_dict

TINY = ["--image_size=32", "--batch_size=8", "--eval_batch_size=64", "--tensorboard_log=False", "--max_iters=2",
        "--eval_interval=2", "--lr_decay_iters=2", "--warmup_iters=1", "--log_interval=1"]
EVAL = ["--split=test", "--n_bootstrap=0", "--figures=False", "--tensorboard=False", "--device=cpu"]


def _predictions(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows


@pytest.mark.slow  # train + evaluate end to end (~175 s for the pruned one with the machine 8x oversubscribed)
def test_evaluate_a_fusion_run(tmp_path, tiny_phantom):
    out = str(tmp_path / "fusion")
    train.main([f"--data_dir={tiny_phantom}", f"--out_dir={out}", *TINY, "--modalities=all", "--text_width=32",
                "--text_heads=2"])
    rep = evaluate.main([f"--ckpt={out}/best.pt", *EVAL])
    split = data.PreparedSplit(tiny_phantom, "test")
    assert rep["n_images"] == len(split) and rep["model"] == "fusion" and np.isfinite(rep["auc_macro"])
    # the probabilities are the fusion model's on image + text + clinical inputs, not on the image alone
    net, meta, config = runs.load_run(f"{out}/best.pt")
    assert config["modalities"] == "all" and meta["classes"] == rep["classes"]
    arrays = fusion.split_inputs(split, net.model_args)
    x = runs.model_input(torch.from_numpy(np.array(split.images[:16]))[:, None], meta, net.model_args)
    with torch.no_grad():
        want = torch.sigmoid(net(x, **fusion.batch_inputs(arrays, np.arange(16), "cpu"))).numpy()
    rows = _predictions(os.path.join(out, "predictions_test.csv"))
    got = np.array([[float(r[c]) for c in meta["classes"]] for r in rows[:16]])
    np.testing.assert_allclose(got, want, atol=2e-6)
    with pytest.raises(ValueError, match="fusion model also reads"):
        evaluate.main([f"--ckpt={out}/best.pt", f"--predict_csv={tmp_path / 'x.csv'}", "--device=cpu"])


@pytest.mark.slow
def test_evaluate_a_pruned_export(tmp_path, tiny_phantom):
    """export.py's pruned.pt (resized Linears, fewer heads) through evaluate.py; int8.pt loads through the same
    path (tests/test_export.py: test_int8_vit_is_3x_smaller_with_same_auc, test_static_int8_conv_net_round_trip)."""
    out = str(tmp_path / "vit")
    train.main([f"--data_dir={tiny_phantom}", f"--out_dir={out}", *TINY, "--model=vit_tiny"])
    fast = ["--latency_iters=1", "--latency_warmup=0", "--latency_batch=2", "--max_eval_images=32"]
    export.main([f"--ckpt={out}/best.pt", "--to=pruned", "--prune_amount=0.3", *fast])
    for name in ("pruned",):
        net, meta, _ = runs.load_run(f"{out}/{name}.pt")
        assert net.run_info["export"] == name and net.run_info["script"] == "export.py"
        rep = evaluate.main([f"--ckpt={out}/{name}.pt", *EVAL, f"--out_dir={tmp_path / name}"])
        assert rep["export"] == name and rep["n_images"] == len(data.PreparedSplit(tiny_phantom, "test"))
        # evaluate.py's probabilities are those of the rebuilt export
        x = runs.model_input(torch.from_numpy(np.array(data.PreparedSplit(tiny_phantom, "test").images[:8]))[:, None],
                               meta, net.model_args)
        with torch.no_grad():
            want = torch.sigmoid(net(x)).numpy()
        rows = _predictions(tmp_path / name / "predictions_test.csv")
        got = np.array([[float(r[c]) for c in meta["classes"]] for r in rows[:8]])
        np.testing.assert_allclose(got, want, atol=2e-6)
    pruned, _, _ = runs.load_run(f"{out}/pruned.pt")
    dense, _, _ = runs.load_run(f"{out}/best.pt")
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())
    assert all(b.attn.n_head == 2 for b in pruned.blocks)  # vit_tiny's 3 heads, one pruned


def _tiny_gpt(path, script=True):
    torch.manual_seed(0)
    net = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    ck = {"model": net.state_dict(), "model_args": gpt_config_to_dict(net.config), "config": {},
          "data": {"dir": "x", "kind": "text"}, "tokenizer": {"kind": "byte"}}
    if script:
        ck["script"] = "train_gpt.py"
    torch.save(ck, path)
    return net


def test_gpt_and_clip_round_trip_and_wrong_family_sentences(tmp_path):
    gpt = _tiny_gpt(tmp_path / "gpt.pt", script=False)  # no script key: the family comes from model_args
    net, meta, _ = runs.load_run(str(tmp_path / "gpt.pt"), reader="sample.py")
    idx = torch.randint(0, 32, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(net(idx)[0], gpt.eval()(idx)[0])
    assert meta["kind"] == "text" and net.run_info["tokenizer"] == {"kind": "byte"}
    with pytest.raises(ValueError, match=r"gpt.pt is a train_gpt.py checkpoint; sample.py reads it, evaluate.py does not"):
        evaluate.main([f"--ckpt={tmp_path / 'gpt.pt'}", "--device=cpu"])

    torch.manual_seed(0)
    clip = model_clip.build_clip(embed_dim=16, image_model="clip_vit", image_size=16, patch_size=8, vision_width=16,
                                 vision_layers=1, vision_heads=2, in_chans=1, vocab_size=40, context_length=8,
                                 text_width=16, text_layers=1, text_heads=2, eot_id=39).eval()
    torch.save({"model": clip.state_dict(), "model_args": clip.model_args, "config": {}, "meta": {}}, tmp_path / "clip.pt")
    again, _, _ = runs.load_run(str(tmp_path / "clip.pt"))
    img = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(img), clip.encode_image(img))
    with pytest.raises(ValueError, match="clip.pt is a train_clip.py checkpoint; .* read it, export.py does not"):
        export.load_model(str(tmp_path / "clip.pt"))

    # a classifier handed to sample.py
    cls = models.build_model("convnext_atto", num_classes=3, in_chans=1, image_size=32)
    torch.save({"model": cls.state_dict(), "model_args": cls.model_args, "meta": {}, "config": {}}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="c.pt is a train.py checkpoint; evaluate.py, .* read it, sample.py does not"):
        sample.main([f"--ckpt_path={tmp_path / 'c.pt'}", "--device=cpu"])
    with pytest.raises(FileNotFoundError, match="not found"):
        runs.load_run(str(tmp_path / "missing.pt"))


def test_ema_weights(tmp_path):
    torch.manual_seed(0)
    net = models.build_model("convnext_atto", num_classes=3, in_chans=1, image_size=32)
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save({"model": net.state_dict(), "model_args": net.model_args, "ema": ema, "meta": {}, "config": {}},
               tmp_path / "e.pt")
    got, _, _ = runs.load_run(str(tmp_path / "e.pt"), weights="ema")
    assert all(torch.equal(got.state_dict()[k], ema[k]) for k in ema)
    torch.save({"model": net.state_dict(), "model_args": net.model_args, "ema": None}, tmp_path / "n.pt")
    with pytest.raises(ValueError, match="no EMA weights"):
        runs.load_run(str(tmp_path / "n.pt"), weights="ema")
