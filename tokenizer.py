"""
Tokenizers for the GPT (and, later, CLIP's text tower): byte-level BPE trained on our corpus,
GPT-2's BPE loaded from its files, and a character-level baseline. Pure Python + `re`.

    python tokenizer.py --train=captions.txt --vocab_size=8192 --out=tok.json
    python tokenizer.py --train=captions.txt --vocab_size=8192 --out=tok.json \\
        --gpt2_vocab=gpt2/vocab.json --gpt2_merges=gpt2/merges.txt     # also compare with GPT-2's BPE

reports average tokens per line (one caption per line; ROCO's `ROCO_xxxxx<TAB>caption` id column
is dropped) for char-level, our BPE and GPT-2's BPE.

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
"""

import argparse
import heapq
import json
import os
import re
from collections import Counter

EOT = "<|endoftext|>"

# -----------------------------------------------------------------------------
# bytes <-> printable unicode (GPT-2's table: printable latin-1 bytes map to themselves,
# the others to 256+n, so no token string contains whitespace or control characters)


def bytes_to_unicode():
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}

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
        parts = list(word)
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
        with open(vocab_path, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{merges_path}: merge lines must be 'a b', got {bad[0]!r}")
        return cls(encoder, merges, kind="gpt2")


# -----------------------------------------------------------------------------
# training our byte-level BPE: word counts, then greedy merges of the most frequent adjacent pair,
# updating pair counts only in the words that contain the merged pair (a heap with lazy deletion)


def train_bpe(texts, vocab_size, min_frequency=2, verbose=False):
    """texts: iterable of documents. vocab_size includes the 256 bytes and <|endoftext|>.
    Ties between equally frequent pairs go to the pair of smaller ids, so training is deterministic."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} must be >= 257 (256 bytes + end-of-text)")
    counts = Counter()
    for text in texts:
        counts.update(pre_tokenize(text))
    symbols = [BYTE_ENCODER[b] for b in range(256)]  # id -> token string
    sym_id = {s: i for i, s in enumerate(symbols)}
    words = [list(piece.encode("utf-8")) for piece in counts]  # each word as a list of ids
    freqs = list(counts.values())
    pair_counts, where = Counter(), {}
    for wi, (w, c) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += c
            where.setdefault(pair, set()).add(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
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
            merged, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and w[i] == pair[0] and w[i + 1] == pair[1]:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
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
# CLI: train on a text file and compare tokens per line


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


def main(argv=None):
    ap = argparse.ArgumentParser(description="train a byte-level BPE and compare tokens per line")
    ap.add_argument("--train", required=True, help="text file, one document (caption, report) per line")
    ap.add_argument("--vocab_size", type=int, default=8192)
    ap.add_argument("--out", default="tok.json")
    ap.add_argument("--gpt2_vocab", default="", help="GPT-2 vocab.json / encoder.json (optional)")
    ap.add_argument("--gpt2_merges", default="", help="GPT-2 merges.txt / vocab.bpe (optional)")
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
