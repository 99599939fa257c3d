"""
Text data for the GPT: captions, reports and (image, report) pairs -> token files; the text-window sampler (pairs
use data.py's epoch sampler, writer and meta.json reader); the report metrics (BLEU-4, ROUGE-L); the report labeler itself (label_reports) is labeler.py.

    python text_data.py --dataset=phantom_reports --tokenizer=bpe --vocab_size=1024  # data/phantom_reports, seconds
    python text_data.py --dataset=phantom_reports --tokenizer=char --out_dir=data/phantom_reports_char
    python text_data.py --dataset=phantom_pairs --tokenizer=bpe --vocab_size=1024 --max_tokens=64  # images + reports
    python text_data.py --dataset=roco_text --root=/data/roco --tokenizer=bpe --vocab_size=8192
    python text_data.py --dataset=text --files='/data/pubmed/*.txt' --tokenizer=bpe --vocab_size=16384 --out_dir=data/pubmed
    python text_data.py --dataset=roco_text --root=/data/roco --tokenizer=data/pubmed/tokenizer.json  # reuse a tokenizer
    python text_data.py --dataset=roco_text --root=/data/roco --tokenizer=gpt2 --gpt2_dir=/models/gpt2  # GPT-2's ids
    python text_data.py --dataset=iu_xray --root=/data/iu_xray --vocab_size=1024   # IU X-ray reports (+ NLMCXR_png/: pairs)
    python text_data.py --dataset=iu_xray --root=/data/iu_xray --label_eval        # the labeler vs the manual MeSH tags

Text layout (language modelling), data/<name>/:
  train.bin, val.bin   uint16 token ids; every document is followed by the end-of-text token (and the
                       file starts with one), so eot doubles as "start of a document"
  tokenizer.json       the tokenizer (tokenizer.load), copied into every checkpoint
  meta.json            vocab_size, tokenizer kind + source, eot_id, per-split documents/tokens/bytes,
                       unigram entropy of the train tokens (nats/token): the loss of a model that
                       ignores context, the number a language model must beat
Pairs layout (image-conditioned), data/<name>/: a prepared folder of data.py's (data.write_prepared, read by
data.PreparedSplit: each file through a temporary name, meta.json last, with data_hash) plus the report tokens:
  {split}_images.u8    N x H x W uint8, {split}_labels.npy N x C float32,
  {split}_index.csv    data.py's index columns (row, path, patient_id, study_id, view, age, sex, text, indication)
  {split}_tokens.npy   N x T int32: eot, report tokens, eot, then eot padding
  {split}_lengths.npy  N int32: real tokens per row (both eots included); targets past it are ignored
Sources: ROCO `{train,validation,test}/radiology/captions.txt` (`ROCO_xxxxx<TAB>caption`), any text
files (one document per line), the phantom's reports (phantom.generate; split by patient), the IU X-ray
collection's Open-i XML reports (findings + impression; split by report).
"""

import argparse
import glob
import json
import math
import os
import re
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

import configurator
import data
import phantom
import tokenizer as tok_lib
from labeler import OBSERVATIONS, PATHOLOGIES, RULES, label_reports

# -----------------------------------------------------------------------------
# sources: lists of documents per split


def read_roco_captions(root):
    """ROCO: root/{train,validation,test}/radiology/captions.txt -> {'train', 'val', 'test'}: [caption]."""
    out = {}
    for split, folder in (("train", "train"), ("val", "validation"), ("test", "test")):
        path = os.path.join(root, folder, "radiology", "captions.txt")
        if not os.path.isfile(path):
            if split == "train":
                raise FileNotFoundError(f"{path} not found: --root must hold ROCO's train/validation/test folders "
                                        f"(github.com/razorx89/roco-dataset)")
            continue
        out[split] = tok_lib.read_lines(path)
    return out


def split_of(key, val_frac, test_frac=0.0):
    """Deterministic split from a stable hash of a key (document, patient id): same key, same split."""
    u = zlib.crc32(str(key).encode("utf-8")) / 2**32
    return "val" if u < val_frac else ("test" if u < val_frac + test_frac else "train")


def read_text_files(pattern, val_frac):
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"--files={pattern!r} matched no file (one document per line, e.g. 'pubmed/*.txt')")
    out = {"train": [], "val": []}
    for path in files:
        for doc in tok_lib.read_lines(path):
            out[split_of(doc, val_frac)].append(doc)  # by content: duplicates never straddle the split
    return out


def phantom_records(n_images, image_size, seed, val_frac, test_frac):
    """phantom.generate, split by patient exactly as `python data.py --dataset=phantom` splits the same phantom
    (same n_images, seed and fractions), so an image model trained with train.py on data/phantom never saw the
    val/test images of these pairs (train_gpt.py --image_init relies on it)."""
    d = phantom.generate(n_images, image_size=image_size, seed=seed)
    recs = [dict(patient_id=str(r["patient_id"]), split="") for r in d["records"]]
    rows = data.split_patients(recs, np.asarray(d["labels"], np.float32), "multilabel", val_frac, test_frac, seed)
    return d, {k: np.asarray(v, dtype=np.int64) for k, v in rows.items() if len(v)}


# -----------------------------------------------------------------------------
# source: the Indiana University chest X-ray collection (Open-i, Demner-Fushman et al. 2016)
# One XML per report: COMPARISON / INDICATION / FINDINGS / IMPRESSION, manual MeSH <major> headings and automatic
# ones, one <parentImage id="CXR<n>_IM-<series>-<k>"> per image. The collection has no patient ids and one report
# per study, so the report is the patient unit: the split is by report id (stable hash), as for other
# de-identified report sets. 'XXXX' is the collection's anonymisation token (dates, names, some words).

IU_ANON = "XXXX"
IU_VIEWS = (("lateral", "lateral"), ("frontal", "frontal"), ("pa", "frontal"), ("ap", "frontal"))


def _report_order(name):
    """Numeric report order (2.xml before 10.xml)."""
    digits = re.sub(r"\D", "", os.path.basename(name))
    return (int(digits) if digits else -1, name)


def _iu_xml_sources(root):
    """Yield (name, bytes) of every report XML: root/ecgen-radiology/*.xml, a .tgz/.tar.gz of them, or root/*.tgz."""
    import tarfile
    folder = os.path.join(root, "ecgen-radiology") if os.path.isdir(root) else ""
    if folder and os.path.isdir(folder):
        for name in sorted(os.listdir(folder), key=_report_order):
            if name.endswith(".xml"):
                with open(os.path.join(folder, name), "rb") as f:
                    yield name, f.read()
        return
    archives = [root] if os.path.isfile(root) else sorted(glob.glob(os.path.join(root, "*.tgz")) + glob.glob(os.path.join(root, "*.tar.gz")))
    if not archives:
        raise FileNotFoundError(f"--root={root}: no ecgen-radiology/ folder and no .tgz of it (NLMCXR_reports.tgz "
                                f"from openi.nlm.nih.gov/faq, unpacked or not)")
    for path in archives:
        with tarfile.open(path) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: _report_order(m.name)):
                if m.isfile() and m.name.endswith(".xml"):
                    yield os.path.basename(m.name), tar.extractfile(m).read()


def _iu_view(caption, k, n):
    """'frontal' / 'lateral' of image k of n. Two images: the collection files the frontal view first (ids ...-1001,
    then ...-2001). One image: the view its caption names, if exactly one. Otherwise '' (unknown): the caption
    describes the whole study ("PA and lateral"), so it cannot tell three or more images apart."""
    if n == 2:
        return ("frontal", "lateral")[k]
    named = {v for w, v in IU_VIEWS if w in set(re.findall(r"[a-z]+", caption.lower()))}
    return named.pop() if n == 1 and len(named) == 1 else ""


def parse_iu_report(xml_bytes, name=""):
    """One Open-i XML -> dict(report_id, findings, impression, indication, comparison, mesh_major, mesh_automatic,
    images=[(image_id, view)], text = findings + impression)."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as e:
        raise ValueError(f"{name}: not an Open-i report XML ({e})") from None
    uid = root.find("uId")
    if uid is None:
        raise ValueError(f"{name}: no <uId> element; is this an ecgen-radiology report?")
    sec = {(a.get("Label") or "").upper(): " ".join((a.text or "").split()) for a in root.iter("AbstractText")}
    imgs = root.findall("parentImage")
    images = [(p.get("id"), _iu_view(p.findtext("caption") or "", k, len(imgs))) for k, p in enumerate(imgs)]
    for image_id, _ in images:  # the id names NLMCXR_png/<id>.png: it must not reach a file outside that folder
        if image_id and (os.path.isabs(image_id) or os.path.normpath(image_id).split(os.sep)[0] == os.pardir):
            raise ValueError(f"{name}: <parentImage id={image_id!r}> leaves the image folder NLMCXR_png/ (an id is a "
                             f"file name there, e.g. CXR1_IM-0001-1001); correct or remove this report's XML")
    rec = dict(report_id=uid.get("id"), findings=sec.get("FINDINGS", ""), impression=sec.get("IMPRESSION", ""),
               indication=sec.get("INDICATION", ""), comparison=sec.get("COMPARISON", ""),
               mesh_major=[m.text.strip() for m in root.iter("major") if m.text],
               mesh_automatic=[m.text.strip() for m in root.iter("automatic") if m.text], images=images)
    rec["text"] = " ".join(s for s in (rec["findings"], rec["impression"]) if s)
    return rec


def read_iu_xray(root, val_frac=0.1, test_frac=0.1):
    """All reports with findings or impression -> (records with 'split', n_skipped). Split by report id (see above)."""
    records, skipped = [], 0
    for name, b in _iu_xml_sources(root):
        rec = parse_iu_report(b, name)
        if not rec["text"]:
            skipped += 1  # neither findings nor impression: nothing to learn or label
            continue
        rec.update(patient_id=rec["report_id"], study_id=rec["report_id"], split=split_of(rec["report_id"], val_frac, test_frac))
        records.append(rec)
    if not records:
        raise FileNotFoundError(f"--root={root}: no report with findings or impression found")
    return records, skipped


def iu_pair_labels(texts):
    """Image-report pair targets from the report: label_reports' 14 observations with uncertain -> NaN (ignored) and
    not mentioned -> 0 (a report names what it sees; CheXpert's blank = zeros policy)."""
    y = label_reports(texts)
    unmentioned = np.isnan(y)
    y[y == -1] = np.nan
    y[unmentioned] = 0.0
    return y


def prepare_iu_pairs(args, out_dir, recs, skipped, tok_meta):
    """IU X-ray with root/NLMCXR_png/<image id>.png: one row per image (frontal and lateral both; the index says
    which), the report as its text, the indication beside it, labels from iu_pair_labels. Images that are missing
    are counted and skipped; the split stays the report's."""
    png_dir = os.path.join(args.root, "NLMCXR_png")
    rows, missing = [], 0
    for r in recs:
        for image_id, view in r["images"]:
            path = os.path.join(png_dir, f"{image_id}.png")
            if not os.path.isfile(path):
                missing += 1
                continue
            rows.append(dict(r, path=path, view=view, image_id=image_id))
    if not rows:
        raise FileNotFoundError(f"{png_dir}: none of the reports' images (<parentImage id>.png) is there")
    labels = iu_pair_labels([r["text"] for r in rows])
    parts = {}
    for split in ("train", "val", "test"):
        ix = [i for i, r in enumerate(rows) if r["split"] == split]
        if ix:
            images = np.stack([data.decode_image(rows[i]["path"], args.image_size) for i in ix])
            parts[split] = (images, labels[ix], [rows[i] for i in ix])
    tok = make_tokenizer(args.tokenizer, [r["text"] for r in parts["train"][2]], [r["text"] for r in rows],
                         args.vocab_size, args.gpt2_dir, keep=(IU_ANON,))
    meta = {"name": os.path.basename(out_dir.rstrip("/")), "source": f"IU X-ray images + reports from {args.root}; "
            f"{skipped} reports without findings or impression skipped, {missing} images missing", **tok_meta}
    return write_pairs(out_dir, parts, tok, OBSERVATIONS, meta, args.max_tokens)


# -----------------------------------------------------------------------------
# tokenizer choice


def make_tokenizer(spec, train_docs, all_docs, vocab_size, gpt2_dir, keep=()):
    """spec: char | bpe (trained on the train documents; `keep` words stay one token) | gpt2 (files in gpt2_dir) |
    path to a tokenizer.json."""
    if spec == "char":
        return tok_lib.CharTokenizer.from_texts(all_docs)  # chars of every split: val must not hit an unknown char
    if spec == "bpe":
        return tok_lib.train_bpe(train_docs, vocab_size, keep=keep)
    if spec == "gpt2":
        for v, m in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if os.path.isfile(os.path.join(gpt2_dir, v)):
                return tok_lib.BPETokenizer.from_gpt2_files(os.path.join(gpt2_dir, v), os.path.join(gpt2_dir, m))
        raise FileNotFoundError(f"--gpt2_dir={gpt2_dir!r} holds neither vocab.json+merges.txt nor encoder.json+vocab.bpe")
    return tok_lib.load(spec)


def token_byte_lengths(tok):
    """UTF-8 bytes per token id (eot = 1: it stands for the line break between documents); for bits per byte."""
    return np.array([len(tok.token_bytes(i)) if _has_token(tok, i) else 0 for i in range(tok.vocab_size)], dtype=np.int64)


def _has_token(tok, i):
    return i == tok.eot_id or (tok.kind == "char" and i < len(tok.chars)) or (tok.kind != "char" and i in tok.decoder)


def unigram_entropy(ids, vocab_size):
    counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------
# writing: text bins and (image, report) pairs


def write_text_bins(out_dir, docs, tok, meta):
    """docs: {split: [str]} -> {split}.bin (uint16) + tokenizer.json + meta.json. Returns meta."""
    if tok.vocab_size > 65536:
        raise ValueError(f"vocab_size={tok.vocab_size} does not fit uint16 token files")
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, "meta.json").unlink(missing_ok=True)  # a rewrite interrupted below must not look finished
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    splits = {}
    for split, texts in docs.items():
        ids = [tok.eot_id]
        for t in texts:
            ids.extend(tok.encode(t))
            ids.append(tok.eot_id)
        arr = np.array(ids, dtype=np.uint16)
        tmp = os.path.join(out_dir, f"{split}.bin.tmp")
        arr.tofile(tmp)
        os.replace(tmp, os.path.join(out_dir, f"{split}.bin"))
        splits[split] = {"documents": len(texts), "tokens": int(arr.size), "bytes": int(sum(len(t.encode("utf-8")) + 1 for t in texts))}
        if split == "train":
            meta["unigram_entropy"] = unigram_entropy(arr, tok.vocab_size)
    meta.update(kind="text", vocab_size=tok.vocab_size, eot_id=tok.eot_id, dtype="uint16", splits=splits,
                created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    data.atomic_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


def write_pairs(out_dir, parts, tok, classes, meta, max_tokens=0):
    """parts: {split: (images uint8 N x H x W, labels N x C, records)}; the report is records[i]['text']. The folder
    is one of data.py's (data.write_prepared: images, labels, index CSV, data_hash, meta.json last) plus each split's
    report tokens, {split}_tokens.npy (N, T) and {split}_lengths.npy, and tokenizer.json, written before it.
    max_tokens: row length T (0 = the longest report + 2); longer reports are cut and counted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # a rewrite interrupted below must not look finished
    tok.save(str(out / "tokenizer.json"))
    encoded = {s: [tok.encode(r["text"]) for r in recs] for s, (_, _, recs) in parts.items()}
    T = max_tokens or max(len(e) for es in encoded.values() for e in es) + 2
    truncated = 0
    for split, (_, _, records) in parts.items():
        toks = np.full((len(records), T), tok.eot_id, dtype=np.int32)
        lengths = np.zeros(len(records), dtype=np.int32)
        for i, ids in enumerate(encoded[split]):
            truncated += len(ids) > T - 2
            ids = [tok.eot_id] + ids[: T - 2] + [tok.eot_id]
            toks[i, : len(ids)] = ids
            lengths[i] = len(ids)
        data.save_npy(out / f"{split}_tokens.npy", toks)
        data.save_npy(out / f"{split}_lengths.npy", lengths)
        if split == "train":
            meta["unigram_entropy"] = unigram_entropy(
                np.concatenate([toks[i, 1:lengths[i]] for i in range(len(records))]), tok.vocab_size)
    meta.update(kind="pairs", task="multilabel", vocab_size=tok.vocab_size, eot_id=tok.eot_id, classes=list(classes),
                max_tokens=T, truncated=int(truncated))
    return data.write_prepared(out, {s: (np.ascontiguousarray(images, dtype=np.uint8), np.asarray(labels, np.float32),
                                         records) for s, (images, labels, records) in parts.items()}, meta)


def prepare(args):
    """Everything main() does, from an argparse namespace; returns meta."""
    out_dir = args.out_dir or os.path.join("data", args.dataset)
    tok_meta = {"tokenizer": args.tokenizer if args.tokenizer in ("char", "bpe", "gpt2") else "file",
                "tokenizer_source": {"gpt2": args.gpt2_dir, "bpe": f"trained, vocab_size={args.vocab_size}"}.get(args.tokenizer, args.tokenizer)}
    if args.dataset in ("phantom_pairs",):
        d, idx = phantom_records(args.n_images, args.image_size, args.seed, args.val_frac, args.test_frac)
        recs = d["records"]
        docs = {s: [recs[i]["text"] for i in ix] for s, ix in idx.items()}
        tok = make_tokenizer(args.tokenizer, docs["train"], sum(docs.values(), []), args.vocab_size, args.gpt2_dir)
        parts = {s: (d["images"][ix], d["labels"][ix], [recs[i] for i in ix]) for s, ix in sorted(idx.items())}
        meta = {"name": os.path.basename(out_dir.rstrip("/")), "source": f"phantom.generate({args.n_images}, "
                f"image_size={args.image_size}, seed={args.seed})", **tok_meta}
        return write_pairs(out_dir, parts, tok, d["classes"], meta, args.max_tokens)
    keep = ()  # words the trained BPE keeps whole
    if args.dataset == "phantom_reports":
        d, idx = phantom_records(args.n_images, 16, args.seed, args.val_frac, 0.0)  # images unused: smallest size
        docs = {s: [d["records"][i]["text"] for i in ix] for s, ix in sorted(idx.items())}
        source = f"phantom.generate({args.n_images}, seed={args.seed}) reports"
    elif args.dataset == "roco_text":
        if not args.root:
            raise ValueError("--dataset=roco_text needs --root=<folder with train/ validation/ test/>")
        docs = read_roco_captions(args.root)
        source = f"ROCO captions from {args.root}"
    elif args.dataset == "iu_xray":
        if not args.root:
            raise ValueError("--dataset=iu_xray needs --root=<folder with ecgen-radiology/ or NLMCXR_reports.tgz>")
        recs, skipped = read_iu_xray(args.root, args.val_frac, args.test_frac)
        if os.path.isdir(os.path.join(args.root, "NLMCXR_png")):
            return prepare_iu_pairs(args, out_dir, recs, skipped, tok_meta)
        docs = {s: [r["text"] for r in recs if r["split"] == s] for s in ("train", "val", "test")}
        source = f"IU X-ray reports (findings + impression) from {args.root}; {skipped} without either skipped"
        keep = (IU_ANON,)
    elif args.dataset == "text":
        if not args.files:
            raise ValueError("--dataset=text needs --files='<glob>' (one document per line)")
        docs = read_text_files(args.files, args.val_frac)
        source = f"text files {args.files}"
    else:
        raise ValueError(f"unknown --dataset={args.dataset!r}: phantom_reports, phantom_pairs, roco_text, text")
    if not docs.get("val"):
        print(f"warning: no validation documents (--val_frac={args.val_frac}); train_gpt.py needs a val.bin")
    tok = make_tokenizer(args.tokenizer, docs["train"], sum(docs.values(), []), args.vocab_size, args.gpt2_dir,
                         keep=keep)
    meta = {"name": os.path.basename(out_dir.rstrip("/")), "source": source, **tok_meta}
    return write_text_bins(out_dir, {s: d for s, d in docs.items() if d}, tok, meta)


# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per argument; CHECKS: across)
RANGES = dict(vocab_size="[257, 1048576]", max_tokens="[0, 65536]")  # bpe: 256 bytes + eot at least
CHECKS = {"val_frac + test_frac < 1": "the patients left over are the train split"}


def main(argv=None):
    ap = argparse.ArgumentParser(description="prepare text / (image, report) data for train_gpt.py")
    ap.add_argument("--dataset", required=True, help="phantom_reports | phantom_pairs | roco_text | iu_xray | text")
    ap.add_argument("--out_dir", default="", help="default data/<dataset>")
    ap.add_argument("--root", default="", help="roco_text: the ROCO folder; iu_xray: folder with ecgen-radiology/ "
                    "(+ NLMCXR_png/ for image-report pairs) or the reports .tgz")
    ap.add_argument("--label_eval", action="store_true", help="iu_xray: score label_reports against the manual MeSH "
                    "tags (prints a table, writes nothing)")
    ap.add_argument("--files", default="", help="text: glob of files, one document per line")
    ap.add_argument("--tokenizer", default="bpe", help="char | bpe | gpt2 | path/to/tokenizer.json")
    ap.add_argument("--vocab_size", type=int, default=8192, help="bpe: vocabulary incl. 256 bytes + eot")
    ap.add_argument("--gpt2_dir", default="", help="gpt2: folder with vocab.json+merges.txt (or encoder.json+vocab.bpe)")
    ap.add_argument("--n_images", type=int, default=12000, help="phantom: images (= reports) to generate")
    ap.add_argument("--image_size", type=int, default=64, help="phantom_pairs: pixels")
    ap.add_argument("--max_tokens", type=int, default=0, help="pairs: tokens per row (0 = longest report + 2)")
    ap.add_argument("--val_frac", type=float, default=0.15, help="phantom/text: validation fraction (by patient / document)")
    ap.add_argument("--test_frac", type=float, default=0.15, help="phantom_pairs: test fraction (by patient)")
    ap.add_argument("--seed", type=int, default=0)
    args = configurator.parse_args(ap, argv, RANGES, CHECKS)
    if args.label_eval:
        if args.dataset != "iu_xray" or not args.root:
            raise ValueError("--label_eval needs --dataset=iu_xray --root=<folder with ecgen-radiology/ or the .tgz>")
        return label_eval(read_iu_xray(args.root, args.val_frac, args.test_frac)[0])
    t0 = time.time()
    meta = prepare(args)
    print(json.dumps({k: meta[k] for k in ("name", "source", "tokenizer", "vocab_size", "splits", "unigram_entropy") if k in meta}))
    print(f"prepared in {time.time() - t0:.1f}s")
    return meta


def split_bytes(data, tok):
    """A token file back to the bytes it encodes (eot -> newline), as bits per byte counts them."""
    table = [tok.token_bytes(i) if _has_token(tok, i) else b"" for i in range(tok.vocab_size)]
    return b"".join(table[i] for i in np.asarray(data))


def xz_bpb(train_data, val_data, tok, max_bytes=64 << 20):
    """Classical baseline for val bits per byte: xz (LZMA, preset 9) of the val text given the train text,
    (len(xz(train + val)) - len(xz(train))) * 8 / len(val). None when train + val exceed max_bytes (slow)."""
    import lzma
    if len(train_data) + len(val_data) > max_bytes // 2:  # tokens: a few bytes each
        return None
    train, val = split_bytes(train_data, tok), split_bytes(val_data, tok)
    if len(train) + len(val) > max_bytes:
        return None
    xz = lambda b: len(lzma.compress(b, preset=9))  # noqa: E731
    return (xz(train + val) - xz(train)) * 8 / len(val)


# -----------------------------------------------------------------------------
# reading + samplers: batches are a pure function of (seed, step); rank r takes its slice


def load_bin(data_dir, split):
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")


def text_windows(n_tokens, block_size, global_batch, seed, step):
    """Start offsets of the global batch's windows at this step (uniform, with replacement)."""
    hi = n_tokens - block_size - 1
    assert hi > 0, f"token file of {n_tokens} tokens is shorter than block_size+1={block_size + 1}"
    return np.random.default_rng([seed, step]).integers(0, hi + 1, size=global_batch)


def text_batch(data, starts, block_size):
    """(x, y) int64 arrays (B, T): the windows and the same windows shifted by one token."""
    w = np.stack([np.asarray(data[s: s + block_size + 1], dtype=np.int64) for s in starts])
    return w[:, :-1], w[:, 1:]


def eval_windows(n_tokens, block_size, max_windows):
    """Non-overlapping windows over the whole file (every token predicted once), or max_windows of them evenly
    spaced when the file is larger. Each rank evaluates starts[rank::world]; sums are all-reduced."""
    starts = np.arange(0, n_tokens - block_size - 1 + 1, block_size)
    assert len(starts) > 0, f"validation file of {n_tokens} tokens is shorter than block_size+1={block_size + 1}"
    if max_windows and len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(np.int64)]
    return starts


class Pairs(data.PreparedSplit):
    """One split of a pairs folder: data.py's prepared split (.images memmap, .labels, .index, .meta) and the report
    tokens (.tokens (N, T) int32, .lengths)."""

    def __init__(self, data_dir, split):
        prepare = f"python text_data.py --dataset=phantom_pairs --out_dir={data_dir}"
        kind = data.load_meta(data_dir, prepare).get("kind")
        if kind != "pairs":
            raise ValueError(f"{data_dir} holds {kind!r} data; cond='image' needs (image, report) pairs "
                             f"(python text_data.py --dataset=phantom_pairs)")
        super().__init__(data_dir, split, prepare)
        self.tokens = np.load(self.data_dir / f"{split}_tokens.npy")
        self.lengths = np.load(self.data_dir / f"{split}_lengths.npy")
        assert len(self.tokens) == len(self.lengths) == len(self.labels), f"{data_dir} {split}: tokens / labels differ"

    def batch(self, rows):
        """rows -> (images uint8 (B, 1, H, W), x (B, T-1), y (B, T-1) with -1 past each report's end)."""
        rows = np.asarray(rows)
        tok = self.tokens[rows].astype(np.int64)
        x, y = tok[:, :-1], tok[:, 1:].copy()
        y[np.arange(y.shape[1])[None, :] + 1 >= self.lengths[rows][:, None]] = -1
        return self.images[rows][:, None], x, y


# -----------------------------------------------------------------------------
# report metrics: BLEU-4, ROUGE-L and clinical correctness (findings named in the text vs the labels)

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text):
    """Lower-case words and punctuation marks: the units BLEU and ROUGE count."""
    return _WORD.findall(text.lower())


def bleu4(hypotheses, references):
    """Corpus BLEU-4 with one reference per hypothesis (Papineni et al. 2002): geometric mean of clipped
    1-4-gram precisions summed over the corpus, times the brevity penalty. In [0, 1]."""
    match, total = np.zeros(4), np.zeros(4)
    hyp_len = ref_len = 0
    for h, r in zip(hypotheses, references):
        h, r = words(h), words(r)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, 5):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or (match == 0).any():
        return 0.0
    log_p = np.log(match / total).mean()
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return float(bp * math.exp(log_p))


def rouge_l(hypotheses, references, beta=1.2):
    """Mean ROUGE-L F-score (Lin 2004): longest common subsequence of words; beta=1.2 as in coco-caption."""
    scores = []
    for h, r in zip(hypotheses, references):
        h, r = words(h), words(r)
        if not h or not r:
            scores.append(float(h == r))
            continue
        prev = [0] * (len(r) + 1)
        for a in h:
            cur = [0]
            for j, b in enumerate(r):
                cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
            prev = cur
        lcs = prev[-1]
        if lcs == 0:
            scores.append(0.0)
            continue
        p, rc = lcs / len(h), lcs / len(r)
        scores.append((1 + beta**2) * p * rc / (rc + beta**2 * p))
    return float(np.mean(scores)) if scores else 0.0


# the report-generation metrics name findings of the phantom's classes (a subset of RULES)
FINDINGS = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation", "Lung Opacity",
            "Nodule", "Edema", "Atelectasis", "Support Devices", "No Finding"]


def label_report(text, classes=FINDINGS):
    """One report -> float32 {0, 1} vector over classes: 1 where label_reports says positive."""
    return (label_reports([text], classes)[0] == 1).astype(np.float32)


def finding_scores(pred, true, classes=FINDINGS):
    """pred, true: (N, C) {0,1} (NaN in true = unknown, skipped). Per class precision/recall/F1/support;
    macro_f1 averages the classes that occur in true (support > 0)."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    out, f1s = {}, []
    for j, c in enumerate(classes):
        known = ~np.isnan(true[:, j])
        p, t = pred[known, j] > 0.5, true[known, j] > 0.5
        tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[c] = {"precision": prec, "recall": rec, "f1": f1, "support": int(t.sum())}
        if t.sum() > 0:
            f1s.append(f1)
    out["macro_f1"] = float(np.mean(f1s)) if f1s else float("nan")
    return out


# -----------------------------------------------------------------------------
# validating the labeler on real reports: IU X-ray's manual MeSH major headings as the reference
# (heading = the text before the first '/'; a qualifier after it narrows some rows)

MESH_MAP = [  # (MeSH major heading, qualifier that must appear or '', observation)
    ("Cardiomegaly", "", "Cardiomegaly"), ("Cardiac Shadow", "enlarged", "Cardiomegaly"),
    ("Mediastinum", "prominent", "Enlarged Cardiomediastinum"), ("Mediastinum", "enlarged", "Enlarged Cardiomediastinum"),
    ("Opacity", "", "Lung Opacity"), ("Airspace Disease", "", "Lung Opacity"), ("Infiltrate", "", "Lung Opacity"),
    ("Density", "", "Lung Opacity"),
    ("Nodule", "", "Lung Lesion"), ("Mass", "", "Lung Lesion"), ("Lung Neoplasms", "", "Lung Lesion"),
    ("Pulmonary Edema", "", "Edema"), ("Pulmonary Congestion", "", "Edema"), ("Heart Failure", "", "Edema"),
    ("Consolidation", "", "Consolidation"), ("Pneumonia", "", "Pneumonia"),
    ("Pulmonary Atelectasis", "", "Atelectasis"), ("Pneumothorax", "", "Pneumothorax"),
    ("Hydropneumothorax", "", "Pneumothorax"), ("Hydropneumothorax", "", "Pleural Effusion"),
    ("Pleural Effusion", "", "Pleural Effusion"), ("Costophrenic Angle", "blunted", "Pleural Effusion"),
    ("Thickening", "pleura", "Pleural Other"), ("Cicatrix", "pleura", "Pleural Other"),
    ("Fractures, Bone", "", "Fracture"),
    ("Catheters, Indwelling", "", "Support Devices"), ("Tube, Inserted", "", "Support Devices"),
    ("Implanted Medical Device", "", "Support Devices"), ("Medical Device", "", "Support Devices"),
    ("Surgical Instruments", "", "Support Devices"), ("Stents", "", "Support Devices"),
    ("Nodule", "", "Nodule"),
    ("Emphysema", "", "Emphysema"), ("Pulmonary Emphysema", "", "Emphysema"), ("Bullous Emphysema", "", "Emphysema"),
    ("Pulmonary Disease, Chronic Obstructive", "", "Emphysema"), ("Lung", "hyperdistention", "Emphysema"),
    ("Calcified Granuloma", "", "Granuloma"), ("Granuloma", "", "Granuloma"), ("Granulomatous Disease", "", "Granuloma"),
]
LABEL_EVAL_TARGET = ["Cardiomegaly", "Pleural Effusion", "Lung Opacity", "Atelectasis", "Nodule", "Edema",
                     "Support Devices", "No Finding"]  # issue 16's macro F1


MESH_NOT_LUNG = {"mediastinum", "paratracheal", "ribs", "clavicle", "spine", "thoracic vertebrae", "breast", "shoulder",
                 "humerus", "abdomen", "soft tissue"}  # an Opacity / Density qualified by these is not a lung opacity


def mesh_labels(mesh_major, observations):
    """Manual MeSH major headings of one report -> {0, 1} per observation by MESH_MAP; "No Finding" = 1 when no
    heading maps to a pathology (CheXpert's definition, the labeler's too; findings outside the 14 do not count)."""
    hit = set()
    for tag in mesh_major:
        parts = [p.strip().lower() for p in tag.split("/")]
        for heading, qualifier, obs in MESH_MAP:
            if parts[0] == heading.lower() and (not qualifier or qualifier in parts[1:]) and \
                    not (obs == "Lung Opacity" and MESH_NOT_LUNG & set(parts[1:])):
                hit.add(obs)
    y = [1.0 if c in hit else 0.0 for c in observations]
    if "No Finding" in observations:
        y[observations.index("No Finding")] = float(not hit & set(PATHOLOGIES))
    return np.array(y, np.float32)


def label_eval(records, min_positives=20):
    """label_reports on findings + impression vs the MeSH reference; uncertain counts as positive (a report that
    raises a finding gets it indexed), 'definite P' is the precision of the positive (1) labels alone. Prints
    precision / recall / F1 per observation, those with >= min_positives reference positives first (the others are
    noisy), and the macro F1 over LABEL_EVAL_TARGET of the first; returns the scores."""
    obs = OBSERVATIONS + [c for c in RULES if c not in OBSERVATIONS]
    y = label_reports([r["text"] for r in records], obs)
    pred = np.nan_to_num(np.abs(y), nan=0.0)
    true = np.stack([mesh_labels(r["mesh_major"], obs) for r in records])
    scores = finding_scores(pred, true, obs)
    shown = [c for c in obs if scores[c]["support"] >= min_positives]
    few = [c for c in obs if 0 < scores[c]["support"] < min_positives]
    print(f"label_reports vs manual MeSH major headings, {len(records)} reports (findings + impression)")
    print(f"{'observation':<28}{'positives':>10}{'predicted':>10}{'precision':>11}{'recall':>8}{'F1':>7}"
          f"{'definite P':>12}")
    for c in shown + few:
        if few and c == few[0]:
            print(f"fewer than {min_positives} MeSH positives (noisy):")
        j, s = obs.index(c), scores[c]
        definite = y[:, j] == 1
        s["definite_precision"] = float((definite & (true[:, j] > 0)).sum() / max(definite.sum(), 1))
        print(f"{c:<28}{s['support']:>10}{int(pred[:, j].sum()):>10}{s['precision']:>11.3f}{s['recall']:>8.3f}"
              f"{s['f1']:>7.3f}{s['definite_precision']:>12.3f}")
    target = [c for c in LABEL_EVAL_TARGET if c in shown]
    macro = float(np.mean([scores[c]["f1"] for c in target]))
    print(f"macro F1 over {', '.join(target)}: {macro:.3f}")
    nf = pred[:, obs.index("No Finding")] > 0
    normal = np.array([any(t.strip().lower() == "normal" for t in r["mesh_major"]) for r in records])
    tp = int((nf & normal).sum())
    print(f"(No Finding vs the stricter MeSH 'normal' tag, which any abnormality removes, granulomas and spine changes "
          f"included: precision {tp / max(nf.sum(), 1):.3f}, recall {tp / max(normal.sum(), 1):.3f})")
    return dict(scores, target_macro_f1=macro, shown=shown)


def report_metrics(hypotheses, references, labels, classes=FINDINGS):
    """Everything the report-generation eval prints: BLEU-4, ROUGE-L, finding macro-F1 (+ per class)."""
    pred = np.stack([label_report(h, classes) for h in hypotheses])
    scores = finding_scores(pred, labels, classes)
    return {"bleu4": bleu4(hypotheses, references), "rouge_l": rouge_l(hypotheses, references),
            "macro_f1": scores["macro_f1"], "per_class": {c: scores[c] for c in classes}}


if __name__ == "__main__":
    configurator.cli(main)
