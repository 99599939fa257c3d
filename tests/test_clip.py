"""CLIP: tokenizers vs open_clip / transformers, weight loading vs the reference models, distributed and
cached-feature losses vs the single-process big batch, retrieval metrics vs brute force, and the phantom run."""

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real"

import data  # noqa: E402
import model_clip  # noqa: E402
import phantom  # noqa: E402
import tokenizer as tok_lib  # noqa: E402


def _roco_captions(n):
    path = REAL / "roco_validation_radiology_captions.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    lines = [l.rstrip("\n").split("\t", 1)[-1].strip() for l in path.open(encoding="utf-8")]
    return [l for l in lines if l][:n]


# -----------------------------------------------------------------------------
# tokenizers


def test_clip_bpe_equals_open_clip_tokenize():
    open_clip = pytest.importorskip("open_clip")
    caps = _roco_captions(400)
    caps += ["", "A" * 300, "Left pleural effusion &amp; <b>pneumothorax</b>", "café 3.5 cm", "x " * 100]
    tok = tok_lib.ClipBPE()
    ids, lengths = tok(caps)
    ref = open_clip.tokenize(caps)
    assert torch.equal(torch.tensor(ids), ref)
    assert ref.shape[1] == 77 and all(l <= 77 for l in lengths)
    assert ids[-1][76] == tok.eot_id  # truncation keeps the end token
    assert tok.decode(ids[0]).startswith(caps[0].lower()[:10])


def test_clip_bpe_from_hf_vocab_files(tmp_path):
    """vocab.json + merges.txt (a Hugging Face CLIP folder) give the same ids as the open_clip merges file."""
    pytest.importorskip("open_clip")
    tok = tok_lib.ClipBPE()
    vocab = {t.replace("<start_of_text>", "<|startoftext|>").replace("<end_of_text>", "<|endoftext|>"): i
             for t, i in tok.encoder.items()}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(tok.ranks, key=tok.ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    hf = tok_lib.ClipBPE(str(tmp_path))
    caps = ["Chest radiograph: right-sided pneumothorax (arrow).", "CT of the abdomen, 2 mm slices."]
    assert hf(caps) == tok(caps)


def test_wordpiece_equals_transformers_bert_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    caps = _roco_captions(300)
    words = {}
    for c in caps:
        for w in c.lower().replace("(", " ").replace(")", " ").replace(",", " ").replace(".", " ").split():
            words[w] = words.get(w, 0) + 1
    common = [w for w, n in sorted(words.items(), key=lambda kv: -kv[1]) if n >= 3 and w.isalpha()]
    chars = sorted({ch for c in caps for ch in c.lower() if not ch.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + ch for ch in chars if ch.isalnum()]
    vocab += common + ["##ing", "##ed", "##s", "##al", "##ic"]
    vocab = list(dict.fromkeys(vocab))
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ref = transformers.BertTokenizer(str(path), do_lower_case=True)
    ours = tok_lib.WordPiece(str(path), context_length=64)
    for c in caps + ["Ünïcödé accents, naïve café", "tab\tand\x00control"]:
        assert ours.encode(c) == ref.encode(c, add_special_tokens=False), c
    ids, lengths = ours(caps[:4])
    ref_ids = ref(caps[:4], padding="max_length", truncation=True, max_length=64)["input_ids"]
    assert ids == ref_ids


# -----------------------------------------------------------------------------
# weight loading: identical embeddings to the reference implementations


def _tokens(B, T, vocab, eot):
    g = torch.Generator().manual_seed(0)
    toks = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = 3 + b * 2
        toks[b, 0] = eot - 1
        toks[b, 1:n] = torch.randint(1, eot - 1, (n - 1,), generator=g)
        toks[b, n] = eot
    return toks


@pytest.mark.parametrize("quickgelu", [False, True])
def test_open_clip_weights(tmp_path, quickgelu):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    ref = open_clip.CLIP(embed_dim=64, quick_gelu=quickgelu,
                         vision_cfg=dict(image_size=32, layers=2, width=128, patch_size=16),
                         text_cfg=dict(context_length=16, vocab_size=100, width=128, heads=2, layers=2)).eval()
    with torch.no_grad():  # non-trivial norms and temperature
        for n, p in ref.named_parameters():
            if "ln" in n:
                p.add_(0.1 * torch.randn_like(p))
        ref.logit_scale.fill_(3.0)
    path = tmp_path / "open_clip.pt"
    torch.save(ref.state_dict(), path)
    args = model_clip.clip_args_from_weights(str(path))
    if not quickgelu:
        args.update(vision_act="gelu", text_act="gelu")
    ours = model_clip.build_clip(**args).eval()
    report = model_clip.load_clip_weights(ours, str(path))
    assert report["layout"] == "open_clip" and not report["missing"]
    x = torch.randn(3, 3, 32, 32)
    t = _tokens(3, 16, 100, 99)
    with torch.no_grad():
        ri, rt = ref.encode_image(x), ref.encode_text(t)
        oi, ot, scale = ours(x, t)
    torch.testing.assert_close(oi, F.normalize(ri, dim=-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(ot, F.normalize(rt, dim=-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.encode_image(x, normalize=False), ri, atol=1e-4, rtol=0)
    assert abs(float(scale) - float(ref.logit_scale.detach().exp())) < 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_clip_weights(tmp_path, fmt):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, eos_token_id=99, bos_token_id=98, pad_token_id=0),
        vision_config=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=16), projection_dim=48)
    ref = transformers.CLIPModel(cfg).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=fmt == "safetensors")
    args = model_clip.clip_args_from_weights(str(tmp_path))
    assert args["vision_heads"] == 3 and args["text_heads"] == 4 and args["eot_id"] == 99
    ours = model_clip.build_clip(**args).eval()
    report = model_clip.load_clip_weights(ours, str(tmp_path))
    assert report["layout"] == "hf"
    x = torch.randn(2, 3, 32, 32)
    t = _tokens(2, 16, 100, 99)
    with torch.no_grad():
        ri, rt = ref.get_image_features(pixel_values=x), ref.get_text_features(input_ids=t)
        ri = getattr(ri, "pooler_output", ri)
        rt = getattr(rt, "pooler_output", rt)
        oi, ot = ours.encode_image(x, normalize=False), ours.encode_text(t, normalize=False)
    torch.testing.assert_close(oi, ri, atol=1e-4, rtol=0)
    torch.testing.assert_close(ot, rt, atol=1e-4, rtol=0)


def _small_bert(tmp_path, transformers):
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=512, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    cfg.save_pretrained(str(tmp_path))
    return cfg


def test_bert_text_encoder_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = _small_bert(tmp_path, transformers)
    ref = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ours = model_clip.BertTextEncoder(embed_dim=64, vocab_size=200, width=128, layers=2, heads=2, max_position=64,
                                      proj="linear").eval()
    sd = model_clip.convert_hf_bert(ref.state_dict(), "", "")
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert list(missing) == ["proj.weight"] and not unexpected
    t = _tokens(3, 20, 200, 150)
    t[:, 0] = 2  # [CLS]; 0 = [PAD] after the end
    with torch.no_grad():
        ref_h = ref(input_ids=t, attention_mask=(t != 0).long()).last_hidden_state
        h = ours.hidden_states(t)
    mask = t != 0
    torch.testing.assert_close(h[mask], ref_h[mask], atol=1e-4, rtol=0)


def test_biomedclip_weights(tmp_path):
    """open_clip's BiomedCLIP layout: timm ViT trunk + HF BERT text tower, [CLS] pooling, MLP projection."""
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("timm")
    torch.manual_seed(0)
    _small_bert(tmp_path, transformers)
    ref = open_clip.CustomTextCLIP(
        embed_dim=64,
        vision_cfg=dict(timm_model_name="vit_tiny_patch16_224", timm_pool="", timm_proj="linear", image_size=224),
        text_cfg=dict(hf_model_name=str(tmp_path), hf_model_pretrained=False, hf_proj_type="mlp",
                      hf_pooler_type="cls_last_hidden_state_pooler", context_length=32)).eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    args = model_clip.clip_args_from_weights(str(path))
    args["context_length"] = 32
    ours = model_clip.build_clip(**args).eval()
    report = model_clip.load_clip_weights(ours, str(path))
    assert report["layout"] == "biomedclip"
    x = torch.randn(2, 3, 224, 224)
    t = _tokens(2, 32, 200, 150)
    t[:, 0] = 2
    with torch.no_grad():
        ri, rt = ref.encode_image(x), ref.encode_text(t)
        oi, ot = ours.encode_image(x, normalize=False), ours.encode_text(t, normalize=False)
    torch.testing.assert_close(oi, ri, atol=1e-4, rtol=0)
    torch.testing.assert_close(ot, rt, atol=1e-4, rtol=0)


def test_gray_input_and_lock():
    """1-channel X-rays: summed RGB filters on a gray image equal the RGB model on the replicated image; LiT locking."""
    torch.manual_seed(0)
    small = dict(embed_dim=32, image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2,
                 vocab_size=50, context_length=8, text_width=64, text_layers=2, text_heads=2, eot_id=49)
    rgb = model_clip.build_clip(**small, in_chans=3).eval()
    gray = model_clip.build_clip(**small, in_chans=1).eval()
    sd = {k: v for k, v in rgb.state_dict().items()}
    sd["visual.patch_embed.weight"] = sd["visual.patch_embed.weight"].sum(1, keepdim=True)
    gray.load_state_dict(sd)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(gray.encode_image(x), rgb.encode_image(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=0)
    left = model_clip.lock_tower(gray, "visual", unlock_last_n=1)
    trainable = {n for n, p in gray.named_parameters() if p.requires_grad}
    assert left == 3 and {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj.weight"} <= trainable
    assert not any(n.startswith("visual.blocks") for n in trainable) and "text.proj.weight" in trainable


# -----------------------------------------------------------------------------
# the contrastive loss: DDP (2 gloo processes) and GradCache accumulation == one process with the whole batch

TINY = dict(embed_dim=16, image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, in_chans=1,
            vocab_size=40, context_length=8, text_width=32, text_layers=1, text_heads=2, eot_id=39,
            vision_act="gelu", text_act="gelu")


def _global_batch(N=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 1, 16, 16, generator=g)
    t = torch.randint(1, 39, (N, 8), generator=g)
    t[torch.arange(N), torch.randint(2, 8, (N,), generator=g)] = 39
    margin = 0.1 + 0.2 * (torch.arange(N) % 3 == 0).float()
    weight = 1.0 + (torch.arange(N) % 4 == 0).float()
    t_img = F.normalize(torch.randn(N, 16, generator=g), dim=-1)  # a teacher's features of the same pairs
    t_txt = F.normalize(t_img + 0.5 * torch.randn(N, 16, generator=g), dim=-1)
    return x, t, margin, weight, t_img, t_txt


DISTILL = {"dtype": "float32", "distill_alpha": 0.6, "distill_temperature": 2.0, "distill_feature": 0.3}


def _micro(batch, rows, micro_size, distill):
    """This process's rows of the global batch as forward_backward's micro-batches (teacher features when distill)."""
    x, t, m, w, ti, tt = (v[rows] for v in batch)
    return [(x[a:a + micro_size], t[a:a + micro_size], m[a:a + micro_size], w[a:a + micro_size],
             (ti[a:a + micro_size], tt[a:a + micro_size], torch.tensor(20.0)) if distill else None)
            for a in range(0, len(x), micro_size)]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(micro_size, feature_cache=True, N=16, distill=False):
    import common
    import train_clip
    torch.manual_seed(0)
    model = model_clip.build_clip(**TINY)
    micro = _micro(_global_batch(N), slice(0, N), micro_size, distill)
    dist = common.Dist(False, 0, 0, 1, "cpu", True)
    loss = train_clip.forward_backward(model, micro, dist, DISTILL if distill else {"dtype": "float32"}, feature_cache)
    return float(loss), _grads(model)


@pytest.mark.parametrize("distill", [False, True])
def test_feature_cache_accumulation_equals_big_batch(distill):
    """GradCache over 4 micro-batches == one batch of 16: the loss and every gradient, with the distillation terms
    (KL over the batch's similarities + feature cosine against a teacher's features) too."""
    loss_big, g_big = _reference(16, distill=distill)
    loss_acc, g_acc = _reference(4, feature_cache=True, distill=distill)
    assert abs(loss_big - loss_acc) < 1e-6
    assert g_big.keys() == g_acc.keys() and "logit_scale" in g_big
    for n in g_big:
        torch.testing.assert_close(g_acc[n], g_big[n], atol=1e-5, rtol=1e-5, msg=n)
    _, g_plain = _reference(4, feature_cache=False, distill=distill)  # per-micro-batch losses see fewer negatives
    assert any((g_plain[n] - g_big[n]).abs().max() > 1e-4 for n in g_big)
    if distill:  # the teacher's terms change the loss and the gradients
        loss_clip, g_clip = _reference(16)
        assert abs(loss_clip - loss_big) > 1e-3 and any((g_clip[n] - g_big[n]).abs().max() > 1e-4 for n in g_big)


def test_distill_loss_matches_definition():
    """The relational term is KL(teacher || student) of the row softmaxes at scale / T, times T^2, averaged over the
    image->text and text->image directions; zero when the student's similarities equal the teacher's."""
    import common
    x, t, m, w, ti, tt = _global_batch(8)
    g = torch.Generator().manual_seed(3)
    si = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    st = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    dist = common.Dist(False, 0, 0, 1, "cpu", True)
    T, s_scale, t_scale = 2.0, torch.tensor(10.0), torch.tensor(20.0)
    got = model_clip.distill_loss(si, st, s_scale, (ti, tt, t_scale), dist, T)
    ref = 0.0
    for s_l, t_l in ((si @ st.t(), ti @ tt.t()), (st @ si.t(), tt @ ti.t())):
        p = torch.softmax(t_l * t_scale / T, -1)
        q = torch.softmax(s_l * s_scale / T, -1)
        ref += 0.5 * (p * (p.log() - q.log())).sum(-1).mean()
    assert float(got) == pytest.approx(float(ref) * T * T, rel=1e-5)
    same = model_clip.distill_loss(ti, tt, t_scale, (ti, tt, t_scale), dist, T, feature=1.0)
    assert abs(float(same)) < 1e-6
    with pytest.raises(ValueError, match="embed_dim"):
        model_clip.distill_loss(si[:, :8], st[:, :8], s_scale, (ti, tt, t_scale), dist, T, feature=1.0)


_WORKER = r"""
import os, sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import common, train_clip, model_clip, test_clip
from torch.nn.parallel import DistributedDataParallel as DDP
dist = common.setup_distributed("cpu", "gloo")
batch = test_clip._global_batch(16)
B = 16 // dist.world_size
s = slice(dist.rank * B, (dist.rank + 1) * B)
for distill in (False, True):
    for accum in (1, 2):
        torch.manual_seed(0)
        model = model_clip.build_clip(**test_clip.TINY)
        net = DDP(model)
        micro = test_clip._micro(batch, s, B // accum, distill)
        cfg = test_clip.DISTILL if distill else {{"dtype": "float32"}}
        loss = train_clip.forward_backward(net, micro, dist, cfg, True)
        loss = common.all_reduce_mean(loss.reshape(1), dist)
        torch.save({{"loss": float(loss), "grads": test_clip._grads(model)}},
                   os.path.join({out!r}, f"rank{{dist.rank}}_accum{{accum}}_distill{{int(distill)}}.pt"))
# drop the last DDP wrapper before the process group: left as a global, its reducer keeps the group (and rank 0's
# TCPStore server thread) alive into interpreter shutdown, where one full-suite run aborted with "terminate called
# without an active exception"
del net, model
common.cleanup_distributed()
"""


def test_ddp_gather_with_grad_equals_single_process(tmp_path):
    """2 gloo ranks x 8 pairs (x 1 or 2 micro-batches, feature cache) == 1 process with the 16 pairs: loss and
    every gradient, margins, per-pair weights and the distillation terms included."""
    import subprocess
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(tmp_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env))
    assert all(p.wait(timeout=300) == 0 for p in procs)
    for distill in (False, True):
        loss_ref, g_ref = _reference(16, distill=distill)
        for rank in range(2):
            for accum in (1, 2):
                r = torch.load(tmp_path / f"rank{rank}_accum{accum}_distill{int(distill)}.pt")
                assert r["loss"] == pytest.approx(loss_ref, rel=1e-5, abs=1e-5)
                for n in g_ref:
                    # float32 sums in another order (per-rank halves, then all-reduce): the error scales with the
                    # values (|grad| ~ 19 for the position embeddings), so the tolerance is relative plus a floor
                    torch.testing.assert_close(r["grads"][n], g_ref[n], atol=1e-5, rtol=1e-5,
                                               msg=f"rank {rank} accum {accum} distill {distill} {n}")


# -----------------------------------------------------------------------------
# retrieval metrics vs brute force


def test_retrieval_metrics_brute_force():
    import train_clip
    g = torch.Generator().manual_seed(0)
    N = 60
    img = F.normalize(torch.randn(N, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(N, 8, generator=g), dim=-1)
    groups = torch.randint(0, 40, (N,), generator=g)  # some captions repeat
    got = train_clip.retrieval_metrics(img, txt, groups)
    for name, q, c in (("i2t", img, txt), ("t2i", txt, img)):
        ranks = []
        for i in range(N):
            order = torch.argsort(q[i] @ c.t(), descending=True).tolist()
            ranks.append(1 + next(p for p, j in enumerate(order) if groups[j] == groups[i]))
        ranks = np.array(ranks)
        for k in (1, 5, 10):
            assert got[f"{name}_r{k}"] == pytest.approx((ranks <= k).mean())
        assert got[f"{name}_mean_rank"] == pytest.approx(ranks.mean())
        assert got[f"{name}_median_rank"] == pytest.approx(float(torch.tensor(ranks).double().median()))
        assert got[f"{name}_mrr"] == pytest.approx((1.0 / ranks).mean())
    unique = torch.arange(N)
    assert train_clip.chance_recall(unique, 5) == pytest.approx(5 / N)
    # chance with duplicates against a Monte Carlo estimate of random rankings
    hits = [(groups[torch.randperm(N, generator=g)[:5]] == groups[i]).any().item() for i in range(N) for _ in range(40)]
    assert train_clip.chance_recall(groups, 5) == pytest.approx(np.mean(hits), abs=0.03)


def test_critical_flags_skip_negations():
    import train_clip
    caps = ["Large left pneumothorax.", "No pneumothorax. Small effusion.", "Effusion. No edema or pneumothorax."]
    assert train_clip.critical_flags(caps, "pneumothorax").tolist() == [True, False, False]


# -----------------------------------------------------------------------------
# the real entry point


def test_train_clip_smoke(tiny_phantom, tmp_path):
    """Loop mechanics on 32 px: accumulation with the feature cache, eval, checkpoint, retrieval tool."""
    import train_clip
    out = str(tmp_path / "run")
    common_args = [f"--data_dir={tiny_phantom}", f"--out_dir={out}", "--image_size=32", "--device=cpu",
                   "--tensorboard_log=False", "--tokenizer=bpe", "--bpe_vocab_size=300"]
    final = train_clip.main(common_args + ["--max_iters=3", "--eval_interval=3", "--batch_size=8",
                                           "--gradient_accumulation_steps=2", "--vision_width=32", "--vision_layers=1",
                                           "--vision_heads=2", "--text_width=32", "--text_layers=1", "--text_heads=2",
                                           "--embed_dim=16", "--val_size=50", "--log_interval=1", "--warmup_iters=1",
                                           "--critical_margin=0.1", "--critical_weight=2.0"])
    assert final["iters"] == 3 and os.path.exists(os.path.join(out, "best.pt"))
    rec = final["last"]
    assert rec["pool"] == 50 and 0 <= rec["i2t_r5"] <= 1 and "zs_auc_macro" in rec
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert lines[-1]["final"] and lines[0]["iter"] == 0
    res = train_clip.main(common_args + ["--eval_only=True", "--val_size=50", "--query=left pleural effusion", "--top_k=3"])
    assert len(res["images"]) == 3 and all(0 <= i < 50 for i, _, _ in res["images"])
    # the run as the teacher of a narrower student with another BPE vocabulary (the teacher keeps its own tokenizer)
    student = train_clip.main([f"--data_dir={tiny_phantom}", f"--out_dir={tmp_path / 'student'}", "--image_size=32",
                               "--device=cpu", "--tensorboard_log=False", "--tokenizer=bpe", "--bpe_vocab_size=280",
                               "--max_iters=2", "--eval_interval=2", "--batch_size=8", "--vision_width=16",
                               "--vision_layers=1", "--vision_heads=2", "--text_width=16", "--text_layers=1",
                               "--text_heads=2", "--embed_dim=16", "--val_size=50", "--warmup_iters=1",
                               f"--teacher_ckpt={out}/best.pt", "--distill_feature=1.0"])
    assert student["iters"] == 2 and np.isfinite(student["last"]["loss_pool"])


@pytest.mark.slow
@pytest.mark.learning
def test_clip_phantom_learns(clip_phantom_run, learning):
    """The two-stage quick-start recipe on a 1,000-pair validation pool: python train.py (the image tower learns the
    findings from labels; the session's quick-start run), then python train_clip.py config/clip_phantom.py.
    Negation-aware zero-shot macro AUC (softmax over "finding" vs "no finding" prompts in the reports' wording)
    >= 0.8, and findings-match image->text R@5 >= 0.5 and clearly above its chance level (~0.38 here)."""
    import train_clip
    rec = clip_phantom_run["final"]["last"]
    print("clip phantom:", {k: rec[k] for k in ("zs_neg_auc_macro", "zs_auc_macro", "lab_i2t_r5", "lab_chance_r5")})
    assert rec["pool"] == 1000
    learning("zs_neg_auc_macro", rec["zs_neg_auc_macro"], 0.8)
    learning("lab_i2t_r5", rec["lab_i2t_r5"], 0.5)
    learning("lab_i2t_r5 - chance", rec["lab_i2t_r5"] - rec["lab_chance_r5"], 0.1)
    # --query in the reports' own wording, ranked against "No <query>." (CheXzero's negation-aware score): the top 20
    # validation images hold effusions (by their labels, not by the word: "No pleural effusion." has it too). One
    # query's top 20 is a coin on another CPU (issue 30: "Small left pleural effusion." 0.90 here, 0.30 on an Intel
    # Xeon): this small text tower keeps every sentence within cosine ~0.87-0.97 of every other and its temperature at
    # its initial value, so a single ranking rests on differences of a few hundredths. Even the mean P@20 over all
    # nine wordings the reports use (severity x side) moves with the CPU: 2.0x to 4.0x the base rate over AVX-512,
    # AVX2 and scalar kernels and 1 / 2 threads (2026-12-08, docs/tests.md). The bar, 1.5x, is below that minimum
    # and above chance (1x); the claim that 3x holds is this machine's, not every CPU's.
    labels = np.asarray(data.PreparedSplit(clip_phantom_run["data_dir"], "val").labels)[:1000]
    eff = labels[:, phantom.CLASSES.index("Pleural Effusion")] == 1
    hits = {}
    for sev in ("Small", "Moderate", "Large"):
        for side in ("left", "right", "bilateral"):
            query = f"{sev} {side} pleural effusion{'s' if side == 'bilateral' else ''}."
            res = train_clip.main([f"--data_dir={clip_phantom_run['data_dir']}",
                                   f"--out_dir={clip_phantom_run['out_dir']}", "--eval_only=True", f"--query={query}",
                                   "--top_k=20"])
            hits[query] = float(np.mean([eff[i] for i, _, _ in res["images"]]))
    print(f"effusions in the top 20 (base rate {eff.mean():.3f}): {hits}")
    learning("mean P@20 / base rate, 9 effusion wordings", np.mean(list(hits.values())) / eff.mean(), 1.5)


@pytest.mark.slow
@pytest.mark.learning
def test_clip_distillation_beats_the_student_alone(tmp_path, clip_phantom_run, learning):
    """config/distill_clip_phantom.py: a 5x smaller CLIP (ViT 3x128 on 8-px patches + a 1-block text tower, from
    scratch) trained with the phantom CLIP as its teacher (0.5 x InfoNCE + 0.5 x KL over the batch's similarities)
    beats the same student, same seed and steps, trained alone, on negation-aware zero-shot macro AUC."""
    import train_clip
    args = [str(ROOT / "config" / "distill_clip_phantom.py"), f"--data_dir={clip_phantom_run['data_dir']}",
            "--device=cpu", "--tensorboard_log=False"]
    alone = train_clip.main(args + [f"--out_dir={tmp_path / 'alone'}", "--teacher_ckpt="])
    taught = train_clip.main(args + [f"--out_dir={tmp_path / 'taught'}", f"--teacher_ckpt={clip_phantom_run['best']}"])
    a, t = alone["last"], taught["last"]
    print(f"CLIP distillation: zs_neg_auc_macro alone {a['zs_neg_auc_macro']:.4f} -> taught {t['zs_neg_auc_macro']:.4f} "
          f"(teacher {clip_phantom_run['final']['last']['zs_neg_auc_macro']:.4f}); lab_i2t_r5 {a['lab_i2t_r5']:.3f} -> "
          f"{t['lab_i2t_r5']:.3f}")
    learning("taught - alone zs_neg_auc_macro", t["zs_neg_auc_macro"] - a["zs_neg_auc_macro"], 0.02)
