"""tokenizer.py: byte-level BPE round trip and training, GPT-2 files give transformers' ids, char level, CLI."""

import json

import pytest

import tokenizer as T

CORPUS = [
    "Chest radiograph shows a small left pleural effusion.",
    "No pneumothorax. Heart size is normal.",
    "Axial CT of the pelvis showing diffuse infiltration of the bladder wall (arrow).",
    "Postoperative anteroposterior radiograph of the pelvis.",
    "MRI T2-weighted image: 3.5 cm lesion in segment VII, it's hyperintense.",
    "Mild cardiomegaly. Right lower lobe consolidation; no effusion.",
] * 20

HARD = ["héllo wörld ² ½ 日本語 🙂 \t\n  x__y it's 3.14159 ", "\x00\x7f\u200b  trailing   ", "", " ", "a\r\nb",
        "Ünïcödé – “quotes” — ‘apostrophes’ ≥ 5 mm", "ROCO_00020\t Axial computed tomography"]


def test_pre_tokenize_is_lossless():
    for text in CORPUS[:6] + HARD:
        assert "".join(T.pre_tokenize(text)) == text


def test_bpe_round_trip_and_compression(tmp_path):
    tok = T.train_bpe(CORPUS, vocab_size=400)
    assert tok.vocab_size == 400 and tok.eot_id == 399
    for text in CORPUS[:6] + HARD:
        assert tok.decode(tok.encode(text)) == text
    n_bpe = sum(len(tok.encode(t)) for t in CORPUS)
    n_char = sum(len(t) for t in CORPUS)
    assert n_bpe < n_char / 3, "BPE trained on a repetitive corpus must compress it several-fold"
    path = tmp_path / "tok.json"
    tok.save(str(path))
    again = T.load(str(path))
    assert again.encode(HARD[0]) == tok.encode(HARD[0]) and again.vocab_size == tok.vocab_size
    assert T.train_bpe(CORPUS, vocab_size=400).merges == tok.merges, "training must be deterministic"


def test_token_bytes_add_up():
    tok = T.train_bpe(CORPUS, vocab_size=300)
    text = CORPUS[0]
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.token_bytes(tok.eot_id) == b"\n"


def test_gpt2_files_match_transformers(tmp_path):
    """Our BPE written as GPT-2's vocab.json + merges.txt: GPT2Tokenizer must give the same ids."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("regex")
    tok = T.train_bpe(CORPUS, vocab_size=350)
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
    merges.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in tok.merges) + "\n", encoding="utf-8")
    ours = T.BPETokenizer.from_gpt2_files(str(vocab), str(merges))
    ref = transformers.GPT2Tokenizer(str(vocab), str(merges))
    texts = CORPUS[:6] + ["héllo wörld 日本語 🙂 \t\n  x__y it's 3.14159 ", "Ünïcödé – “quotes” ≥ 5 mm  end  "]
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.eot_id == ref.convert_tokens_to_ids(T.EOT)


def test_char_tokenizer():
    tok = T.CharTokenizer.from_texts(CORPUS)
    ids = tok.encode(CORPUS[0])
    assert tok.decode(ids) == CORPUS[0] and len(ids) == len(CORPUS[0])
    assert tok.eot_id == tok.vocab_size - 1
    again = T.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode(CORPUS[1]) == tok.encode(CORPUS[1])
    with pytest.raises(ValueError, match="not in the char-level vocabulary"):
        tok.encode("日")


def test_cli_reports_tokens_per_line(tmp_path, capsys):
    src = tmp_path / "captions.txt"
    src.write_text("".join(f"ROCO_{i:05d}\t {t}\n" for i, t in enumerate(CORPUS)), encoding="utf-8")
    out = tmp_path / "tok.json"
    rows = T.main([f"--train={src}", "--vocab_size=300", f"--out={out}"])
    assert out.is_file()
    (_, _, n_char), (_, _, n_bpe) = rows
    assert n_bpe < n_char
    assert "tokens/line" in capsys.readouterr().out
