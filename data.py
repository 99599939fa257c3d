"""
Datasets for nanorad: read the real formats, prepare them once into uint8 memmaps, and feed
training with batches that are a pure function of (seed, step).

    python data.py --dataset=phantom                                   # 12,000 generated 64px images, seconds
    python data.py --dataset=chexpert --root=/data/CheXpert-v1.0-small --views=frontal --image_size=256
    python data.py --dataset=nih --root=/data/nih --views=PA,AP        # Data_Entry_2017*.csv + images*/
    python data.py --dataset=vinbigdata --root=/data/vinbigdata --binary=True
    python data.py --dataset=folder --root=/data/lung9 --patient_pattern='-(\\d+)-'  # root/<class>/*.png
    python data.py --dataset=covidx --root=/data/covidx                # train.txt / test.txt + train/ test/
    python data.py --dataset=roco --root=/data/roco-dataset/data       # {train,validation,test}/radiology/
    python data.py --dataset=mimic_cxr --root=/data/mimic-cxr-jpg/2.0.0 --clinical_root=/data/mimiciv  # + hosp/, ed/
    python data.py --dataset=csv --csv=/data/lab/labels.csv --patient_col=patient --label_cols=Effusion,Nodule  # yours
    python data.py --bench --image_size=224 --batch_size=64            # memmap loader vs torchvision+PIL

Writes out_dir (default data/<dataset>): meta.json, {split}_images.u8 (N x H x W uint8),
{split}_labels.npy, {split}_index.csv for split in train/val/test, and {split}_labels_raw.npy where
the dataset has raw label codes (CheXpert, MIMIC-CXR, csv --label_cols: 1, 0, -1 = uncertain, NaN = blank).
Splits are patient-level (asserted disjoint) and stratified by label; meta.json says where the
patient ids came from (patient_id_source: a folder set without ids in its file names gets a loud
warning, see readers.read_folder); every prepare prints the patient count, the rule and three
examples, and an inferred rule that is ambiguous (several rules fit, or one "patient" holds over
10% of the images: a site or date prefix) is refused until --patient_pattern says it. A multi-class
set needs two classes. An empty split is refused, also one emptied by skipped images; a class
absent from a split is warned about. CheXpert's test split is exactly valid.csv by default
(--test_source, --test_csv).
Paths listed in a dataset's files must stay inside its root (--allow_outside_root=True to allow).
Free disk space is checked and the image files' blocks reserved before decoding (a full disk is one
sentence naming the folder and the bytes, not a SIGBUS); a decode worker that dies is an error, not a
hang. Decoding uses every core; a killed prepare resumes where it stopped when rerun with the same
arguments, also when killed while finishing; meta.json is written last, only after each final
image file's pixel sums equal what was decoded, so a folder without it is never read. meta.json's
data_hash (and split_hashes) is a sha256 of the image bytes and label arrays. A folder prepared
from other inputs (another CSV, other knobs, an image file changed or fixed since: its size and
mtime are in input_hash) is refused unless --overwrite=True, which re-prepares it.
"""

import collections
import csv
import difflib
import errno
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from readers import (CHEXPERT_CLASSES, FOLDER_PATIENT_RULES, IMAGE_EXTS, NIH_CLASSES,  # noqa: F401
                     READER_KNOBS, Source, index_record, decode_image, load_gray, read_chexpert, read_covidx,
                     read_dataset, read_folder, read_nih, read_phantom, read_roco, read_vinbigdata, resize_square)
import configurator
import phantom

# -----------------------------------------------------------------------------
# config: python data.py --key=value overrides these (configurator.load)

DEFAULTS = dict(
    dataset="phantom",         # phantom | chexpert | nih | vinbigdata | folder | covidx | roco | mimic_cxr | csv
    root="",                   # raw dataset folder (chexpert/nih/vinbigdata: or the csv itself; csv: the image root)
    out_dir="",                # "" -> data/<dataset>
    image_size=0,              # output side in pixels; 0 -> 64 for phantom, 256 for real data, 224 for --bench
    resize_mode="pad",         # pad: whole image, black borders | center_crop: fill the square, cut the long side
    val_frac=0.15,             # fraction of patients (pooled images) for val, unless the dataset ships a val split
    test_frac=0.15,            # same for test
    seed=0,                    # split seed (and phantom seed)
    official_split=True,       # use the dataset's own split (CheXpert valid.csv, NIH test_list.txt, COVIDx test.txt, ...)
    uncertain_policy="ignore", # CheXpert/csv -1: ignore (NaN, masked) | zeros | ones (U-Ones etc., Irvin et al. 2019)
    blank_policy="zeros",      # CheXpert/csv blank: zeros (the paper: not mentioned = negative) | ignore (NaN, xrv)
    test_source="auto",        # chexpert: valid (test = exactly valid.csv, val carved from train patients) | carve (valid.csv
                               #   = val, test carved) | auto: valid when valid.csv exists (papers report on it), else carve
    test_csv="",               # chexpert: the 500-study test labels CSV (Path + 14 columns) = the test split; valid.csv = val
    mimic_labeler="chexpert",  # mimic_cxr: chexpert | negbio (mimic-cxr-2.0.0-<labeler>.csv.gz)
    clinical_root="",          # mimic_cxr: folder with MIMIC-IV hosp/patients.csv.gz and MIMIC-IV-ED ed/*.csv.gz ("" -> root)
    views="all",               # chexpert/nih: all | frontal | lateral | AP | PA | comma list, e.g. AP,PA
    binary=False,              # vinbigdata: one 'Abnormal' label instead of 14 findings + No finding
    patient_pattern="",        # folder: regex on the file stem; group 1 (or the match) is the patient id; "" -> stem
    n_images=12000,            # phantom: number of generated images
    csv="",                    # csv: your CSV (TSV: .tsv or --sep=tab), one row per image; --root: the image folder
    path_col="path",           # csv: column of image paths (png/jpg/tif/dcm), relative to --root (default: its folder)
    patient_col="",            # csv: column of patient ids (required); none: each image its own patient (leak warning)
    label_cols="",             # csv: comma list of multi-label columns, cells 1/0/-1/blank (uncertain/blank_policy)
    class_col="",              # csv: one column of class names -> multi-class (instead of label_cols)
    split_col="",              # csv: column of train/val/test; "" -> patients dealt by val_frac/test_frac
    view_col="",               # csv: column -> the index's view (e.g. PA, AP, lateral); "" -> none
    age_col="",                # csv: column -> age in years (leading digits: 58, 058Y); "" -> none
    sex_col="",                # csv: column -> sex (M/F; male/female are mapped to M/F); "" -> none
    text_col="",               # csv: column -> the index's text (report or caption, fusion's text_column=text)
    keep_cols="",              # csv: comma list of extra columns kept by name in the index (fusion clinical_columns)
    sep="",                    # csv: field separator, one character or tab; "" -> tab for .tsv/.tab, else comma
    phantom_disparity="",      # phantom: "" (off) | findings subtler in one group, e.g. sex=F:0.4, age>=70:0.5
    on_bad_image="error",      # error: stop naming the file | skip: drop it from its split, count it, list it in meta.json
    overwrite=False,           # re-prepare an out_dir that was prepared from other inputs
    allow_outside_root=False,  # read image paths from a CSV/list that leave --root ('../..', absolute names)
    num_workers=0,             # decode processes; 0 -> all cores
    chunk_size=256,            # images per work unit = per checkpoint of a resumable prepare
    bench=False,               # run the loader benchmark instead of preparing
    batch_size=64,             # --bench batch size
    _stop_after_chunks=0,      # test hook: stop (as if killed) after this many chunks
)
# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per knob; CHECKS: across knobs)
RANGES = dict(image_size="[0, 65536]")  # 0: the automatic choice
CHECKS = {"val_frac + test_frac < 1": "the patients left over are the train split"}

SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ["row", "path", "patient_id", "study_id", "view", "age", "sex", "text", "indication"]
COMMON_KNOBS = ["dataset", "image_size", "resize_mode", "val_frac", "test_frac", "seed", "on_bad_image"]

# -----------------------------------------------------------------------------
# patient-level split, stratified by label


def split_patients(records, labels, task, val_frac, test_frac, seed=0):
    """-> {split: sorted row indices}. The dataset's own split hints are kept; the remaining pool of patients
    is dealt greedily, rarest label first, to the split that most lacks that label (iterative stratification,
    Sechidis et al. 2011, applied to whole patients), so every patient lands in exactly one split."""
    n = len(records)
    if n == 0:
        return {s: np.zeros(0, np.int64) for s in SPLITS}
    pids, inv = np.unique(np.array([r["patient_id"] for r in records], dtype=object).astype(str), return_inverse=True)
    hints = np.array([SPLITS.index(r["split"]) if r["split"] else -1 for r in records])
    forced = np.full(len(pids), -1)
    for p, h in zip(inv[hints >= 0], hints[hints >= 0]):
        if forced[p] not in (-1, h):
            raise ValueError(f"patient {pids[p]} is in both the {SPLITS[forced[p]]} and {SPLITS[h]} split files of "
                             f"the dataset; patients must not cross splits: rerun with --official_split=False")
        forced[p] = h
    has_hinted = set(hints[hints >= 0].tolist())
    fracs = np.array([0.0, 0.0 if 1 in has_hinted else val_frac, 0.0 if 2 in has_hinted else test_frac])
    fracs[0] = 1.0 - fracs[1:].sum()
    assert fracs[0] >= 0, f"val_frac + test_frac = {fracs[1:].sum()} must be <= 1"

    if task == "multiclass":
        pos = np.eye(int(labels.max()) + 1)[labels]  # one-hot, so classes stratify like labels
    else:
        pos = (labels == 1).astype(np.float64)  # NaN (unknown) counts as not positive
    C = pos.shape[1]
    P = np.zeros((len(pids), C))
    for c in range(C):
        P[:, c] = np.bincount(inv, weights=pos[:, c], minlength=len(pids))
    size = np.bincount(inv, minlength=len(pids)).astype(np.float64)

    pool = np.flatnonzero(forced < 0)
    rng = np.random.default_rng(seed)
    pool = pool[rng.permutation(len(pool))]
    total = P[pool].sum(0)
    rank_of = np.argsort(np.argsort(np.where(total > 0, total, np.inf), kind="stable"), kind="stable")
    rarest = np.full(len(pids), -1)
    key = np.full(len(pids), np.inf)
    if C:
        has = P > 0
        r = np.where(has, rank_of[None, :], C + 1).argmin(1)
        rarest = np.where(has.any(1), r, -1)
        key = np.where(rarest >= 0, total[np.maximum(rarest, 0)], np.inf)
    pool = pool[np.argsort(key[pool], kind="stable")]
    need_pos = (fracs[:, None] * total[None, :]).tolist()
    need_n = (fracs * size[pool].sum()).tolist()
    active = [s for s in range(3) if fracs[s] > 0]
    assign = forced.copy()
    for p in pool.tolist():
        c = rarest[p]
        s = max(active, key=(lambda s: (need_pos[s][c], need_n[s])) if c >= 0 else (lambda s: need_n[s]))
        assign[p] = s
        need_n[s] -= size[p]
        for c2 in np.flatnonzero(P[p]).tolist():
            need_pos[s][c2] -= P[p, c2]
    row_split = assign[inv]
    out = {name: np.flatnonzero(row_split == s).astype(np.int64) for s, name in enumerate(SPLITS)}
    assert_patients_disjoint(records, out)
    for s in has_hinted:  # a split the dataset's own files give is exactly their patients (CheXpert valid.csv = test)
        assert np.array_equal(out[SPLITS[s]], np.flatnonzero(forced[inv] == s)), f"{SPLITS[s]} != its hinted patients"
    return out


def assert_patients_disjoint(records, split_rows):
    seen = {s: {records[i]["patient_id"] for i in rows} for s, rows in split_rows.items()}
    names = list(seen)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = seen[a] & seen[b]
            assert not both, f"patients in both {a} and {b}: {sorted(both)[:5]}"


# -----------------------------------------------------------------------------
# the prepared layout: writing, meta.json, reading


def atomic_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pos_counts(labels, task, classes):
    if task == "multiclass":
        counts = np.bincount(labels, minlength=len(classes)) if len(labels) else np.zeros(len(classes), int)
        return {c: int(counts[j]) for j, c in enumerate(classes)}
    return {c: int((labels[:, j] == 1).sum()) for j, c in enumerate(classes)}


def _scan_images(images):
    """One pass over (N,S,S) uint8 (array or memmap): exact integer pixel sums (sum, sum of squares, count), so
    mean/std do not depend on chunking, and the sha256 of the bytes, so the content hash costs no second read."""
    h = hashlib.sha256()
    s = ss = 0
    for i in range(0, len(images), 256):
        a = np.ascontiguousarray(images[i:i + 256])
        h.update(a)
        s += int(a.sum(dtype=np.uint64))
        ss += int((a.astype(np.uint32) ** 2).sum(dtype=np.uint64))
    return (s, ss, int(np.prod(images.shape))), h.hexdigest()


def _array_sha256(a):
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a)
    return h.hexdigest()


def _data_hash(split_parts):
    """split_parts: {split: {"images": hex, "labels": hex[, "labels_raw": hex]}} -> (data_hash, {split: hex}).
    Each split's hash covers its image bytes and label arrays; data_hash covers every split, in SPLITS order.
    Train scripts store it in checkpoints (resume onto other data is refused) and compare.py checks its arms."""
    per = {s: hashlib.sha256("\n".join(f"{k}:{v}" for k, v in sorted(parts.items())).encode()).hexdigest()
           for s, parts in split_parts.items()}
    order = [s for s in SPLITS if s in per] + sorted(s for s in per if s not in SPLITS)
    return hashlib.sha256("\n".join(f"{s}:{per[s]}" for s in order).encode()).hexdigest(), per


def _mean_std(s, ss, n):
    if n == 0:
        return 0.5, 0.25
    mean = s / n
    return mean / 255.0, math.sqrt(max(ss / n - mean * mean, 0.0)) / 255.0


def save_npy(path, a):
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, a)
    os.replace(tmp, path)


def _write_tables(out, split, labels, records, labels_raw=None, columns=INDEX_COLUMNS):
    """{split}_labels.npy, {split}_labels_raw.npy (readers that keep raw codes: CheXpert 1/0/-1/NaN) and
    {split}_index.csv; returns the label hashes for data_hash."""
    save_npy(out / f"{split}_labels.npy", labels)
    hashes = dict(labels=_array_sha256(labels))
    if labels_raw is not None:
        save_npy(out / f"{split}_labels_raw.npy", labels_raw)
        hashes["labels_raw"] = _array_sha256(labels_raw)
    tmp = out / f"{split}_index.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:  # paths keep their bytes
        w = csv.writer(f)
        w.writerow(columns)
        for i, r in enumerate(records):
            w.writerow([i] + [r.get(k, "") for k in columns[1:]])
    os.replace(tmp, out / f"{split}_index.csv")
    return hashes


def _finish_meta(out, meta, split_labels, pixel_sums, split_parts):
    """Fill the derived fields, then write meta.json atomically: its presence marks a finished folder."""
    meta = dict(meta)
    meta.setdefault("name", Path(out).name)
    meta["splits"] = {s: int(len(y)) for s, y in split_labels.items()}
    meta["pos_counts"] = {s: _pos_counts(y, meta["task"], meta["classes"]) for s, y in split_labels.items()}
    meta["mean"], meta["std"] = _mean_std(*pixel_sums)
    meta["data_hash"], meta["split_hashes"] = _data_hash(split_parts)
    meta.setdefault("bad_images", [])
    meta.setdefault("warnings", [])
    meta.setdefault("index_columns", INDEX_COLUMNS)
    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_json(Path(out) / "meta.json", meta)
    return meta


def write_prepared(out_dir, splits, meta):
    """splits: {name: (images (N,H,W) uint8, labels, records[, labels_raw])}; meta needs task, classes (+ anything else).
    Every file goes through tmp + os.replace and meta.json comes last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    sizes = {images.shape[1:] for images, _, _ in splits.values()}
    assert len(sizes) == 1 and sizes.pop()[0] > 0, "all splits need square images of one size"
    parts, sums = {}, {}
    for name, (images, labels, records, *raw) in splits.items():
        assert images.dtype == np.uint8 and images.ndim == 3 and images.shape[1] == images.shape[2], \
            f"{name}: images must be (N, S, S) uint8, got {images.dtype} {images.shape}"
        assert len(images) == len(labels) == len(records), f"{name}: images/labels/records lengths differ"
        tmp = out / f"{name}_images.u8.tmp"
        np.ascontiguousarray(images).tofile(tmp)
        os.replace(tmp, out / f"{name}_images.u8")
        sums[name], image_hash = _scan_images(images)
        parts[name] = dict(images=image_hash, **_write_tables(out, name, labels, records, raw[0] if raw else None,
                                                             meta.get("index_columns", INDEX_COLUMNS)))
    meta = dict(meta, image_size=int(next(iter(splits.values()))[0].shape[1]))
    train = "train" if "train" in splits else next(iter(splits))
    return _finish_meta(out, meta, {s: v[1] for s, v in splits.items()}, sums[train], parts)


def _did_you_mean(data_dir):
    """' (did you mean data/mylab?)' when a prepared folder beside data_dir has a close name (a typo), else ''."""
    want = Path(data_dir)
    parent = want.parent if want.parent.is_dir() else None
    near = difflib.get_close_matches(want.name, [d.name for d in parent.iterdir() if (d / "meta.json").is_file()]
                                     if parent else [], n=1, cutoff=0.6)
    return f" (did you mean {parent / near[0]}?)" if near else ""


def load_meta(data_dir, prepare=None):
    """<data_dir>/meta.json of a finished prepare (data.py's or text_data.py's: prepare = the command that makes it)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        name = Path(data_dir).name
        cmd = prepare or (f"python data.py --dataset={name} --out_dir={data_dir}" if name == "phantom" else
                          f"python data.py --dataset=<chexpert|nih|...> --root=<raw data> --out_dir={data_dir}")
        raise FileNotFoundError(f"{path} not found{_did_you_mean(data_dir)}: prepare the data first with `{cmd}` "
                                f"(a folder without meta.json is an unfinished prepare; rerunning the same command "
                                f"resumes it)")
    with open(path) as f:
        return json.load(f)


class PreparedSplit:
    """One split of a prepared folder: .images (N,H,W) uint8 memmap, .labels, .index (list of dicts), .meta."""

    def __init__(self, data_dir, split, prepare=None):
        self.data_dir, self.split = Path(data_dir), split
        self.meta = meta = load_meta(data_dir, prepare)
        if split not in meta["splits"]:
            raise KeyError(f"split {split!r} not in {self.data_dir}/meta.json; splits: {list(meta['splits'])}")
        n, S = meta["splits"][split], meta["image_size"]
        path = self.data_dir / f"{split}_images.u8"
        if os.path.getsize(path) != n * S * S:
            raise ValueError(f"{path} holds {os.path.getsize(path)} bytes, meta.json says {n}x{S}x{S}: the folder is "
                             f"damaged; prepare it again with --overwrite=True")
        self.images = np.memmap(path, np.uint8, "r", shape=(n, S, S)) if n else np.zeros((0, S, S), np.uint8)
        self.labels = np.load(self.data_dir / f"{split}_labels.npy")
        assert len(self.labels) == n, f"{split}_labels.npy has {len(self.labels)} rows, meta.json says {n}"
        self._index = None

    @property
    def labels_raw(self):
        """(N, C) float32 the dataset's own label codes (CheXpert 1/0/-1/NaN) when meta.json says raw_labels, else None."""
        if not self.meta.get("raw_labels"):
            return None
        raw = np.load(self.data_dir / f"{self.split}_labels_raw.npy")
        assert raw.shape == self.labels.shape, f"{self.split}_labels_raw.npy {raw.shape} != labels {self.labels.shape}"
        return raw

    @property
    def index(self):
        if self._index is None:
            with open(self.data_dir / f"{self.split}_index.csv", newline="", encoding="utf-8",
                      errors="surrogateescape") as f:
                self._index = list(csv.DictReader(f))
        return self._index

    def __len__(self):
        return len(self.labels)


# -----------------------------------------------------------------------------
# prepare: read -> split -> decode every image once (all cores, resumable) -> write


_PREPARED_NAMES = ["meta.json", "meta.json.tmp", "prepare_state.json", "prepare_state.json.tmp"] + [
    f"{s}_{x}" for s in SPLITS for x in ("images.u8", "images.u8.partial", "images.u8.tmp", "labels.npy",
                                         "labels.npy.tmp", "labels_raw.npy", "labels_raw.npy.tmp", "index.csv",
                                         "index.csv.tmp")]


def _clear(out):
    for name in _PREPARED_NAMES:
        (out / name).unlink(missing_ok=True)


def _file_stamp(path):
    """Size and modification time: hashing the bytes of every image would read the data set twice."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"  # decoding reports (or, with --on_bad_image=skip, counts) it
    return f"{st.st_size} {st.st_mtime_ns}"


def recorded_knobs(cfg):
    """The knobs that meta.json records and the input hash covers. The phantom's disparity only when it is on, so
    that without it both read as they did before the knob existed (issue 36)."""
    extra = ["phantom_disparity"] if cfg["dataset"] == "phantom" and cfg.get("phantom_disparity") else []
    return {k: cfg[k] for k in COMMON_KNOBS + READER_KNOBS[cfg["dataset"]] + extra}


def input_hash(src, cfg):
    """A digest of what defines the prepared folder: the knobs, the dataset's list files, the image paths and each
    image file's size and mtime (so a rerun after fixing a skipped image is not "already prepared")."""
    h = hashlib.sha256()
    h.update(json.dumps(recorded_knobs(cfg), sort_keys=True).encode())
    for path in src.hash_files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    # surrogateescape: a file name that is not UTF-8 (an old archive's latin-1 names) is hashed by its own bytes
    h.update("\n".join(r["path"] for r in src.records).encode("utf-8", "surrogateescape"))
    if src.images is None:  # the image files themselves: a file fixed or replaced after a prepare is another input
        h.update("\n".join(_file_stamp(r["path"]) for r in src.records).encode())
    if cfg["dataset"] == "folder":  # patient ids come from a file-name rule there, and the split depends on them
        ids = "\n" + src.patient_id_source + "\n" + "\n".join(r["patient_id"] for r in src.records)
        h.update(ids.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def space_needed(split_rows, S, n_classes, on_bad_image):
    """Bytes a prepare writes: the image files, the copy that drops skipped rows (the largest split, made while its
    partial still exists), the index/label tables (~512 bytes a row: paths, ids, text) and 1 MiB for the rest."""
    rows = [len(r) for r in split_rows.values()]
    copy = max(rows, default=0) * S * S if on_bad_image == "skip" else 0
    return sum(rows) * (S * S + 512 + 8 * n_classes) + copy + (1 << 20)


def _size(n):
    return f"{n:,} bytes ({n / (1 << 20):.1f} MiB)"


def check_space(out, need):
    """Refuse to start writing need bytes into out when its disk has less free space (before a memmap is made)."""
    free = shutil.disk_usage(out).free
    if free < need:
        raise ValueError(no_space_error(out, need, free))


def no_space_error(out, need, free=None):
    free = shutil.disk_usage(out).free if free is None else free
    return (f"not enough disk space for {out}/: this prepare writes about {_size(need)} more there and {_size(free)} "
            f"are free; free some space or choose another --out_dir (finished chunks are kept: the same command "
            f"resumes)")


def allocate(path, size):
    """A file of `size` zero bytes whose disk blocks are reserved now: on a full disk this is an OSError (ENOSPC)
    here, instead of a SIGBUS that kills the process at a later write through the memmap of a sparse file."""
    try:
        with open(path, "wb") as f:
            if size and hasattr(os, "posix_fallocate"):  # elsewhere (macOS) and where the file system cannot reserve
                try:                                       # blocks: a sparse file, as before
                    os.posix_fallocate(f.fileno(), 0, size)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
            f.truncate(size)
    except OSError:
        Path(path).unlink(missing_ok=True)  # never leave a half-reserved partial that looks like a started split
        raise


def _decode_chunk(task):
    """Worker: decode one chunk of paths straight into the split's partial memmap; return bad files + sums."""
    cid, partial, start, paths, S, resize_mode, on_bad = task
    mm = np.memmap(partial, np.uint8, "r+", offset=start * S * S, shape=(len(paths), S, S))
    bad, s, ss, n = [], 0, 0, 0
    for j, path in enumerate(paths):
        try:
            a = decode_image(path, S, resize_mode)
        except ImportError as e:  # a missing optional package is never a bad image
            return cid, "error", (path, str(e))
        except Exception as e:  # noqa: BLE001 - any decode failure is this file's problem, reported by path
            if on_bad == "error":
                return cid, "error", (path, f"{type(e).__name__}: {e}")
            bad.append([j, path, f"{type(e).__name__}: {e}"])
            a = np.zeros((S, S), np.uint8)
        else:
            s += int(a.sum(dtype=np.uint64))
            ss += int((a.astype(np.uint32) ** 2).sum(dtype=np.uint64))
            n += a.size
        mm[j] = a
    mm.flush()
    del mm
    return cid, "ok", dict(bad=bad, s=s, ss=ss, n=n)


def _decode_all(out, src, split_rows, cfg, digest):
    """Decode into {split}_images.u8.partial; prepare_state.json records finished chunks (after their flush),
    so a rerun redoes only the rest and, each chunk being deterministic, ends with identical bytes."""
    S, cs = cfg["image_size"], cfg["chunk_size"]
    chunks = [(s, a, min(a + cs, len(split_rows[s]))) for s in SPLITS for a in range(0, len(split_rows[s]), cs)]
    state_path = out / "prepare_state.json"
    state = json.load(open(state_path)) if state_path.is_file() else None
    if state is not None and (state.get("input_hash") != digest or state.get("n_chunks") != len(chunks)):
        print(f"{out}: discarding an unfinished prepare of other inputs")
        _clear(out)
        state = None
    if state is None:
        state = dict(input_hash=digest, n_chunks=len(chunks), done={}, finalizing=[])
    alloc = {}
    for s in SPLITS:
        partial, size = out / f"{s}_images.u8.partial", len(split_rows[s]) * S * S
        if s in state.get("finalizing", []):
            continue  # its partial is complete (being moved into place) or already moved: never recreate it (issue 13)
        if not partial.is_file() or os.path.getsize(partial) != size:
            alloc[partial] = size
    in_place = sum(len(r) for r in split_rows.values()) * S * S - sum(alloc.values())  # a resumed prepare's partials
    check_space(out, space_needed(split_rows, S, len(src.classes), cfg["on_bad_image"]) - in_place)
    for partial, size in alloc.items():
        allocate(partial, size)  # every row gets written exactly once per chunk
    atomic_json(state_path, state)
    todo = [c for c in range(len(chunks)) if str(c) not in state["done"]]
    n_todo = sum(chunks[c][2] - chunks[c][1] for c in todo)
    if len(todo) < len(chunks):
        print(f"resuming: {len(chunks) - len(todo)}/{len(chunks)} chunks already done")
    tasks = ((c, str(out / f"{chunks[c][0]}_images.u8.partial"), chunks[c][1],
              [src.records[i]["path"] for i in split_rows[chunks[c][0]][chunks[c][1]:chunks[c][2]]],
              S, cfg["resize_mode"], cfg["on_bad_image"]) for c in todo)
    workers = cfg["num_workers"] or os.cpu_count() or 1
    pool = None
    if workers > 1 and len(todo) > 1:
        # not multiprocessing.Pool: it replaces a worker that dies (SIGKILL by the OOM killer, SIGBUS) and waits
        # forever for the chunk it held; the executor fails every pending chunk with BrokenProcessPool instead
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx)
        results = (f.result() for f in as_completed([pool.submit(_decode_chunk, t) for t in tasks]))
    else:
        results = map(_decode_chunk, tasks)
    t0, done, last = time.time(), 0, 0.0
    try:
        for k, (cid, status, res) in enumerate(_survive(results), start=1):
            if status == "error":
                path, reason = res
                raise ValueError(f"cannot decode {path}: {reason}. Fix or remove the file, or rerun with "
                                 f"--on_bad_image=skip to drop it (finished chunks are kept; the rerun resumes)")
            state["done"][str(cid)] = res
            atomic_json(state_path, state)
            done += chunks[cid][2] - chunks[cid][1]
            now = time.time()
            if now - last > 0.5 or done == n_todo:
                rate = done / max(now - t0, 1e-9)
                eta = (n_todo - done) / max(rate, 1e-9)
                print(f"\rdecode {done}/{n_todo} images | {rate:.0f} img/s | ETA {eta / 60:.1f} min ", end="", flush=True)
                last = now
            if cfg["_stop_after_chunks"] and k >= cfg["_stop_after_chunks"]:
                print(f"\nstopped after {k} chunks (_stop_after_chunks); rerun to resume")
                return None
    finally:
        if pool is not None:  # chunks in flight finish (seconds); their results are not recorded, a rerun redoes them
            pool.shutdown(wait=True, cancel_futures=True)
    print()
    return chunks, state, max(time.time() - t0, 1e-9), n_todo


def _survive(results):
    """The decode results, with a dead worker process said in a sentence instead of BrokenProcessPool's."""
    try:
        yield from results
    except BrokenProcessPool:
        raise RuntimeError("a decode worker process died without an error (killed: out of memory? a crash inside an "
                           "image library?); the finished chunks are kept: rerun the same command to resume, with "
                           "--num_workers=1 to see the failing file, or fewer workers if memory is short") from None


def _finalize(out, src, split_rows, chunks, state, meta):
    """Move each split's decoded partial into place (dropping skipped rows), write its tables, check every final
    array against the sums its chunks reported, then write meta.json. A split is recorded in prepare_state.json as
    finalizing before its move, so a rerun after a kill anywhere in here redoes the move from the (complete) partial
    or keeps the already-moved file; it never recreates a zero partial over a finished split (issue 13)."""
    S, state_path = meta["image_size"], out / "prepare_state.json"
    bad_by = {s: [b for c, ch in enumerate(chunks) if ch[0] == s for b in state["done"][str(c)]["bad"]] for s in SPLITS}
    empty = [s for s in SPLITS if len(bad_by[s]) == len(split_rows[s])]  # (an empty split was refused before decoding)
    if empty:  # before anything moves: a run would train or evaluate on nothing
        _, path, why = bad_by[empty[0]][0]
        counts = ", ".join(f"{s}: {len(bad_by[s])} of {len(split_rows[s])} failed" for s in SPLITS)
        raise ValueError(f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty after skipping "
                         f"the images that failed to decode ({counts}), e.g. {path}: {why}; fix those files or the "
                         f"knobs that decode them, then rerun")
    bad_all, labels_by_split, parts, sums = [], {}, {}, {}
    for s in SPLITS:
        rows = split_rows[s]
        split_chunks = [c for c, ch in enumerate(chunks) if ch[0] == s]
        bad = {chunks[c][1] + j: (p, why) for c in split_chunks for j, p, why in state["done"][str(c)]["bad"]}
        keep = np.array([i for i in range(len(rows)) if i not in bad], np.int64)
        partial, final = out / f"{s}_images.u8.partial", out / f"{s}_images.u8"
        if s not in state.setdefault("finalizing", []):
            state["finalizing"].append(s)
            atomic_json(state_path, state)
        if partial.is_file() and not bad:
            os.replace(partial, final)
        elif partial.is_file():  # drop the bad rows: copy the good ones into a fresh file
            src_mm = np.memmap(partial, np.uint8, "r", shape=(len(rows), S, S)) if len(rows) else np.zeros((0, S, S))
            with open(out / f"{s}_images.u8.tmp", "wb") as f:
                for a in range(0, len(keep), 1024):
                    f.write(np.ascontiguousarray(src_mm[keep[a:a + 1024]]).tobytes())
            del src_mm
            os.replace(out / f"{s}_images.u8.tmp", final)
            partial.unlink()
        if not final.is_file():
            raise FileNotFoundError(f"{final} and its .partial are both missing, though prepare_state.json says the "
                                    f"split was decoded: the folder was changed by hand; rerun with --overwrite=True")
        labels_by_split[s] = src.labels[rows][keep]
        raw = src.labels_raw[rows][keep] if src.labels_raw is not None else None
        parts[s] = _write_tables(out, s, labels_by_split[s], [src.records[rows[i]] for i in keep], raw,
                                 meta["index_columns"])
        bad_all += [bad[i][0] for i in sorted(bad)]
    for s in SPLITS:  # the check that makes a wrong image file an error instead of a silent all-zero training set
        n = len(labels_by_split[s])
        final = out / f"{s}_images.u8"
        if os.path.getsize(final) != n * S * S:
            raise ValueError(f"{final} holds {os.path.getsize(final)} bytes, expected {n}x{S}x{S}: the folder is "
                             f"damaged; rerun with --overwrite=True")
        mm = np.memmap(final, np.uint8, "r", shape=(n, S, S)) if n else np.zeros((0, S, S), np.uint8)
        sums[s], parts[s]["images"] = _scan_images(mm)
        del mm
        want = tuple(sum(state["done"][str(c)][k] for c, ch in enumerate(chunks) if ch[0] == s) for k in ("s", "ss", "n"))
        if sums[s] != want:
            raise ValueError(f"{final}: pixel sums {sums[s]} differ from the decoded chunks' {want}: the file is not what "
                             f"was decoded (damaged folder); rerun with --overwrite=True")
    meta = _finish_meta(out, dict(meta, bad_images=bad_all), labels_by_split, sums["train"], parts)
    state_path.unlink(missing_ok=True)
    return meta


def check_splits(src, split_rows, cfg):
    """Refuse an empty split with a sentence; return (and warn) one sentence per class absent from a split: a class
    without positives (or, multi-label, without negatives) has no AUC there, so its selection metric would be NaN."""
    for s in SPLITS:
        if len(split_rows[s]) == 0:
            n_pat = len({r["patient_id"] for r in src.records})
            if s == "train":
                raise ValueError(f"the train split is empty ({len(src.records)} images of {n_pat} patients): every "
                                 f"patient went to val/test; lower --val_frac/--test_frac or pass --official_split=False")
            hinted = sorted({r["split"] for r in src.records if r["split"]}) or "none"
            raise ValueError(f"the {s} split is empty ({len(src.records)} images of {n_pat} patients; val_frac="
                             f"{cfg['val_frac']}, test_frac={cfg['test_frac']}, the dataset's own splits: {hinted}): add "
                             f"images, raise --{s}_frac, or check the dataset's split files/folders")
    out = []
    for s in SPLITS:
        y = src.labels[split_rows[s]]
        for j, c in enumerate(src.classes):
            if src.task == "multiclass":
                if not (y == j).any():
                    out.append(f"class {c!r} has no images in the {s} split ({len(y)} images): its per-class metrics "
                               f"there are undefined (NaN)")
            else:
                pos, neg = int((y[:, j] == 1).sum()), int((y[:, j] == 0).sum())
                if pos == 0 or neg == 0:
                    out.append(f"class {c!r} has no {'positives' if pos == 0 else 'negatives'} in the {s} split "
                               f"({len(y)} images): its AUC there is undefined (NaN)")
    for w in out:
        warnings.warn(w, stacklevel=2)
    return out


def _check_choice(cfg, key, choices):
    if cfg[key] not in choices:
        near = difflib.get_close_matches(str(cfg[key]), choices, n=1, cutoff=0.5)
        raise configurator.ConfigError(f"--{key}={cfg[key]} is not one of {', '.join(choices)}"
                                       + (f": did you mean --{key}={near[0]}?" if near else ""))


def check_classes(src, cfg):
    """A multi-class set needs two classes: one class is a folder that is not root/<class>/ (issue 31)."""
    if src.task == "multiclass" and len(src.classes) < 2:
        layout = (" (the layout is root/<class>/*.png, one folder per class, e.g. root/normal/ and root/covid/, or "
                  "root/<train|val|test>/<class>/*.png)") if cfg["dataset"] == "folder" else ""
        raise ValueError(f"{src.source}: {len(src.records)} images of {len(src.classes)} class {src.classes}: a "
                         f"classifier needs at least two classes{layout}")


# A "patient" holding more than this share of all images is not a person: the largest patient holds 0.16% of NIH
# ChestX-ray14 (184 of 112,120 images) and 0.04% of CheXpert's train.csv (92 of 223,414). Above 10% there are fewer
# than ten such groups, too few to deal 15% val/test splits by patient; such an id is a site, scanner or date prefix
# (site3_pt007.png), and one person's images then cross splits. An explicit --patient_pattern is never refused.
MAX_PATIENT_SHARE = 0.10


def describe_patients(src):
    """'patients: 40 from <rule>, e.g. a/p007_0.png -> p007, ...' (three examples), printed on every prepare."""
    first = {}
    for i, r in enumerate(src.records):
        first.setdefault(str(r["patient_id"]), i)
    pids = list(first)
    picks = [pids[k] for k in sorted({0, len(pids) // 2, len(pids) - 1})] if pids else []

    def short(path):
        rel = os.path.relpath(path, src.root) if src.root else str(path)
        return str(path) if rel.startswith("..") else rel
    examples = ", ".join(f"{short(src.records[first[p]]['path'])} -> {p}" for p in picks)
    return f"patients: {len(pids):,} from {src.patient_id_source or src.source}, e.g. {examples}"


def _same_grouping(a, b):
    return len(set(zip(a, b))) == len(set(a)) == len(set(b))


def check_patients(src):
    """Refuse an inferred patient-id rule (folder sets) that is ambiguous: several of readers.FOLDER_PATIENT_RULES
    fit the file names and group them differently, or one "patient" holds more than MAX_PATIENT_SHARE of the images.
    The fix in both cases is --patient_pattern, which says the rule explicitly."""
    if not src.patient_id_source.startswith("inferred"):
        return
    fix = "pass --patient_pattern='<regex on the file stem, group 1 = patient id>' to say which part is the patient"
    stems = [Path(r["path"]).stem for r in src.records]
    fits = []
    for name, rule in FOLDER_PATIENT_RULES:
        ms = [rule.match(t) for t in stems]
        if all(ms):
            ids = [m.group(1) for m in ms]
            if len(set(ids)) < len(ids) and not any(_same_grouping(ids, other) for _, other in fits):
                fits.append((name, ids))
    if len(fits) > 1:
        raise ValueError(f"{src.root}: {len(fits)} patient-id rules fit the file names and group them differently: "
                         + "; ".join(f"{name} gives {len(set(ids))} patients ({stems[0]} -> {ids[0]})"
                                     for name, ids in fits) + f"; {fix}")
    ids = [str(r["patient_id"]) for r in src.records]
    pid, n = collections.Counter(ids).most_common(1)[0]
    if n > MAX_PATIENT_SHARE * len(ids):
        stem = stems[ids.index(pid)]
        raise ValueError(f"{src.root}: the inferred patient id ({src.patient_id_source.split(': ', 1)[-1]}) makes "
                         f"{pid!r} one patient with {n} of {len(ids)} images ({100 * n / len(ids):.0f}%, e.g. {stem}); "
                         f"a real patient holds well under 1% of a data set, so {pid!r} is likely a site, scanner or "
                         f"date, and one person's images could cross splits: {fix}")


def prepare(cfg):
    """Prepare cfg['dataset'] into cfg['out_dir']; returns meta (None if stopped by _stop_after_chunks)."""
    unknown = set(cfg) - set(DEFAULTS)
    assert not unknown, f"unknown prepare keys {sorted(unknown)}; valid: {sorted(DEFAULTS)}"
    cfg = {**DEFAULTS, **cfg}
    cfg["image_size"] = cfg["image_size"] or (64 if cfg["dataset"] == "phantom" else 256)
    for key, choices in (("on_bad_image", ("error", "skip")), ("resize_mode", ("pad", "center_crop"))):
        _check_choice(cfg, key, choices)  # before decoding: a bad knob would otherwise fail every image as "bad"
    out = Path(cfg["out_dir"] or f"data/{cfg['dataset']}")
    t0 = time.time()
    src = read_dataset(cfg)
    print(f"read {len(src.records)} records from {src.source} in {time.time() - t0:.1f}s")
    check_classes(src, cfg)
    print(describe_patients(src))
    check_patients(src)
    digest = input_hash(src, cfg)
    if (out / "meta.json").is_file():
        old = load_meta(out).get("input_hash")
        if old == digest and not cfg["overwrite"]:
            print(f"{out} is already prepared from these inputs (hash {digest}); nothing to do")
            (out / "prepare_state.json").unlink(missing_ok=True)
            return load_meta(out)
        if old != digest and not cfg["overwrite"]:
            raise FileExistsError(f"{out} was prepared from other inputs (hash {old}, now {digest}): rerun with "
                                  f"--overwrite=True to re-prepare it, or choose another --out_dir")
        print(f"{out}: re-preparing (--overwrite=True)")
        _clear(out)
    elif cfg["overwrite"] and (out / "prepare_state.json").is_file():
        print(f"{out}: discarding the unfinished prepare (--overwrite=True)")
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    split_rows = split_patients(src.records, src.labels, src.task, cfg["val_frac"], cfg["test_frac"], cfg["seed"])
    split_warnings = check_splits(src, split_rows, cfg)
    meta = dict(name=out.name, source=src.source, task=src.task, classes=src.classes, resize_mode=cfg["resize_mode"],
                label_policy=src.label_policy, input_hash=digest, patient_id_source=src.patient_id_source,
                index_columns=INDEX_COLUMNS + list(src.extra_columns),
                warnings=list(src.warnings) + split_warnings,
                config=recorded_knobs(cfg))
    if src.labels_raw is not None:
        meta["raw_labels"] = True  # {split}_labels_raw.npy: the dataset's own codes, for evaluation labels (issue 15)

    need = space_needed(split_rows, cfg["image_size"], len(src.classes), cfg["on_bad_image"])
    try:
        if src.images is not None:  # the phantom: pixels already made, same split and write path
            assert src.images.shape[1:] == (cfg["image_size"],) * 2, "generator image size differs from image_size"
            check_space(out, need)
            splits = {s: (src.images[r], src.labels[r], [src.records[i] for i in r])
                      + ((src.labels_raw[r],) if src.labels_raw is not None else ()) for s, r in split_rows.items()}
            meta = write_prepared(out, splits, meta)
            n_done, seconds = len(src.records), time.time() - t0
        else:
            result = _decode_all(out, src, split_rows, cfg, digest)
            if result is None:
                return None
            chunks, state, seconds, n_done = result
            meta = _finalize(out, src, split_rows, chunks, state, dict(meta, image_size=cfg["image_size"]))
    except OSError as e:  # the disk filled up after the check (another writer): the same sentence, not a traceback
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ValueError(no_space_error(out, need)) from None
    _report(out, meta, n_done, seconds)
    return meta


def _report(out, meta, n_done, seconds):
    print(f"wrote {out}/: meta.json, {{split}}_images.u8 / _labels.npy / _index.csv at {meta['image_size']}px")
    print("  " + " | ".join(f"{s} {meta['splits'][s]}" for s in SPLITS) +
          f" | mean {meta['mean']:.4f} std {meta['std']:.4f} | {n_done / max(seconds, 1e-9):.0f} img/s")
    for w in meta.get("warnings", []):
        print(f"  WARNING: {w}")
    if meta["bad_images"]:
        print(f"  skipped {len(meta['bad_images'])} bad images (listed in meta.json bad_images)")
    if meta["classes"]:
        width = max(13, *(len(c) for c in meta["classes"]))
        print(f"  {'positives (%)':<{width}}  " + "  ".join(f"{s:>7}" for s in SPLITS))
        for c in meta["classes"]:
            cells = [100.0 * meta["pos_counts"][s][c] / max(meta["splits"][s], 1) for s in SPLITS]
            print(f"  {c:<{width}}  " + "  ".join(f"{v:7.2f}" for v in cells))


def is_phantom_folder(data_dir):
    """Whether a train script may generate a missing data_dir by itself: only a folder named phantom* (data/phantom,
    data/phantom32, data/phantom_reports), where a generated data set is what the name asks for."""
    return Path(data_dir).name.startswith("phantom")


def load_run_data(cfg, dist, log):
    """meta.json of cfg['data_dir'] for a train script, generating the phantom first when that is what is missing
    (on the master; the other ranks wait); checks that the data was prepared at cfg['image_size'].

    The phantom is generated only in a folder named phantom* (is_phantom_folder): the train scripts' dataset knob is
    'phantom' by default, so any other missing folder is a typo or an unprepared data set, and generating 12,000
    phantom images there would train on them without a word (issue 31)."""
    d = cfg["data_dir"]
    missing = not os.path.exists(os.path.join(d, "meta.json"))
    if missing and cfg["dataset"] == "phantom" and not is_phantom_folder(d):
        raise FileNotFoundError(f"{os.path.join(d, 'meta.json')} not found{_did_you_mean(d)}: prepare the data first "
                                f"with `python data.py --dataset=<chexpert|nih|folder|...> --root=<raw data> "
                                f"--out_dir={d}`; the train scripts generate the phantom by themselves only in a "
                                f"folder named phantom* (data/phantom); for one here: `python data.py --dataset=phantom "
                                f"--out_dir={d} --image_size={cfg['image_size']} --n_images={cfg['phantom_images']}`")
    if missing and cfg["dataset"] == "phantom":
        if dist.master:
            log.line(f"{cfg['data_dir']} is missing: generating the phantom ({cfg['phantom_images']} images at "
                     f"{cfg['image_size']}px)")
            prepare_phantom(cfg["data_dir"], n_images=cfg["phantom_images"], image_size=cfg["image_size"], seed=0)
        if dist.ddp:
            torch.distributed.barrier()
    meta = load_meta(cfg["data_dir"])
    if meta["image_size"] != cfg["image_size"]:
        raise ValueError(f"image_size={cfg['image_size']} but {cfg['data_dir']} was prepared at {meta['image_size']}: "
                         f"pass --image_size={meta['image_size']} or prepare the data again with --image_size={cfg['image_size']}")
    return meta


def prepare_phantom(out_dir, n_images=12000, image_size=64, seed=0, val_frac=0.15, test_frac=0.15):
    return prepare(dict(dataset="phantom", out_dir=str(out_dir), n_images=n_images, image_size=image_size, seed=seed,
                        val_frac=val_frac, test_frac=test_frac))


# -----------------------------------------------------------------------------
# the sampler: the global batch at step s is a pure function of (seed, s)


@functools.lru_cache(maxsize=8)
def _epoch_permutation(n, seed, epoch):
    p = np.random.default_rng([seed, epoch]).permutation(n)
    p.flags.writeable = False
    return p


def global_batch_indices(n, global_batch, seed, step):
    """Positions [step*B, (step+1)*B) of the endless stream perm(epoch 0) ++ perm(epoch 1) ++ ...: every epoch
    visits each index once, and resuming at any step needs nothing but (seed, step)."""
    assert n > 0 and global_batch > 0 and step >= 0, f"n={n}, global_batch={global_batch}, step={step}"
    out = np.empty(global_batch, np.int64)
    pos, k = step * global_batch, 0
    while k < global_batch:
        epoch, off = divmod(pos, n)
        take = min(n - off, global_batch - k)
        out[k:k + take] = _epoch_permutation(n, seed, epoch)[off:off + take]
        k, pos = k + take, pos + take
    return out


def rank_micro_indices(global_idx, rank, world, accum_per_rank):
    """Cut the global batch into world*accum equal micro-batches; rank r takes micro-batches r*accum .. r*accum+accum-1,
    so W ranks x accum k/W see exactly the micro-batches of 1 rank x accum k (same BatchNorm statistics too)."""
    B, n_micro = len(global_idx), world * accum_per_rank
    assert B % n_micro == 0, f"global batch {B} must be divisible by world*accum_per_rank = {n_micro}"
    assert 0 <= rank < world, f"rank {rank} not in [0, {world})"
    mb = B // n_micro
    return [np.asarray(global_idx[(rank * accum_per_rank + j) * mb:(rank * accum_per_rank + j + 1) * mb])
            for j in range(accum_per_rank)]


class Loader:
    """Training batches from a PreparedSplit. batch_size is the per-rank micro-batch; the global batch is
    batch_size * accum_per_rank * world. get(step) returns this rank's accum_per_rank micro-batches of step,
    (x uint8 (B,1,H,W), y, idx np.int64 sorted) on device; any step, in any order. A background thread reads
    the next `prefetch` steps from the memmap (one sorted fancy-index read per micro-batch, no decoding)."""

    def __init__(self, split, batch_size, accum_per_rank, seed, rank, world, device, start_step=0, prefetch=2):
        self.split, self.batch_size, self.accum, self.seed = split, batch_size, accum_per_rank, seed
        self.rank, self.world, self.prefetch = rank, world, prefetch
        self.global_batch = batch_size * accum_per_rank * world
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.labels = torch.from_numpy(np.asarray(split.labels))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanorad-loader")
        self._futures = {}
        for s in range(start_step, start_step + prefetch):
            self._futures[s] = self._pool.submit(self.host_batch, s)

    def host_batch(self, step):
        g = global_batch_indices(len(self.split), self.global_batch, self.seed, step)
        out = []
        for idx in rank_micro_indices(g, self.rank, self.world, self.accum):
            idx = np.sort(idx)  # sorted reads walk the file forward; order inside a micro-batch does not matter
            x = torch.from_numpy(np.take(self.split.images, idx, axis=0)).unsqueeze(1)  # (B, 1, H, W)
            y = self.labels[torch.from_numpy(idx)]
            if self.pin:
                x, y = x.pin_memory(), y.pin_memory()
            out.append((x, y, idx))
        return out

    def get(self, step):
        fut = self._futures.pop(step, None) or self._pool.submit(self.host_batch, step)
        for s in [s for s in self._futures if not step < s <= step + self.prefetch]:
            self._futures.pop(s).cancel()
        for s in range(step + 1, step + 1 + self.prefetch):
            if s not in self._futures:
                self._futures[s] = self._pool.submit(self.host_batch, s)
        return [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx)
                for x, y, idx in fut.result()]

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self):
        if hasattr(self, "_pool"):
            self.close()


def eval_shards(split, batch_size, rank, world):
    """Ordered pass: rank r takes the contiguous shard [n*r//world, n*(r+1)//world) (sizes differ by at most 1),
    so across ranks every sample comes exactly once. Yields (idx np.int64, x uint8 (B,1,H,W) cpu, y cpu)."""
    n = len(split)
    lo, hi = n * rank // world, n * (rank + 1) // world
    labels = torch.from_numpy(np.asarray(split.labels))
    for a in range(lo, hi, batch_size):
        b = min(a + batch_size, hi)
        yield np.arange(a, b, dtype=np.int64), torch.from_numpy(np.array(split.images[a:b])).unsqueeze(1), labels[a:b]


# -----------------------------------------------------------------------------
# on-device float conversion and augmentation

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def to_float(x, mean, std, in_chans, imagenet_norm=False):
    """The one function from stored pixels to a model input: uint8 (B,1,H,W) (or float in [0,1]) -> normalized
    float (B,in_chans,H,W). mean / std in [0, 1] pixel units: the data set's scalars (meta.json), or per-channel
    lists (a CLIP's statistics, runs.norm_stats); imagenet_norm uses ImageNet's per-channel stats (their average for
    in_chans=1), for ImageNet-pretrained stems. Callers pick the statistics: runs.model_input (a loaded classifier),
    runs.images_to_float (a CLIP tower), train.py, train_gpt.py, export.py (the ONNX graph), bench.py."""
    assert x.ndim == 4 and x.shape[1] == 1, f"expected (B,1,H,W), got {tuple(x.shape)}"
    if imagenet_norm:
        mean = IMAGENET_MEAN if in_chans == 3 else [sum(IMAGENET_MEAN) / 3] * in_chans
        std = IMAGENET_STD if in_chans == 3 else [sum(IMAGENET_STD) / 3] * in_chans
    if isinstance(mean, (list, tuple)):  # per-channel statistics
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
        return (x.expand(-1, m.shape[1], -1, -1) - m) / s
    x = x.sub(mean).mul_(1.0 / std) if x.dtype != torch.uint8 else x.float().sub_(mean * 255.0).mul_(1.0 / (std * 255.0))
    return x if in_chans == 1 else x.repeat(1, in_chans, 1, 1)


def augment(x, generator, rot=10.0, scale=(0.9, 1.1), translate=0.06, crop_scale=(0.8, 1.0), brightness=0.1,
            contrast=0.15, gamma=0.15, noise=0.02, hflip=False):
    """Batched augmentation on x's device, a pure function of the generator's state. x: float (B,C,H,W) in any
    units (normalized or [0,1]; uint8 becomes [0,1]). One affine_grid/grid_sample does rotation (degrees),
    scale, translation (fraction of the side) and a random resized crop (area fraction, aspect 3/4..4/3);
    intensity changes act on each image's own [min, max] range, so they mean the same before or after
    normalization. Borders fill with the image's minimum (black). No left-right flip unless hflip: the heart
    is on the left (Rajpurkar et al. 2017 flip; most CXR work does not)."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    B, C, H, W = x.shape
    u = torch.rand(B, 13, generator=generator, device=generator.device).to(x.device)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    z = (x - lo).mul_(1.0 / (hi - lo).clamp_min(1e-6))  # (B,C,H,W) in [0,1]

    # geometry: output coords -> rotate/scale/translate -> crop window -> input coords (normalized [-1, 1])
    ang = (u[:, 0] * 2 - 1) * math.radians(rot)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx, ty = (u[:, 2] * 2 - 1) * translate * 2, (u[:, 3] * 2 - 1) * translate * 2
    area = crop_scale[0] + u[:, 4] * (crop_scale[1] - crop_scale[0])
    ratio = torch.exp((u[:, 5] * 2 - 1) * math.log(4 / 3)) if crop_scale != (1.0, 1.0) else torch.ones_like(area)
    cw, ch = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    cx, cy = (u[:, 6] * 2 - 1) * (1 - cw), (u[:, 7] * 2 - 1) * (1 - ch)
    flip = torch.where(u[:, 8] < 0.5, -1.0, 1.0) if hflip else torch.ones_like(area)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cw * cos * flip, -cw * sin, cw * tx + cx], 1),
                         torch.stack([ch * sin * flip, ch * cos, ch * ty + cy], 1)], 1)  # (B, 2, 3)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], device=x.device)
    if not torch.equal(theta, identity.expand_as(theta)):
        grid = F.affine_grid(theta, (B, C, H, W), align_corners=False)
        z = F.grid_sample(z, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # intensity: contrast about the image mean, brightness shift, gamma, gaussian noise (same on all channels)
    # (in place, fused where possible: on a CPU these passes over the batch are the cost)
    c = (1 + (u[:, 9] * 2 - 1) * contrast).view(B, 1, 1, 1)
    m = z.mean(dim=(1, 2, 3), keepdim=True)
    z.mul_(c).add_(m * (1 - c) + ((u[:, 10] * 2 - 1) * brightness).view(B, 1, 1, 1)).clamp_(0, 1)
    if gamma > 0:
        z.pow_(torch.exp((u[:, 11] * 2 - 1) * gamma).view(B, 1, 1, 1))
    if noise > 0:
        eps = torch.randn(B, 1, H, W, generator=generator, device=generator.device).to(x.device)
        z.add_(eps.mul_((u[:, 12] * noise).view(B, 1, 1, 1))).clamp_(0, 1)
    return z.mul_(hi - lo).add_(lo)


# -----------------------------------------------------------------------------
# benchmark: memmap loader vs the torchvision ImageFolder + PIL pipeline on the same images


def bench_images(n, S):
    try:
        return phantom.generate(n, S, 0)["images"]
    except ImportError:  # smooth synthetic images so PNG sizes resemble radiographs
        yy, xx = np.mgrid[0:S, 0:S] / S
        k = np.arange(n)[:, None, None]
        return (127 + 100 * np.sin(6 * xx + k * 0.1) * np.cos(4 * yy - k * 0.07)).astype(np.uint8)


def _rate(fn, min_seconds=1.0):
    fn()  # warm-up
    t0, n = time.time(), 0
    while time.time() - t0 < min_seconds:
        n += fn()
    return n / (time.time() - t0)


def bench(cfg):
    import torchvision
    from torchvision import transforms as T
    S, B = cfg["image_size"] or 224, cfg["batch_size"]
    n_mem, n_png = 4096, 512
    with tempfile.TemporaryDirectory() as tmp:
        images = bench_images(n_mem, S)
        recs = [index_record(f"bench/{i}", i) for i in range(n_mem)]
        write_prepared(tmp, {"train": (images, np.zeros((n_mem, 1), np.float32), recs)},
                       dict(task="multilabel", classes=["x"], source="bench"))
        split = PreparedSplit(tmp, "train")
        loader = Loader(split, B, 1, 0, 0, 1, "cpu", prefetch=0)
        step = iter(range(10**9))
        host = _rate(lambda: len(loader.host_batch(next(step))[0][0]))
        x_u8 = loader.host_batch(0)[0][0]
        gen = torch.Generator().manual_seed(0)
        aug = _rate(lambda: len(augment(to_float(x_u8, split.meta["mean"], split.meta["std"], 1), gen)))
        loader.close()
        folder = Path(tmp) / "png" / "class0"
        folder.mkdir(parents=True)
        for i in range(n_png):
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
        ds = torchvision.datasets.ImageFolder(str(folder.parent), transform=T.Compose([T.RandomResizedCrop(224),
                                                                                         T.ToTensor()]))
        dl = torch.utils.data.DataLoader(ds, batch_size=B, shuffle=True, num_workers=2)
        t0 = time.time()
        n_pil = sum(len(xb) for xb, _ in dl)
        pil = n_pil / (time.time() - t0)
    print(f"\ndata pipeline throughput, {S}px, batch {B}, {os.cpu_count()} cpu cores, torch {torch.__version__}\n")
    print("| pipeline | images/s | vs PIL |")
    print("|---|---:|---:|")
    rows = [("memmap -> uint8 batch (host side, page cache)", host),
            ("uint8 -> float + augment (CPU, 1 process)", aug),
            ("torchvision ImageFolder+PIL+RandomResizedCrop, 2 workers", pil)]
    for name, r in rows:
        print(f"| {name} | {r:,.0f} | {r / pil:.1f}x |")
    return dict(host=host, augment=aug, pil=pil)


# -----------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [f"{a}=True" if a in ("--bench", "--overwrite", "--binary", "--allow_outside_root") else a for a in argv]
    cfg = configurator.load(DEFAULTS, argv)
    if cfg["bench"]:
        return bench(cfg)
    return prepare(cfg)


if __name__ == "__main__":
    configurator.cli(main)
