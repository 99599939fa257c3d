"""GPT (model_gpt.py), text_data.py, train_gpt.py and sample.py: references, invariants, and real learning."""

import json
import os
import socket

import numpy as np
import pytest
import torch

import data
import text_data
import tokenizer as tok_lib
from model_gpt import GPT, POS_SCHEMES, GPTConfig, sample_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw):
    args = dict(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_embd=32, bias=True)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


@pytest.fixture(scope="session")
def reports_dir(tmp_path_factory):
    """Phantom reports, byte-level BPE: 3000 reports (~400k characters, ~25 tokens per report)."""
    out = tmp_path_factory.mktemp("phantom_reports")
    text_data.main(["--dataset=phantom_reports", "--tokenizer=bpe", "--vocab_size=1024", "--n_images=3000", f"--out_dir={out}"])
    return str(out)


# -----------------------------------------------------------------------------
# the model against references and its own invariants


@pytest.mark.parametrize("safe", [True, False])
def test_hf_gpt2_identical_logits(tmp_path, safe):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_positions=40, n_embd=48, n_layer=2, n_head=4, vocab_size=97,
                                     bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # GPT2's init zeroes biases; random ones test the bias mapping too
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hf.save_pretrained(str(tmp_path), safe_serialization=safe)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()
    cropped = GPT.from_pretrained(str(tmp_path), block_size=16).eval()
    with torch.no_grad():
        assert torch.allclose(cropped(idx[:, :16])[0], ref[:, :16], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos", POS_SCHEMES)
@pytest.mark.parametrize("cond", ["text", "image"])
def test_kv_cache_generation_equals_no_cache(pos, cond):
    """Greedy generation with the KV cache == recomputing the whole context, token for token, including past
    block_size where both slide the window."""
    model = tiny(pos=pos, n_prefix=4 if cond == "image" else 0, image_size=32).eval()
    images = torch.randn(3, 1, 32, 32) if cond == "image" else None
    idx = torch.randint(0, 61, (3, 5))
    a = model.generate(idx, 40, temperature=0, images=images, use_cache=True)
    b = model.generate(idx, 40, temperature=0, images=images, use_cache=False)
    assert torch.equal(a, b)
    with torch.no_grad():  # the first generated token is the argmax of a plain forward
        logits, _ = model(idx, images=images)
    assert torch.equal(a[:, 5], logits[:, -1].argmax(-1))


def test_finding_head_prefix_and_aux_loss():
    """n_classes > 0: one more prefix token per finding (its probability), generation with the cache still equals
    recomputing, and labels add aux_cls_weight * BCE of the finding head to the LM loss (NaN labels skipped)."""
    model = tiny(n_prefix=4, image_size=32, n_classes=3, aux_cls_weight=0.5, block_size=48).eval()
    assert model.prefix_len == 7
    images, idx = torch.randn(2, 1, 32, 32), torch.randint(0, 61, (2, 6))
    a = model.generate(idx, 30, temperature=0, images=images, use_cache=True)
    assert torch.equal(a, model.generate(idx, 30, temperature=0, images=images, use_cache=False))
    labels = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0]])
    with torch.no_grad():
        _, lm = model(idx[:, :-1], idx[:, 1:], images=images)
        _, both = model(idx[:, :-1], idx[:, 1:], images=images, labels=labels)
        p = model.classify(images)
    known = ~torch.isnan(labels)
    bce = torch.nn.functional.binary_cross_entropy(p[known], labels[known])
    assert both.item() == pytest.approx(lm.item() + 0.5 * bce.item(), rel=1e-5)


def test_backbone_finding_head_from_classifier_and_hard_tags(tmp_path):
    """A backbone encoder's finding head is its own classifier: load_class_head copies a train.py checkpoint's head
    over the same classes, so classify() equals that classifier; finding_tags='hard' feeds the decision
    p >= threshold (the present / absent embedding exactly), not p; given tags (teacher forcing: train_gpt.py's
    tag_forcing) replace the decision where they are not NaN."""
    import model as models
    torch.manual_seed(1)
    clf = models.build_model("convnext_atto", num_classes=3, in_chans=1, image_size=32)
    torch.save({"model": clf.state_dict(), "meta": {"classes": ["a", "b", "c"]}}, tmp_path / "best.pt")
    gpt = tiny(n_prefix=2, image_size=32, n_classes=3, aux_cls_weight=1.0, block_size=48, image_encoder="convnext_atto",
               prefix_width=8, finding_tags="hard").eval()
    enc = gpt.prefix.encoder
    models.load_image_init(enc.net, str(tmp_path / "best.pt"))
    assert enc.load_class_head(str(tmp_path / "best.pt"), ["a", "c", "b"]) == []  # other class order: left alone
    assert len(enc.load_class_head(str(tmp_path / "best.pt"), ["a", "b", "c"])) == 2  # head weight + bias
    images = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gpt.classify(images), torch.sigmoid(clf.eval()(images)), atol=1e-5, rtol=0)
        p = gpt.classify(images)
        gpt.prefix.thresholds.copy_(p[0])  # image 0 sits exactly on every threshold: all present
        tokens, _ = gpt.prefix(images)
    absent, present = gpt.prefix.finding_emb[0], gpt.prefix.finding_emb[1]
    tags = tokens[:, 2:]
    for i in range(4):
        for k in range(3):
            want = present[k] if p[i, k] >= p[0, k] else absent[k]
            torch.testing.assert_close(tags[i, k], want, atol=1e-6, rtol=0)
    nan = float("nan")
    forced = torch.tensor([[0.0, 1.0, nan], [nan, nan, nan], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    with torch.no_grad():
        tokens_forced, logits = gpt.prefix(images, forced)
    torch.testing.assert_close(torch.sigmoid(logits), p, atol=1e-6, rtol=0)  # the head itself is unchanged
    for i in range(4):
        for k in range(3):
            decided = p[i, k] >= p[0, k] if torch.isnan(forced[i, k]) else forced[i, k] == 1
            torch.testing.assert_close(tokens_forced[i, 2 + k], present[k] if decided else absent[k], atol=1e-6, rtol=0)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert all(sample_logits(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    # top_p=0.5: token 1 holds 0.64 of the mass, so it alone survives
    assert all(sample_logits(logits, 1.0, top_p=0.5, generator=g).item() == 1 for _ in range(20))
    draws = {sample_logits(logits, 1.0, top_p=0.9, generator=g).item() for _ in range(200)}
    assert draws == {1, 2, 3}, "top_p=0.9 keeps tokens 1, 3, 2 (0.64+0.24+0.09) and drops token 0 (0.03)"
    model = tiny().eval()
    eos_out = model.generate(torch.zeros(2, 1, dtype=torch.long), 10, temperature=0,
                             eos=int(model.generate(torch.zeros(2, 1, dtype=torch.long), 1, temperature=0)[0, 1]))
    assert eos_out.size(1) == 2, "generation stops when every row has produced eos"


def test_grad_checkpoint_same_gradients():
    grads = []
    for ckpt in (False, True):
        for pos in POS_SCHEMES:
            model = tiny(pos=pos, dropout=0.1, grad_checkpoint=ckpt).train()
            torch.manual_seed(1)
            idx = torch.randint(0, 61, (4, 32))
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for g0, g1 in zip(grads[:3], grads[3:]):
        assert torch.allclose(g0, g1, atol=1e-6, rtol=1e-5), (g0 - g1).abs().max()


def test_params_flops_and_groups():
    model = tiny(n_prefix=4, image_size=32)
    groups = model.param_groups(0.1, prefix_lr_mult=3.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters())), "each parameter in exactly one group"
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    fast = {id(p) for g in groups if g["lr_scale"] == 3.0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in no_decay) == (p.dim() < 2 or name.endswith("prefix_pos")), name
        assert (id(p) in fast) == name.startswith("prefix."), name
    n = model.get_num_params()
    assert n == sum(p.numel() for p in model.parameters()) - 32 * 32  # minus the position table
    n_prefix = sum(p.numel() for p in model.prefix.parameters())
    assert model.flops_per_token(32) == 6 * (n - n_prefix) + 12 * 2 * 4 * 8 * 32
    assert model.transformer.wte.weight is model.lm_head.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 2) ** 0.5) < 0.004, "scaled residual init"


def _train_tiny(model, data, T, steps, seed=0):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        starts = text_data.text_windows(len(data), T, 16, seed, step)
        x, y = (torch.from_numpy(a) for a in text_data.text_batch(data, starts, T))
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _eval_loss(model, data, T):
    starts = text_data.eval_windows(len(data), T, 48)
    x, y = (torch.from_numpy(a) for a in text_data.text_batch(data, starts, T))
    with torch.no_grad():
        return model(x, y)[1].item()


def test_alibi_extrapolates_to_twice_the_context(reports_dir):
    """Trained at T=32, evaluated at 64: ALiBi stays finite and close; learned positions cannot even run."""
    train, val = text_data.load_bin(reports_dir, "train"), text_data.load_bin(reports_dir, "val")
    vocab = data.load_meta(reports_dir)["vocab_size"]
    torch.manual_seed(0)
    model = _train_tiny(GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=4, n_embd=64, pos="alibi")),
                        train, 32, 150)
    at_t, at_2t = _eval_loss(model, val, 32), _eval_loss(model, val, 64)
    print(f"alibi: val loss {at_t:.3f} at T=32, {at_2t:.3f} at 2T=64")
    assert np.isfinite(at_2t) and at_2t <= 1.5 * at_t
    assert at_t < 0.8 * data.load_meta(reports_dir)["unigram_entropy"], "the model must have learned something"
    learned = GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(AssertionError, match="cannot extrapolate"):
        learned(torch.zeros(1, 64, dtype=torch.long))


# -----------------------------------------------------------------------------
# text_data: samplers, preparation, metrics


def test_samplers_are_pure_and_cover_the_batch():
    a = text_data.text_windows(10_000, 64, 24, seed=3, step=7)
    assert np.array_equal(a, text_data.text_windows(10_000, 64, 24, seed=3, step=7))
    assert not np.array_equal(a, text_data.text_windows(10_000, 64, 24, seed=3, step=8))
    for world, accum in ((1, 4), (2, 2), (4, 1)):
        rows = np.concatenate([m for r in range(world) for m in data.rank_micro_indices(a, r, world, accum)])
        assert np.array_equal(rows, a)
    # (image, report) pairs use data.py's epoch sampler, as train.py does
    seen = np.concatenate([data.global_batch_indices(50, 10, 0, s) for s in range(5)])
    assert np.array_equal(np.sort(seen), np.arange(50)), "one epoch = every row once"


def test_labeler_exact_on_phantom_and_negation():
    phantom = pytest.importorskip("phantom")
    d = phantom.generate(3000, image_size=16, seed=5)
    pred = np.stack([text_data.label_report(r["text"], d["classes"]) for r in d["records"]])
    assert np.array_equal(pred, d["labels"]), "the labeler must recover the phantom's labels exactly"
    lab = lambda t: {c for c, v in zip(text_data.FINDINGS, text_data.label_report(t)) if v}  # noqa: E731
    assert lab("No pneumothorax.") == {"No Finding"}
    assert lab("No pleural effusion or pneumothorax. Heart is not enlarged.") == {"No Finding"}
    assert lab("Small left effusion but no pneumothorax.") == {"Pleural Effusion"}
    assert lab("Cardiomegaly. ET tube in place. Without consolidation.") == {"Cardiomegaly", "Support Devices"}
    assert lab("Pneumothorax has resolved.") == {"No Finding"}


def test_bleu_rouge_and_f1():
    ref = ["small left pleural effusion . no pneumothorax ."]
    assert text_data.bleu4(ref, ref) == pytest.approx(1.0) and text_data.rouge_l(ref, ref) == pytest.approx(1.0)
    assert text_data.bleu4(["heart normal"], ref) == 0.0
    # LCS("left pleural effusion", "small left pleural effusion .") = 3: P=1, R=3/5
    p, r, b = 1.0, 3 / 5, 1.2
    assert text_data.rouge_l(["left pleural effusion"], ["small left pleural effusion ."]) == pytest.approx(
        (1 + b * b) * p * r / (r + b * b * p))
    # hand count: 1-grams 4/5, 2-grams 3/4, 3-grams 2/3, 4-grams 1/2, no brevity penalty (5 == 5 words)
    hyp, ref2 = ["a b c d x"], ["a b c d e"]
    assert text_data.bleu4(hyp, ref2) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    s = text_data.finding_scores(np.array([[1, 0], [1, 1], [0, 0]]), np.array([[1, 0], [0, 1], [1, np.nan]]), ["A", "B"])
    assert s["A"]["precision"] == 0.5 and s["A"]["recall"] == 0.5 and s["B"]["f1"] == 1.0
    assert s["macro_f1"] == pytest.approx(0.75)


def test_interrupted_pairs_rewrite_is_not_taken_as_finished(tmp_path, monkeypatch):
    """Preparing a pairs folder again removes its meta.json first and writes it last (data.write_prepared): a rewrite
    that dies half-way leaves no meta.json, so reading it says what to run instead of mixing new tokens with old
    images."""
    args = ["--dataset=phantom_pairs", "--tokenizer=bpe", "--vocab_size=300", "--n_images=60", "--image_size=16",
            f"--out_dir={tmp_path / 'pairs'}"]
    text_data.main(args)
    assert len(text_data.Pairs(str(tmp_path / "pairs"), "train")) > 0

    def dies(*a, **k):
        raise OSError("the machine went down")
    monkeypatch.setattr(data, "write_prepared", dies)
    with pytest.raises(OSError, match="went down"):
        text_data.main(args)
    assert (tmp_path / "pairs" / "train_tokens.npy").exists() and not (tmp_path / "pairs" / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="python text_data.py --dataset=phantom_pairs"):
        text_data.Pairs(str(tmp_path / "pairs"), "train")


def test_prepare_pairs_and_text_files(tmp_path):
    """phantom_pairs: rows decode to the reports, targets stop after the closing eot; text files: one doc a line."""
    meta = text_data.main(["--dataset=phantom_pairs", "--tokenizer=bpe", "--vocab_size=400", "--n_images=200",
                           "--image_size=32", f"--out_dir={tmp_path / 'pairs'}"])
    assert sum(meta["splits"].values()) == 200 and meta["truncated"] == 0
    pairs = text_data.Pairs(str(tmp_path / "pairs"), "train")
    tok = tok_lib.load(str(tmp_path / "pairs" / "tokenizer.json"))
    images, x, y = pairs.batch(np.array([3, 0]))
    assert images.shape == (2, 1, 32, 32) and x.shape == y.shape == (2, meta["max_tokens"] - 1)
    n = pairs.lengths[3]
    assert tok.decode(x[0, :n]) == pairs.index[3]["text"] and x[0, 0] == tok.eot_id
    assert y[0, n - 2] == tok.eot_id and (y[0, n - 1:] == -1).all() and (y[0, : n - 1] >= 0).all()
    ids = {r["patient_id"] for r in pairs.index}
    assert not ids & {r["patient_id"] for r in text_data.Pairs(str(tmp_path / "pairs"), "val").index}
    (tmp_path / "a.txt").write_text("first abstract about lungs.\nsecond abstract.\n\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("third abstract, on the heart.\n", encoding="utf-8")
    meta = text_data.main(["--dataset=text", f"--files={tmp_path / '*.txt'}", "--tokenizer=char", "--val_frac=0.0",
                           f"--out_dir={tmp_path / 'text'}"])
    assert meta["splits"]["train"]["documents"] == 3 and meta["splits"]["train"]["tokens"] == 4 + len(
        "first abstract about lungs.second abstract.third abstract, on the heart.")


def test_report_model_hard_tags_smoke(tmp_path):
    """cond='image' with finding_tags='hard': at each eval the thresholds are the finding head's F1-best per class on
    val, saved with the model, and the reports are scored on report_split='test'."""
    import train_gpt
    text_data.main(["--dataset=phantom_pairs", "--tokenizer=bpe", "--vocab_size=400", "--n_images=200",
                    "--image_size=32", f"--out_dir={tmp_path / 'pairs'}"])
    args = [f"--data_dir={tmp_path / 'pairs'}", f"--out_dir={tmp_path / 'run'}", "--cond=image", "--n_prefix=4",
            "--prefix_width=16", "--n_layer=1", "--n_head=2", "--n_embd=32", "--aux_cls_weight=1.0",
            "--finding_tags=hard", "--report_split=test", "--max_iters=2", "--tag_forcing=0.5", "--eval_interval=2",
            "--eval_reports=8", "--batch_size=8", "--warmup_iters=1", "--device=cpu", "--tensorboard=False"]
    res = train_gpt.main(args)
    assert res["report_split"] == "test" and len(res["thresholds"]) == 10 and 0 <= res["head_macro_f1"] <= 1
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ck["model"]["prefix.thresholds"].tolist() == pytest.approx(res["thresholds"], abs=1e-4)
    # the val loss is taken at the eval's own operating point: evaluating the saved model again gives the same number
    # (it used the thresholds of the eval before, here the initial ones, when they were chosen after the loss)
    again = train_gpt.main(args + ["--init_from=resume", "--eval_only=True"])
    assert again["val_loss"] == pytest.approx(res["val_loss"], rel=1e-6) and again["thresholds"] == res["thresholds"]
    import sample  # greedy: one report, whatever num_samples says (its default is 3)
    assert len(sample.main([f"--out_dir={tmp_path / 'run'}", "--image=test:0", "--temperature=0",
                            "--max_new_tokens=5"])) == 1
    for knob in ("--finding_tags=hard", "--tag_forcing=1.0"):
        with pytest.raises(ValueError, match="aux_cls_weight"):
            train_gpt.main([f"--data_dir={tmp_path / 'pairs'}", f"--out_dir={tmp_path / 'run2'}", "--cond=image",
                            knob, "--max_iters=0", "--device=cpu", "--tensorboard=False"])


def test_prepare_roco_text_and_gpt2_tokenizer(tmp_path, real_dir):
    """ROCO captions.txt layout from the real validation file; a GPT-2-format tokenizer (our BPE saved as
    vocab.json + merges.txt) gives the same ids as the bpe kind; decoding train.bin gives the captions back."""
    lines = (real_dir / "roco_validation_radiology_captions.txt").read_text(encoding="utf-8").splitlines()
    for split, chunk in (("train", lines[:1500]), ("validation", lines[1500:1800])):
        d = tmp_path / "roco" / split / "radiology"
        d.mkdir(parents=True)
        (d / "captions.txt").write_text("\n".join(chunk) + "\n", encoding="utf-8")
    meta = text_data.main(["--dataset=roco_text", f"--root={tmp_path / 'roco'}", "--tokenizer=bpe", "--vocab_size=600",
                           f"--out_dir={tmp_path / 'out'}"])
    assert meta["splits"]["train"]["documents"] == 1500 and meta["vocab_size"] == 600
    tok = tok_lib.load(str(tmp_path / "out" / "tokenizer.json"))
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    docs = [tok.decode(part) for part in np.split(ids, np.flatnonzero(ids == tok.eot_id))[1:-1]]
    assert docs == [line.split("\t", 1)[1].strip() for line in lines[:1500]]
    assert 0 < meta["unigram_entropy"] < np.log(600)
    gdir = tmp_path / "gpt2"
    gdir.mkdir()
    (gdir / "vocab.json").write_text(json.dumps(tok.encoder), encoding="utf-8")
    (gdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in tok.merges), encoding="utf-8")
    text_data.main(["--dataset=roco_text", f"--root={tmp_path / 'roco'}", "--tokenizer=gpt2", f"--gpt2_dir={gdir}",
                    f"--out_dir={tmp_path / 'out2'}"])
    assert np.array_equal(np.fromfile(tmp_path / "out2" / "val.bin", dtype=np.uint16),
                          np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16))


# -----------------------------------------------------------------------------
# the real entry points: train_gpt.main, sample.main


def _cfg(path):
    return os.path.join(ROOT, "config", path)


@pytest.mark.learning
def test_train_phantom_reports_learns_then_samples_and_resumes(reports_dir, tmp_path, capsys, learning):
    import sample
    import train_gpt
    out = str(tmp_path / "run")
    small = [_cfg("gpt_phantom_reports.py"), f"--data_dir={reports_dir}", f"--out_dir={out}", "--n_layer=2",
             "--n_embd=64", "--block_size=64", "--batch_size=16", "--eval_max_windows=40", "--tensorboard=False",
             "--log_interval=50"]
    res = train_gpt.main(small + ["--max_iters=150", "--eval_interval=75"])
    print(f"phantom reports: val loss {res['val_loss']:.3f} vs unigram entropy {res['unigram_entropy']:.3f}")
    learning("val loss / unigram entropy", res["val_loss"] / res["unigram_entropy"], 0.6, above=False)
    assert 0 < res["val_bpb"] < res["val_loss"] / np.log(2) / 2, "BPE tokens hold several bytes each"
    assert os.path.isfile(os.path.join(out, "ckpt.pt")) and os.path.isfile(os.path.join(out, "config.json"))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {r["split"] for r in records} == {"train", "val"}
    samples = sample.main([f"--out_dir={out}", "--start=No ", "--num_samples=2", "--max_new_tokens=60", "--temperature=0"])
    assert len(samples) == 1 and samples[0].startswith("No ")  # temperature 0 is greedy: one sample, not 2 copies
    assert "tokens/s" in capsys.readouterr().out
    # resume: continues from the checkpoint's step with its optimizer state
    res2 = train_gpt.main(small + ["--max_iters=160", "--eval_interval=80", "--init_from=resume"])
    assert res2["step"] == 160 and res2["val_loss"] < 1.1 * res["val_loss"]


def test_init_from_gpt2_evaluates_like_transformers_then_finetunes(reports_dir, tmp_path):
    """Data tokenized with GPT-2-format files; init_from=gpt2 (a tiny HF checkpoint) evaluates to the same val loss
    as transformers computes on the same windows; then finetune from that run's checkpoint."""
    transformers = pytest.importorskip("transformers")
    import train_gpt
    tok = tok_lib.load(os.path.join(reports_dir, "tokenizer.json"))
    gdir = tmp_path / "gpt2"
    gdir.mkdir()
    (gdir / "vocab.json").write_text(json.dumps(tok.encoder), encoding="utf-8")
    (gdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in tok.merges), encoding="utf-8")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                                              vocab_size=tok.vocab_size, bos_token_id=0, eos_token_id=0))
    hf.eval().save_pretrained(str(gdir))
    data = tmp_path / "data"
    text_data.main(["--dataset=phantom_reports", "--tokenizer=gpt2", f"--gpt2_dir={gdir}", "--n_images=600",
                    f"--out_dir={data}"])
    common_args = [f"--data_dir={data}", "--block_size=32", "--batch_size=8", "--eval_max_windows=16", "--tensorboard=False"]
    res = train_gpt.main(common_args + ["--init_from=gpt2", f"--init_path={gdir}", "--eval_only=True",
                                        f"--out_dir={tmp_path / 'eval'}"])
    val = text_data.load_bin(str(data), "val")
    x, y = (torch.from_numpy(a) for a in text_data.text_batch(val, text_data.eval_windows(len(val), 32, 16), 32))
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    assert res["val_loss"] == pytest.approx(ref, abs=1e-4)
    run1 = tmp_path / "run1"
    train_gpt.main(common_args + ["--init_from=gpt2", f"--init_path={gdir}", f"--out_dir={run1}", "--max_iters=4",
                                  "--eval_interval=4", "--warmup_iters=1"])
    res2 = train_gpt.main(common_args + ["--init_from=finetune", f"--init_path={run1}", f"--out_dir={tmp_path / 'ft'}",
                                         "--max_iters=4", "--eval_interval=4", "--warmup_iters=1", "--learning_rate=1e-3"])
    assert res2["step"] == 4 and np.isfinite(res2["val_loss"])
    with pytest.raises(ValueError, match="tokenizer differs"):
        train_gpt.main([f"--data_dir={reports_dir}", "--init_from=finetune", f"--init_path={run1}", "--max_iters=1",
                        f"--out_dir={tmp_path / 'bad'}", "--tensorboard=False"])


def _ddp_worker(rank, world, port, argv, q):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import train_gpt
    try:
        train_gpt.main(argv)
        q.put((rank, "ok"))
    except Exception as e:  # report to the parent, which fails the test with the message
        q.put((rank, repr(e)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_equal_one(reports_dir, tmp_path):
    """2 ranks x 1 micro-step == 1 rank x 2 micro-steps (gloo on CPU, dropout off): same weights after 4 steps."""
    import torch.multiprocessing as mp

    import common
    import train_gpt
    base = [f"--data_dir={reports_dir}", "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=4", "--gradient_accumulation_steps=2", "--max_iters=4", "--eval_interval=4",
            "--eval_max_windows=4", "--tensorboard=False", "--warmup_iters=1", "--learning_rate=1e-2", "--dropout=0.0"]
    train_gpt.main(base + [f"--out_dir={tmp_path / 'one'}"])
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, base + [f"--out_dir={tmp_path / 'two'}"], q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    results = dict(q.get(timeout=5) for _ in procs)
    assert results == {0: "ok", 1: "ok"}, results
    one = common.load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))["model"]
    two = common.load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))["model"]
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-5), k


@pytest.mark.slow
@pytest.mark.learning
def test_report_from_image_names_the_findings(tmp_path, phantom_long_run, learning):
    """Image-conditioned GPT on phantom (image, report) pairs (config/gpt_report_from_image.py), the encoder and its
    finding head started from the session's longer-trained phantom classifier (config/convnext_phantom_long.py: the
    quick start + 1,200 steps): the greedy reports name the findings in the image. Finding tags at per-class F1
    thresholds chosen on val, the true findings as tags in training (tag_forcing=1); the reports are scored on 300
    test images. The issue's target: finding macro-F1 >= 0.7. Measured with this run (2026-11-30): 0.738 (the
    finding head itself 0.750), BLEU-4 0.29, ROUGE-L 0.50 (~2 min on 2 cores); with the head's own tags in training
    0.669. Writing the normal report for every image scores macro-F1 0.062."""
    import train_gpt
    data = tmp_path / "pairs"
    text_data.main(["--dataset=phantom_pairs", "--tokenizer=bpe", "--vocab_size=1024", "--n_images=12000",
                    "--image_size=64", "--max_tokens=64", f"--out_dir={data}"])  # the quick start's phantom and split
    res = train_gpt.main([_cfg("gpt_report_from_image.py"), f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}",
                          f"--image_init={phantom_long_run['best']}", "--tensorboard=False",
                          "--eval_interval=400"])  # the reports of the last step only: the same numbers, one eval less
    print(f"report from image ({res['report_split']} reports): macro-F1 {res['macro_f1']:.3f} (finding head "
          f"{res['head_macro_f1']:.3f}), BLEU-4 {res['bleu4']:.3f}, ROUGE-L {res['rouge_l']:.3f}, per class {res['per_class_f1']}")
    assert res["report_split"] == "test"
    learning("report finding macro-F1", res["macro_f1"], 0.7)
    import sample
    report = sample.main([f"--out_dir={tmp_path / 'run'}", "--image=val:0", "--temperature=0", "--num_samples=1"])[0]
    assert report.strip(), "sample.py writes a report for an image"


def test_phantom_pairs_split_like_data_py(tmp_path):
    """(image, report) pairs use data.py's patient split of the same phantom, so an image model trained by train.py on
    data/phantom (train_gpt.py --image_init) never saw the val/test images it is judged on."""
    import csv

    data.prepare_phantom(tmp_path / "ph", n_images=400, image_size=16, seed=0)
    _, idx = text_data.phantom_records(400, 16, 0, 0.15, 0.15)
    for split in ("train", "val", "test"):
        with open(tmp_path / "ph" / f"{split}_index.csv") as f:
            rows = sorted(int(r["path"].rsplit("/", 1)[-1]) for r in csv.DictReader(f))
        assert rows == sorted(idx[split].tolist()), split
