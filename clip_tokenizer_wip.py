"""
The two text tokenizers a radiology CLIP meets (to be merged into tokenizer.py):

  ClipBPE     CLIP's byte-level BPE (Radford et al. 2021): open_clip's bpe_simple_vocab_16e6.txt.gz, or a
              Hugging Face CLIP folder's vocab.json + merges.txt. Ids equal open_clip.tokenize().
  WordPiece   BERT's tokenizer (Devlin et al. 2019) from a vocab.txt: BasicTokenizer (clean, lower-case,
              strip accents, split punctuation) then greedy longest-match-first with '##' continuations.
              PubMedBERT / BiomedCLIP use it (vocab.txt of microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract).

    python clip_tokenizer_wip.py --compare=captions.txt [--bpe_vocab_size=8192] [--wordpiece_vocab=vocab.txt]

prints tokens per caption for CLIP BPE, WordPiece (when a vocab.txt is given) and our byte-level BPE trained
on the same captions (tokenizer.train_bpe), and how many captions overflow CLIP's 77-token context.

CLIP BPE, in open_clip's order: clean (ftfy.fix_text when ftfy is installed, html.unescape twice, collapse
whitespace, lower-case), pre-tokenize with CLIP's regex, map each UTF-8 byte to a printable character, BPE
inside each word with '</w>' marking the word end, wrap in <start_of_text> ... <end_of_text>, truncate to the
context (the last kept token becomes <end_of_text>) and pad with 0.
Differences from open_clip, by design:
  - without ftfy (an optional dependency) mojibake is not repaired ('caf\u00c3\u00a9' stays as it is); on clean
    UTF-8 text the ids are the same (the test checks real ROCO captions).
  - without the `regex` package, \\p{L} / \\p{N} become [^\\W\\d_] / \\d, as in tokenizer.py: letters and decimal
    digits of every script agree, non-decimal numerals ('\u00b2', '\u00bd') are split differently.
  - the literal strings '<start_of_text>' / '<end_of_text>' inside a caption are text, not special tokens.
"""

import argparse
import gzip
import html
import json
import os
import unicodedata

try:  # exact \p{L} / \p{N} classes when the `regex` package is present (open_clip depends on it)
    import regex as _re
    _CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
except ImportError:
    import re as _re
    _CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+"""

try:
    import ftfy as _ftfy
except ImportError:
    _ftfy = None

CONTEXT_LENGTH = 77  # CLIP's text context (all OpenAI / open_clip ViT models)
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the 16e6 file: vocab 49,408 with the 2 specials


def bytes_to_unicode():
    """GPT-2 / CLIP's reversible byte -> printable character table (no whitespace or control characters).
    The dict's order matters: CLIP's first 256 ids are its values in this order (printable bytes first)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    table = {b: chr(b) for b in keep}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def default_clip_bpe_path():
    """open_clip ships the merges file inside its package; we only read the file (no open_clip import at run time)."""
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("CLIP's merges file bpe_simple_vocab_16e6.txt.gz not found: pip install open_clip_torch, "
                                "or pass a Hugging Face CLIP folder (vocab.json + merges.txt) as clip_bpe_path")
    return os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")


# -----------------------------------------------------------------------------
# CLIP BPE


class ClipBPE:
    """encode(text) -> ids without specials; __call__(texts) -> (ids int64 list of lists padded to context, lengths)."""

    def __init__(self, path="", context_length=CONTEXT_LENGTH):
        path = path or default_clip_bpe_path()
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        if os.path.isdir(path):  # a Hugging Face CLIP folder
            vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
            for p in (vocab_file, merges_file):
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"{p} not found: a Hugging Face CLIP tokenizer folder holds vocab.json and merges.txt")
            with open(vocab_file, encoding="utf-8") as f:
                self.encoder = json.load(f)
            with open(merges_file, encoding="utf-8") as f:
                lines = f.read().split("\n")
            merges = [tuple(l.split()) for l in lines if l and not l.startswith("#version")]
            self.sot, self.eot = "<|startoftext|>", "<|endoftext|>"
        else:  # open_clip / OpenAI: the gzipped merges; the vocabulary is derived from them
            if not os.path.isfile(path):
                raise FileNotFoundError(f"CLIP merges file {path} not found (open_clip's bpe_simple_vocab_16e6.txt.gz)")
            lines = gzip.open(path).read().decode("utf-8").split("\n")
            merges = [tuple(l.split()) for l in lines[1:N_MERGES + 1]]  # line 0 is a version header
            vocab = list(self.byte_encoder.values())
            vocab = vocab + [c + "</w>" for c in vocab] + ["".join(m) for m in merges]
            self.sot, self.eot = "<start_of_text>", "<end_of_text>"
            vocab += [self.sot, self.eot]
            self.encoder = {t: i for i, t in enumerate(vocab)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id, self.pad_id = self.encoder[self.sot], self.encoder[self.eot], 0
        self.vocab_size = len(self.encoder)
        self.context_length = context_length
        self.pattern = _re.compile(_CLIP_PATTERN, _re.IGNORECASE)
        self._cache = {}

    @staticmethod
    def clean(text):
        if _ftfy is not None:
            text = _ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return " ".join(text.split()).lower()

    def _bpe(self, word):
        """word: byte-unicode characters of one pre-token -> list of token strings (the last one ends in '</w>')."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = self.ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == best[0] and parts[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(self.clean(text)):
            cached = self._cache.get(piece)
            if cached is None:
                word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                cached = [self.encoder[t] for t in self._bpe(word)]
                if len(self._cache) < 500_000:
                    self._cache[piece] = cached
            ids.extend(cached)
        return ids

    def decode(self, ids):
        toks = "".join(self.decoder[int(i)] for i in ids if int(i) not in (self.sot_id, self.eot_id, self.pad_id))
        text = bytearray(self.byte_decoder[c] for c in toks).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def __call__(self, texts, context_length=None):
        """texts -> (tokens list of lists, each exactly context_length long, lengths incl. both specials)."""
        T = context_length or self.context_length
        out, lengths = [], []
        for text in texts:
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(ids) > T:
                ids = ids[:T]
                ids[-1] = self.eot_id  # truncation keeps the end token: the text tower pools there
            lengths.append(len(ids))
            out.append(ids + [self.pad_id] * (T - len(ids)))
        return out, lengths


# -----------------------------------------------------------------------------
# BERT WordPiece


def _is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch):
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch):
    cp = ord(ch)  # BERT treats every non-alphanumeric ASCII character as punctuation ('$', '^', '`', ...)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp):
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPiece:
    """BERT's uncased tokenizer from a vocab.txt (one token per line, id = line number)."""

    def __init__(self, vocab_path, context_length=256, lower_case=True, max_chars_per_word=100):
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(f"WordPiece vocabulary {vocab_path} not found (the vocab.txt of a BERT model folder, "
                                    f"e.g. microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract)")
        with open(vocab_path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        self.vocab = {t: i for i, t in enumerate(tokens) if t not in ("",)}
        self.inv = {i: t for t, i in self.vocab.items()}
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in self.vocab:
                raise ValueError(f"{vocab_path} lacks the special token {special}: is it a BERT vocab.txt?")
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.eot_id = self.sep_id
        self.vocab_size = len(tokens)
        self.context_length, self.lower_case, self.max_chars = context_length, lower_case, max_chars_per_word

    def basic_tokenize(self, text):
        """Clean, space out CJK characters, whitespace split, lower-case + strip accents, split punctuation."""
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_cjk(cp):
                chars += [" ", ch, " "]
            else:
                chars.append(" " if _is_whitespace(ch) else ch)
        words = []
        for word in "".join(chars).split():
            if self.lower_case:
                word = word.lower()
                word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            piece = ""
            for ch in word:
                if _is_punctuation(ch):
                    if piece:
                        words.append(piece)
                    words.append(ch)
                    piece = ""
                else:
                    piece += ch
            if piece:
                words.append(piece)
        return words

    def _wordpiece(self, word):
        if len(word) > self.max_chars:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:  # longest vocabulary entry starting at `start`
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    found = self.vocab[sub]
                    break
                end -= 1
            if found is None:
                return [self.unk_id]  # BERT maps the whole word to [UNK] when any part is missing
            ids.append(found)
            start = end
        return ids

    def encode(self, text):
        ids = []
        for w in self.basic_tokenize(text):
            ids.extend(self._wordpiece(w))
        return ids

    def decode(self, ids):
        toks = [self.inv[int(i)] for i in ids if int(i) not in (self.pad_id, self.cls_id, self.sep_id)]
        return " ".join(toks).replace(" ##", "")

    def __call__(self, texts, context_length=None):
        T = context_length or self.context_length
        out, lengths = [], []
        for text in texts:
            ids = [self.cls_id] + self.encode(text)[:T - 2] + [self.sep_id]
            lengths.append(len(ids))
            out.append(ids + [self.pad_id] * (T - len(ids)))
        return out, lengths


# -----------------------------------------------------------------------------
# our byte-level BPE (tokenizer.py) in the CLIP format: ids + <|endoftext|>, truncated keeping it, padded with 0


class TrainedBPE:
    """A small vocabulary trained on the training captions: a from-scratch text tower then has ~1k embedding
    rows instead of CLIP's 49,408 (most of which a radiology corpus never uses)."""

    def __init__(self, bpe, context_length=CONTEXT_LENGTH):
        self.bpe, self.context_length = bpe, context_length
        self.eot_id, self.pad_id, self.vocab_size = bpe.eot_id, 0, bpe.vocab_size

    @classmethod
    def train(cls, texts, vocab_size, context_length=CONTEXT_LENGTH):
        import tokenizer as ours  # tokenizer.py's trainer (read-only use)
        return cls(ours.train_bpe(texts, vocab_size), context_length)

    @classmethod
    def from_dict(cls, d, context_length=CONTEXT_LENGTH):
        import tokenizer as ours
        return cls(ours.from_dict(d), context_length)

    def to_dict(self):
        return self.bpe.to_dict()

    def encode(self, text):
        return self.bpe.encode(text)

    def decode(self, ids):
        return self.bpe.decode([i for i in ids if int(i) != self.pad_id])

    def __call__(self, texts, context_length=None):
        T = context_length or self.context_length
        out, lengths = [], []
        for text in texts:
            ids = (self.bpe.encode(text) + [self.eot_id])[:T]
            ids[-1] = self.eot_id
            lengths.append(len(ids))
            out.append(ids + [self.pad_id] * (T - len(ids)))
        return out, lengths


# -----------------------------------------------------------------------------
# construction from a config: the CLIP towers' tokenizer


def build_tokenizer(kind, path="", context_length=CONTEXT_LENGTH, train_texts=None, vocab_size=1024, saved=None):
    """kind: clip (open_clip's merges file or a HF CLIP folder at `path`) | wordpiece (vocab.txt at `path`) |
    bpe (ours: `saved` dict from a checkpoint, else trained on train_texts with vocab_size)."""
    if kind == "clip":
        return ClipBPE(path, context_length)
    if kind == "wordpiece":
        if not path:
            raise ValueError("tokenizer='wordpiece' needs tokenizer_path=<vocab.txt> (e.g. PubMedBERT's vocab.txt)")
        return WordPiece(path, context_length)
    if kind == "bpe":
        if saved is not None:
            return TrainedBPE.from_dict(saved, context_length)
        assert train_texts is not None, "tokenizer='bpe' trains on the training captions: pass train_texts"
        return TrainedBPE.train(train_texts, vocab_size, context_length)
    raise ValueError(f"unknown tokenizer {kind!r}: choose clip, wordpiece or bpe")


def tokenize_numpy(tok, texts, context_length=None):
    """-> (tokens int32 (N, T), lengths int32 (N,)), the format of a cached {split}_tokens.npy."""
    import numpy as np
    ids, lengths = tok(texts, context_length)
    return np.asarray(ids, dtype=np.int32).reshape(len(texts), -1), np.asarray(lengths, dtype=np.int32)


# -----------------------------------------------------------------------------
# CLI: tokens per caption for each tokenizer


def compare(lines, bpe_vocab_size=8192, wordpiece_vocab="", clip_path=""):
    """Rows of (name, vocab size, mean tokens/caption, p95, share over 77 with specials) on `lines`."""
    import numpy as np
    rows = []

    def row(name, vocab, counts, specials):
        c = np.asarray(counts) + specials
        rows.append((name, vocab, float(c.mean()), float(np.percentile(c, 95)), float((c > CONTEXT_LENGTH).mean())))

    clip = ClipBPE(clip_path)
    row("clip bpe", clip.vocab_size, [len(clip.encode(t)) for t in lines], 2)
    if wordpiece_vocab:
        wp = WordPiece(wordpiece_vocab)
        row("wordpiece", wp.vocab_size, [len(wp.encode(t)) for t in lines], 2)
    import tokenizer as ours  # tokenizer.py's byte-level BPE trainer
    bpe = ours.train_bpe(lines, bpe_vocab_size)
    row("our bpe", bpe.vocab_size, [len(bpe.encode(t)) for t in lines], 1)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="tokens per caption: CLIP BPE vs WordPiece vs our byte-level BPE")
    ap.add_argument("--compare", required=True, help="captions, one per line (ROCO captions.txt works as is)")
    ap.add_argument("--bpe_vocab_size", type=int, default=8192, help="vocabulary of our BPE, trained on the same captions")
    ap.add_argument("--wordpiece_vocab", default="", help="a BERT vocab.txt (PubMedBERT's for BiomedCLIP)")
    ap.add_argument("--clip_bpe", default="", help="open_clip merges .gz or a HF CLIP folder (default: open_clip's file)")
    args = ap.parse_args(argv)
    import tokenizer as ours
    lines = ours.read_lines(args.compare)
    rows = compare(lines, args.bpe_vocab_size, args.wordpiece_vocab, args.clip_bpe)
    chars = sum(len(t) for t in lines) / len(lines)
    print(f"{len(lines)} captions, {chars:.1f} characters each; tokens include the specials "
          f"(<sot>/<eot>, [CLS]/[SEP], our <|endoftext|>)")
    print(f"{'tokenizer':<12} {'vocab':>7} {'tokens':>8} {'p95':>6} {'>77':>7}")
    for name, vocab, mean, p95, over in rows:
        print(f"{name:<12} {vocab:>7} {mean:>8.1f} {p95:>6.0f} {100 * over:>6.1f}%")
    return rows


if __name__ == "__main__":
    main()
