"""
Tokenizers. For the GPT: byte-level BPE trained on our corpus, GPT-2's BPE loaded from its files, and a
character-level baseline. For a radiology CLIP's text tower: CLIP's BPE, BERT's WordPiece, and our BPE in the
CLIP format. Pure Python + `re` (`regex` and `ftfy` are used for CLIP when installed).

    python tokenizer.py --train=captions.txt --vocab_size=8192 --out=tok.json
    python tokenizer.py --train=captions.txt --vocab_size=8192 --out=tok.json \\
        --gpt2_vocab=gpt2/vocab.json --gpt2_merges=gpt2/merges.txt     # also compare with GPT-2's BPE

reports average tokens per line (one caption per line; ROCO's `ROCO_xxxxx<TAB>caption` id column
is dropped) for char-level, our BPE and GPT-2's BPE.

    python tokenizer.py --compare=captions.txt [--bpe_vocab_size=8192] [--wordpiece_vocab=vocab.txt]

prints tokens per caption for CLIP BPE, WordPiece (when a vocab.txt is given) and our byte-level BPE trained
on the same captions (train_bpe), and how many captions overflow CLIP's 77-token context.

Byte-level BPE (Radford et al. 2019; Sennrich et al. 2016): text -> UTF-8 bytes, each byte a
printable unicode character (GPT-2's bytes_to_unicode), pre-tokenized into words by a regex, and
inside each word adjacent symbols are merged in the order the merges were learned. Every byte
has a token, so encode/decode round-trips any UTF-8 text exactly.

Pre-tokenization without the `regex` package: GPT-2's pattern uses \\p{L} (letters) and \\p{N}
(numbers). With `re` we use [^\\W\\d_] for letters and \\d for numbers. The two agree on ASCII and on
letters and decimal digits of every script; they differ on numeric characters that are not decimal
digits (superscripts like '²', fractions '½', Roman numerals): `re` counts them as letters,
GPT-2 as numbers. That changes how such words are split (so GPT-2 ids may differ on such text),
never the round trip, because the split is lossless (every character is matched).

The CLIP towers' tokenizers (build_tokenizer(kind, ...); each is called as tok(texts) -> (ids padded to the
context, lengths)):
  ClipBPE     CLIP's byte-level BPE (Radford et al. 2021): open_clip's bpe_simple_vocab_16e6.txt.gz, or a
              Hugging Face CLIP folder's vocab.json + merges.txt. Ids equal open_clip.tokenize().
  WordPiece   BERT's tokenizer (Devlin et al. 2019) from a vocab.txt: BasicTokenizer (clean, lower-case,
              strip accents, split punctuation) then greedy longest-match-first with '##' continuations.
              PubMedBERT / BiomedCLIP use it (vocab.txt of microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract).
  TrainedBPE  our byte-level BPE (train_bpe) trained on the training captions, in the CLIP format.

CLIP BPE, in open_clip's order: clean (ftfy.fix_text when ftfy is installed, html.unescape twice, collapse
whitespace, lower-case), pre-tokenize with CLIP's regex, map each UTF-8 byte to a printable character, BPE
inside each word with '</w>' marking the word end, wrap in <start_of_text> ... <end_of_text>, truncate to the
context (the last kept token becomes <end_of_text>) and pad with 0.
Differences from open_clip, by design:
  - without ftfy (an optional dependency) mojibake is not repaired ('caf\u00c3\u00a9' stays as it is); on clean
    UTF-8 text the ids are the same (the test checks real ROCO captions).
  - without the `regex` package, \\p{L} / \\p{N} become [^\\W\\d_] / \\d, as for GPT-2 above: letters and decimal
    digits of every script agree, non-decimal numerals ('\u00b2', '\u00bd') are split differently.
  - the literal strings '<start_of_text>' / '<end_of_text>' inside a caption are text, not special tokens.
"""

import argparse
import gzip
import heapq
import html
import json
import os
import re
import unicodedata
from collections import Counter

import configurator

try:  # exact \p{L} / \p{N} classes for CLIP when the `regex` package is present (open_clip depends on it)
    import regex as _re
    _CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
except ImportError:
    _re = re
    _CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+"""

try:
    import ftfy as _ftfy
except ImportError:
    _ftfy = None

EOT = "<|endoftext|>"

# -----------------------------------------------------------------------------
# bytes <-> printable unicode (GPT-2's table, shared with CLIP: printable latin-1 bytes map to themselves,
# the others to 256+n, so no token string contains whitespace or control characters)


def bytes_to_unicode():
    """The dict's order matters to CLIP: its first 256 ids are the values in this order (printable bytes first)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}

# -----------------------------------------------------------------------------
# shared by GPT-2's and CLIP's BPE: the merge loop inside one word, and reading a vocab.json + merges.txt pair


def bpe_merge(parts, ranks):
    """Merge adjacent symbols of one word, lowest-ranked pair first, until no pair in `ranks` is left."""
    while len(parts) > 1:
        best, best_rank = None, None
        for pair in zip(parts, parts[1:]):
            r = ranks.get(pair)
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


def read_vocab_merges(vocab_path, merges_path):
    """A Hugging Face / GPT-2 pair: vocab.json (token -> id) and merges.txt (one 'a b' per line, '#version' header)."""
    with open(vocab_path, encoding="utf-8") as f:
        encoder = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    return encoder, [tuple(line.split()) for line in lines if line and not line.startswith("#version")]


# -----------------------------------------------------------------------------
# pre-tokenization: GPT-2's pattern with \p{L} -> [^\W\d_] and \p{N} -> \d (see the module docstring)

GPT2_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def pre_tokenize(text):
    return GPT2_SPLIT.findall(text)


# -----------------------------------------------------------------------------
# byte-level BPE: our trained vocabulary and GPT-2's share this class


class BPETokenizer:
    """encoder: token string (byte-unicode characters) -> id; merges: list of (a, b) in priority order.
    kind: 'bpe' (trained here) or 'gpt2' (GPT-2's files)."""

    def __init__(self, encoder, merges, kind="bpe", eot=EOT):
        if eot not in encoder:
            raise ValueError(f"tokenizer vocabulary lacks the end-of-text token {eot!r}")
        self.encoder, self.kind, self.eot = dict(encoder), kind, eot
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.eot_id = self.encoder[eot]
        self.vocab_size = max(self.decoder) + 1
        self._cache = {}

    def _bpe_word(self, word):
        """word: a pre-token already mapped to byte-unicode characters -> list of token strings."""
        return bpe_merge(list(word), self.ranks)

    def encode(self, text):
        """Plain text -> ids. The end-of-text marker is never parsed from text; data preparation inserts eot_id."""
        ids = []
        for piece in pre_tokenize(text):
            cached = self._cache.get(piece)
            if cached is None:
                word = "".join(BYTE_ENCODER[b] for b in piece.encode("utf-8"))
                cached = [self.encoder[t] for t in self._bpe_word(word)]
                if len(self._cache) < 500_000:
                    self._cache[piece] = cached
            ids.extend(cached)
        return ids

    def token_bytes(self, i):
        """The UTF-8 bytes of token i (eot -> b'\\n': it stands in for the line break between documents)."""
        if i == self.eot_id:
            return b"\n"
        return bytes(BYTE_DECODER[c] for c in self.decoder[i])

    def decode(self, ids):
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                continue
            out += bytes(BYTE_DECODER[c] for c in self.decoder[i])
        return out.decode("utf-8", errors="replace")

    def to_dict(self):
        return {"kind": self.kind, "eot": self.eot, "encoder": self.encoder, "merges": [list(m) for m in self.merges]}

    def save(self, path):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)
        os.replace(tmp, path)

    @classmethod
    def from_gpt2_files(cls, vocab_path, merges_path):
        """GPT-2's encoder.json / vocab.json (token -> id) and vocab.bpe / merges.txt (one 'a b' merge per line)."""
        for p in (vocab_path, merges_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"GPT-2 tokenizer file {p} not found (vocab.json + merges.txt from a "
                                        f"Hugging Face gpt2 directory, or encoder.json + vocab.bpe from OpenAI)")
        encoder, merges = read_vocab_merges(vocab_path, merges_path)
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{merges_path}: merge lines must be 'a b', got {bad[0]!r}")
        return cls(encoder, merges, kind="gpt2")


# -----------------------------------------------------------------------------
# training our byte-level BPE: word counts, then greedy merges of the most frequent adjacent pair,
# updating pair counts only in the words that contain the merged pair (a heap with lazy deletion)


def _keep_merges(keep):
    """Merges (as byte strings) that make each word in `keep`, with and without a leading space, a single token:
    merge the first two pieces until one is left, re-running the merges so far (BPE order) after each."""
    merges = []
    for word in keep:
        for w in (word, " " + word):
            ranks = {m: i for i, m in enumerate(merges)}
            parts = bpe_merge([bytes([b]) for b in w.encode("utf-8")], ranks)
            while len(parts) > 1:
                merges.append((parts[0], parts[1]))
                parts = bpe_merge(parts, {m: i for i, m in enumerate(merges)})
    return merges


def train_bpe(texts, vocab_size, min_frequency=2, verbose=False, keep=()):
    """texts: iterable of documents. vocab_size includes the 256 bytes and <|endoftext|>.
    Ties between equally frequent pairs go to the pair of smaller ids, so training is deterministic.
    keep: words that must stay one token (e.g. 'XXXX', the IU X-ray anonymisation mark): their merges come first."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} must be >= 257 (256 bytes + end-of-text)")
    counts = Counter()
    for text in texts:
        counts.update(pre_tokenize(text))
    symbols = [BYTE_ENCODER[b] for b in range(256)]  # id -> token string
    sym_id = {s: i for i, s in enumerate(symbols)}
    words = [list(piece.encode("utf-8")) for piece in counts]  # each word as a list of ids
    merges = []
    for a, b in _keep_merges(keep):
        ia, ib = sym_id["".join(BYTE_ENCODER[x] for x in a)], sym_id["".join(BYTE_ENCODER[x] for x in b)]
        merges.append((symbols[ia], symbols[ib]))
        if symbols[ia] + symbols[ib] not in sym_id:
            sym_id[symbols[ia] + symbols[ib]] = len(symbols)
            symbols.append(symbols[ia] + symbols[ib])
        words = [_merge_ids(w, (ia, ib), sym_id[symbols[ia] + symbols[ib]]) for w in words]
    freqs = list(counts.values())
    pair_counts, where = Counter(), {}
    for wi, (w, c) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += c
            where.setdefault(pair, set()).add(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    while len(symbols) + 1 < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale heap entry
        if -neg < min_frequency:
            break
        merges.append((symbols[pair[0]], symbols[pair[1]]))
        merged_str = symbols[pair[0]] + symbols[pair[1]]
        new_id = sym_id.get(merged_str)  # 'ab'+'c' after 'a'+'bc': same string, same token
        if new_id is None:
            new_id = sym_id[merged_str] = len(symbols)
            symbols.append(merged_str)
        changed = set()
        for wi in where.pop(pair, ()):
            w, c = words[wi], freqs[wi]
            if len(w) < 2:
                continue
            old_pairs = list(zip(w, w[1:]))
            if pair not in old_pairs:
                continue  # stale index entry
            merged = _merge_ids(w, pair, new_id)
            for p in old_pairs:
                pair_counts[p] -= c
                changed.add(p)
            for p in zip(merged, merged[1:]):
                pair_counts[p] += c
                where.setdefault(p, set()).add(wi)
                changed.add(p)
            words[wi] = merged
        pair_counts.pop(pair, None)
        for p in changed:
            if p != pair and pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
        if verbose and len(merges) % 1000 == 0:
            print(f"bpe: {len(merges)} merges, last {symbols[-1]!r} x{-neg}")
    encoder = {s: i for i, s in enumerate(symbols)}
    encoder[EOT] = len(symbols)
    return BPETokenizer(encoder, merges, kind="bpe")


def _merge_ids(w, pair, new_id):
    """One word (list of ids) with every non-overlapping occurrence of pair, left to right, replaced by new_id."""
    merged, i = [], 0
    while i < len(w):
        if i < len(w) - 1 and w[i] == pair[0] and w[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(w[i])
            i += 1
    return merged


# -----------------------------------------------------------------------------
# character level: one id per character seen in the corpus, + end-of-text


class CharTokenizer:
    kind = "char"

    def __init__(self, chars, eot=EOT):
        self.chars = list(chars)
        self.eot = eot
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    @classmethod
    def from_texts(cls, texts):
        seen = set()
        for t in texts:
            seen.update(t)
        return cls(sorted(seen))

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the char-level vocabulary (built from the "
                             f"training corpus); use a byte-level BPE tokenizer for open text") from None

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids if int(i) != self.eot_id)

    def token_bytes(self, i):
        return b"\n" if i == self.eot_id else self.chars[i].encode("utf-8")

    def to_dict(self):
        return {"kind": "char", "eot": self.eot, "chars": self.chars}

    def save(self, path):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)
        os.replace(tmp, path)


# -----------------------------------------------------------------------------
# loading any of them (from a saved JSON or the dict stored in a checkpoint)


def from_dict(d):
    if d["kind"] == "char":
        return CharTokenizer(d["chars"], d.get("eot", EOT))
    if d["kind"] in ("bpe", "gpt2"):
        return BPETokenizer(d["encoder"], d["merges"], kind=d["kind"], eot=d.get("eot", EOT))
    raise ValueError(f"unknown tokenizer kind {d['kind']!r} (char, bpe, gpt2)")


def load(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path} not found (make one with: python tokenizer.py --train=corpus.txt --out={path})")
    with open(path, encoding="utf-8") as f:
        return from_dict(json.load(f))


# -----------------------------------------------------------------------------
# CLIP tokenizers (1/4): CLIP's byte-level BPE

CONTEXT_LENGTH = 77  # CLIP's text context (all OpenAI / open_clip ViT models)
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the 16e6 file: vocab 49,408 with the 2 specials


def default_clip_bpe_path():
    """open_clip ships the merges file inside its package; we only read the file (no open_clip import at run time)."""
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("CLIP's merges file bpe_simple_vocab_16e6.txt.gz not found: pip install open_clip_torch, "
                                "or pass a Hugging Face CLIP folder (vocab.json + merges.txt) as clip_bpe_path")
    return os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")


class ClipBPE:
    """encode(text) -> ids without specials; __call__(texts) -> (ids int64 list of lists padded to context, lengths)."""

    def __init__(self, path="", context_length=CONTEXT_LENGTH):
        path = path or default_clip_bpe_path()
        self.byte_encoder, self.byte_decoder = BYTE_ENCODER, BYTE_DECODER
        if os.path.isdir(path):  # a Hugging Face CLIP folder
            vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
            for p in (vocab_file, merges_file):
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"{p} not found: a Hugging Face CLIP tokenizer folder holds vocab.json and merges.txt")
            self.encoder, merges = read_vocab_merges(vocab_file, merges_file)
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
        return bpe_merge(list(word[:-1]) + [word[-1] + "</w>"], self.ranks)

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
# CLIP tokenizers (2/4): BERT WordPiece


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
# CLIP tokenizers (3/4): our byte-level BPE (train_bpe) in the CLIP format: ids + <|endoftext|>, truncated keeping it, padded with 0


class TrainedBPE:
    """A small vocabulary trained on the training captions: a from-scratch text tower then has ~1k embedding
    rows instead of CLIP's 49,408 (most of which a radiology corpus never uses)."""

    def __init__(self, bpe, context_length=CONTEXT_LENGTH):
        self.bpe, self.context_length = bpe, context_length
        self.eot_id, self.pad_id, self.vocab_size = bpe.eot_id, 0, bpe.vocab_size

    @classmethod
    def train(cls, texts, vocab_size, context_length=CONTEXT_LENGTH):
        return cls(train_bpe(texts, vocab_size), context_length)

    @classmethod
    def from_dict(cls, d, context_length=CONTEXT_LENGTH):
        return cls(from_dict(d), context_length)  # the module's from_dict (char / bpe / gpt2)

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
# CLIP tokenizers (4/4): construction from a config, and the cached-array format


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
# CLI: --train (train our BPE on a text file, tokens per line vs char-level / GPT-2) and
# --compare (tokens per caption: CLIP BPE vs WordPiece vs our BPE)


def read_lines(path):
    """One document per line; a ROCO captions.txt line 'ROCO_xxxxx<TAB> caption' keeps only the caption."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if "\t" in line and line.split("\t", 1)[0].startswith("ROCO_"):
                line = line.split("\t", 1)[1]
            line = line.strip()
            if line:
                out.append(line)
    return out


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
    bpe = train_bpe(lines, bpe_vocab_size)
    row("our bpe", bpe.vocab_size, [len(bpe.encode(t)) for t in lines], 1)
    return rows


# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per argument; CHECKS: across)
RANGES = dict(vocab_size="[257, 1048576]", bpe_vocab_size="[257, 1048576]")  # 256 bytes + eot at least


def main(argv=None):
    ap = argparse.ArgumentParser(description="--train: train a byte-level BPE and compare tokens per line with char-level "
                                             "(and GPT-2); --compare: tokens per caption, CLIP BPE vs WordPiece vs our BPE")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", help="text file, one document (caption, report) per line")
    mode.add_argument("--compare", help="captions, one per line (ROCO captions.txt works as is)")
    ap.add_argument("--vocab_size", type=int, default=8192, help="--train: vocabulary of the BPE to train")
    ap.add_argument("--out", default="tok.json", help="--train: where to save it")
    ap.add_argument("--gpt2_vocab", default="", help="--train: GPT-2 vocab.json / encoder.json (optional)")
    ap.add_argument("--gpt2_merges", default="", help="--train: GPT-2 merges.txt / vocab.bpe (optional)")
    ap.add_argument("--bpe_vocab_size", type=int, default=8192, help="--compare: vocabulary of our BPE, trained on the same captions")
    ap.add_argument("--wordpiece_vocab", default="", help="--compare: a BERT vocab.txt (PubMedBERT's for BiomedCLIP)")
    ap.add_argument("--clip_bpe", default="", help="--compare: open_clip merges .gz or a HF CLIP folder (default: open_clip's file)")
    args = configurator.parse_args(ap, argv, RANGES)
    if args.compare is not None:
        return _main_compare(args)
    docs = read_lines(args.train)
    tok = train_bpe(docs, args.vocab_size, verbose=True)
    tok.save(args.out)
    n_chars = sum(len(d) for d in docs)
    rows = [("char", len(set("".join(docs))) + 1, n_chars), ("bpe (ours)", tok.vocab_size, sum(len(tok.encode(d)) for d in docs))]
    if args.gpt2_vocab and args.gpt2_merges:
        g = BPETokenizer.from_gpt2_files(args.gpt2_vocab, args.gpt2_merges)
        rows.append(("gpt2", g.vocab_size, sum(len(g.encode(d)) for d in docs)))
    print(f"{len(docs)} lines, {n_chars / len(docs):.1f} chars/line; saved {args.out}")
    print(f"{'tokenizer':<12} {'vocab':>7} {'tokens/line':>12} {'chars/token':>12}")
    for name, v, n in rows:
        print(f"{name:<12} {v:>7} {n / len(docs):>12.1f} {n_chars / n:>12.2f}")
    return rows


def _main_compare(args):
    lines = read_lines(args.compare)
    rows = compare(lines, args.bpe_vocab_size, args.wordpiece_vocab, args.clip_bpe)
    chars = sum(len(t) for t in lines) / len(lines)
    print(f"{len(lines)} captions, {chars:.1f} characters each; tokens include the specials "
          f"(<sot>/<eot>, [CLS]/[SEP], our <|endoftext|>)")
    print(f"{'tokenizer':<12} {'vocab':>7} {'tokens':>8} {'p95':>6} {'>77':>7}")
    for name, vocab, mean, p95, over in rows:
        print(f"{name:<12} {vocab:>7} {mean:>8.1f} {p95:>6.0f} {100 * over:>6.1f}%")
    return rows


if __name__ == "__main__":
    configurator.cli(main)
