"""Real-format dataset readers and image decoding; data.py prepares, samples and loads."""

import csv
import difflib
import gzip
import io
import operator
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import phantom

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
# the PIL formats of those files (MPO, a camera's multi-picture JPEG, opens through JPEG); no other PIL plugin is
# tried, so a downloaded "x-ray.png" that is really an EPS is refused, not handed to Ghostscript
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")

# knobs that change what a reader produces (they go into the input hash and meta.json)
READER_KNOBS = {
    "chexpert": ["uncertain_policy", "blank_policy", "views", "official_split", "test_source", "test_csv"],
    "nih": ["views", "official_split"],
    "vinbigdata": ["binary"],
    "folder": ["patient_pattern", "official_split"],
    "covidx": ["official_split"],
    "roco": ["official_split"],
    "mimic_cxr": ["uncertain_policy", "blank_policy", "views", "official_split", "mimic_labeler", "clinical_root"],
    "phantom": ["n_images"],
    "csv": ["csv", "path_col", "patient_col", "label_cols", "class_col", "split_col", "view_col", "age_col", "sex_col",
            "text_col", "keep_cols", "sep", "uncertain_policy", "blank_policy"],
}

# -----------------------------------------------------------------------------
# the common record list every reader returns


@dataclass
class Source:
    records: list          # one dict per image: path, patient_id, study_id, view, age, sex, text, indication, split
    labels: np.ndarray     # (N, C) float32 1/0/NaN (multilabel) or (N,) int64 (multiclass)
    classes: list
    task: str              # "multilabel" | "multiclass"
    label_policy: dict     # how the labels were made, recorded in meta.json
    hash_files: list       # files whose bytes define the inputs (csv, txt, generator source)
    source: str            # where it came from, for meta.json
    images: np.ndarray = None  # (N, H, W) uint8 when the reader makes the pixels itself (phantom)
    labels_raw: np.ndarray = None  # (N, C) float32 the dataset's own codes before any policy (CheXpert 1/0/-1/NaN)
    patient_id_source: str = ""    # where patient ids come from (a column, the path, a file-name rule, "file")
    root: str = ""                 # the folder that paths read from the dataset's files must stay inside
    warnings: list = field(default_factory=list)  # sentences for meta.json (also printed/warned by prepare)
    extra_columns: list = field(default_factory=list)  # record keys written to the index csv after data.INDEX_COLUMNS


def index_record(path, patient_id, study_id="", view="", age="", sex="", text="", indication="", split=""):
    """split is the dataset's own split hint: "" (pool: train, or carved into val/test), "val" or "test"."""
    return dict(path=str(path), patient_id=str(patient_id), study_id=str(study_id), view=str(view),
                age=str(age), sex=str(sex), text=text, indication=indication, split=split)


# -----------------------------------------------------------------------------
# dataset text files: every reader's CSV and list file goes through read_csv / read_lines, so that each hand-made or
# damaged file (an Excel BOM, latin-1, a row cut short, an empty download) gets a sentence naming file:line and the fix


def shown(path):
    """A path as an error names it: as it is, or repr() when its bytes are not UTF-8 (os.fsdecode keeps them as
    surrogates such as \\udce9, which would print as garbage or not at all)."""
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return repr(text)
    return text


def _open_text(path):
    """UTF-8 text of a plain or .gz file; 'utf-8-sig' drops the byte-order mark Excel writes before a 'CSV UTF-8'."""
    path = os.fsdecode(path)
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def _text_error(path, line, e):
    """The sentence for an exception met while reading line `line` of a dataset text file."""
    name = shown(path)
    if isinstance(e, UnicodeDecodeError):  # find the byte in the whole file: e.start counts from the decoder's chunk
        with (gzip.open if os.fsdecode(path).endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
        try:
            raw[bom:].decode("utf-8")
            at = bom
        except UnicodeDecodeError as full:
            at = bom + full.start
        line = raw.count(b"\n", 0, at) + 1
        return ValueError(f"{name}:{line}: byte {at} (0x{raw[at:at + 1].hex()}) is not UTF-8 (a latin-1 / "
                          f"Windows-1252 file?): save it as UTF-8 (Excel: 'CSV UTF-8'; or iconv -f latin1 -t utf-8)")
    if isinstance(e, csv.Error):
        return ValueError(f"{name}:{line}: {e}: fix that line (quote a field holding a comma, quote or newline)")
    return ValueError(f"{name} cannot be read at line {line} ({type(e).__name__}: {e}): the download is damaged or "
                      f"cut short; fetch the file again")


_READ_ERRORS = (UnicodeDecodeError, csv.Error, OSError, EOFError)  # gzip: BadGzipFile (an OSError), EOFError when cut


def read_lines(path):
    """Yield (line number, line) of a dataset list / caption file (plain or .gz, UTF-8 with or without a BOM)."""
    with _open_text(path) as f:
        line_no = 0
        try:
            for line_no, line in enumerate(f, start=1):
                yield line_no, line
        except _READ_ERRORS as e:
            raise _text_error(path, line_no + 1, e) from None


def _error_line(reader, e):
    # the csv module counts the line it fails to parse; a read or decode error comes before the count
    return reader.line_num if isinstance(e, csv.Error) else reader.line_num + 1


def read_csv(path, need=(), sep=","):
    """-> (header, rows) of a dataset CSV (plain or .gz, UTF-8 with or without a BOM; sep: the field separator, tab
    for a TSV); rows yields (line number, cells) for each non-blank row. The header must hold every column in `need`;
    each row must have as many fields as the header, and at least one row must follow it: otherwise a sentence names
    the file, the line and the fix."""
    name = shown(path)
    f = _open_text(path)
    reader = csv.reader(f, delimiter=sep)
    try:
        header = next((row for row in reader if row), None)
    except _READ_ERRORS as e:
        f.close()
        raise _text_error(path, _error_line(reader, e), e) from None
    if header is None:
        f.close()
        raise ValueError(f"{name} is empty (no header line): the download or export stopped; fetch or save the file "
                         f"again")
    missing = [c for c in need if c not in header]
    if missing:
        f.close()
        raise ValueError(f"{name}:{reader.line_num}: the header lacks the column(s) {missing} (it has {header[:12]}"
                         f"{' ...' if len(header) > 12 else ''}): pass the dataset's own file, or name the columns so")
    return header, _csv_rows(path, f, reader, header)


def _csv_rows(path, f, reader, header):
    n = 0
    with f:
        try:
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{shown(path)}:{reader.line_num} has {len(row)} fields, the header has "
                                     f"{len(header)}: the file is cut short or a field holds an unquoted comma; fix "
                                     f"that line or fetch the file again")
                n += 1
                yield reader.line_num, row
        except _READ_ERRORS as e:
            raise _text_error(path, _error_line(reader, e), e) from None
    if n == 0:
        raise ValueError(f"{shown(path)} has a header but no rows: the download or export stopped after line 1; fetch "
                         f"or save the file again")


def read_csv_dicts(path, need=()):
    """Yield (line number, {column: cell}) of a dataset CSV, checked as read_csv checks it."""
    header, rows = read_csv(path, need)
    for line_no, row in rows:
        yield line_no, dict(zip(header, row))


def _first_file(folder, names):
    for name in names:
        for ext in ("", ".gz"):
            if (Path(folder) / (name + ext)).is_file():
                return Path(folder) / (name + ext)
    return None


def _age(text):
    digits = re.match(r"\d+", text.strip())  # NIH v2017 writes '058Y'; v2020 and CheXpert write 58
    return str(int(digits.group())) if digits else ""


def _parse_views(views):
    """'all' -> None (keep everything); else a set of lower-case view names to keep."""
    wanted = {v.strip().lower() for v in views.split(",") if v.strip()}
    if not wanted or "all" in wanted:
        return None
    unknown = wanted - {"frontal", "lateral", "ap", "pa", "ll", "rl"}
    if unknown:
        raise ValueError(f"--views={views}: unknown view(s) {sorted(unknown)}; use all, frontal, lateral, AP, PA, LL, RL "
                         f"or a comma list such as AP,PA")
    return wanted


def _keep_view(wanted, *names):
    return wanted is None or any(n.lower() in wanted for n in names if n)


# -----------------------------------------------------------------------------
# multi-label cells as CheXpert writes them (1 positive, 0 negative, -1 uncertain, blank = not mentioned) and the two
# policies that turn them into training labels: one parser for every reader of such cells (CheXpert, the csv reader)

UNCERTAIN_POLICIES = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}  # U-Ignore / U-Zeros / U-Ones, Irvin et al. 2019
BLANK_POLICIES = {"zeros": 0.0, "ignore": np.nan}


def check_label_policies(uncertain_policy, blank_policy):
    if uncertain_policy not in UNCERTAIN_POLICIES or blank_policy not in BLANK_POLICIES:
        raise ValueError(f"uncertain_policy={uncertain_policy!r} must be one of {list(UNCERTAIN_POLICIES)}; "
                         f"blank_policy={blank_policy!r} must be one of {list(BLANK_POLICIES)}")


def label_cells(cells, where, classes, uncertain_policy, blank_policy, kind="CheXpert label cells"):
    """cells: one sequence of cell strings per row (a column per class); where: (file, line number) per row.
    -> (labels after the policies, raw codes 1/0/-1/NaN), both (N, C) float32. A cell that is not 1, 0, -1 (or 1.0,
    0.0, -1.0) or blank is a sentence naming its file:line, its column and the cell."""
    check_label_policies(uncertain_policy, blank_policy)
    cells = np.array(cells, dtype=str).reshape(-1, len(classes))
    blank = cells == ""
    cells[blank] = "nan"
    try:
        raw = cells.astype(np.float32)
        bad = ~blank & ~np.isin(raw, (1.0, 0.0, -1.0))
    except ValueError:  # a cell that is not a number: find it by its text
        bad = ~blank & ~np.isin(cells, ("1.0", "1", "0.0", "0", "-1.0", "-1"))
    if bad.any():
        i, c = np.argwhere(bad)[0]
        path, line_no = where[i]
        raise ValueError(f"{shown(path)}:{line_no}: {classes[c]} is {str(cells[i, c])!r}; {kind} are 1.0, 0.0, "
                         f"-1.0 (uncertain) or blank: fix that cell ({int(bad.sum())} such cells)")
    labels = raw.copy()
    labels[raw == -1.0] = UNCERTAIN_POLICIES[uncertain_policy]
    labels[blank] = BLANK_POLICIES[blank_policy]
    return labels, raw


# -----------------------------------------------------------------------------
# reader: CheXpert (Irvin et al. 2019) CheXpert-v1.0[-small]/{train,valid}.csv + jpgs

CHEXPERT_CLASSES = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                    "Pleural Other", "Fracture", "Support Devices"]
_SEX = {"Male": "M", "Female": "F"}


def _chexpert_base(csv_path, first_path):
    """The folder that CSV paths (CheXpert-v1.0-small/train/...) are relative to; csv's grandparent by default."""
    d = Path(csv_path).parent
    stripped = Path(*Path(first_path).parts[1:]) if len(Path(first_path).parts) > 1 else Path(first_path)
    for base, rel in ((d.parent, False), (d, False), (d, True)):
        if (base / (stripped if rel else first_path)).is_file():
            return base, rel
    return d.parent, False


_CHEXPERT_TEST_SOURCES = ("auto", "valid", "carve")


def _read_chexpert_csv(csv_path, hint, wanted, demographics=True):
    """-> (records, label cells as strings, base folder, line numbers) of one CheXpert CSV. demographics=False: the
    test labels file, which has only Path and the 14 observations (view then comes from the file name:
    view1_frontal.jpg)."""
    records, cells, lines = [], [], []
    pid_re = re.compile(r"(patient\d+)/(study\d+)")
    need = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] if demographics else ["Path"]
    header, rows = read_csv(csv_path, need + CHEXPERT_CLASSES)
    col = {h: i for i, h in enumerate(header)}
    get_labels = operator.itemgetter(*[col[c] for c in CHEXPERT_CLASSES])
    ip = col["Path"]
    isex, iage, ifl, iap = (col.get(c) for c in ("Sex", "Age", "Frontal/Lateral", "AP/PA"))
    prefix = None
    for line_no, row in rows:
        path = row[ip]
        if ifl is not None:
            fl, ap = row[ifl], row[iap] if iap is not None else ""
        else:
            fl, ap = ("Lateral" if "lateral" in path.rsplit("/", 1)[-1].lower() else "Frontal"), ""
        if wanted is not None and not _keep_view(wanted, fl, ap):
            continue
        if prefix is None:  # plain string joins: pathlib would cost seconds over 223k rows
            base, rel = _chexpert_base(csv_path, path)
            prefix, cut = str(base) + os.sep, (len(Path(path).parts[0]) + 1 if rel else 0)
        m = pid_re.search(path)
        if m is None:
            raise ValueError(f"{shown(csv_path)}:{line_no}: no patientNNNNN/studyN in path {path!r}: CheXpert paths "
                             f"look like CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
        cells.append(get_labels(row))
        lines.append(line_no)
        age = row[iage] if iage is not None else ""
        records.append(dict(path=prefix + path[cut:], patient_id=m.group(1),
                            study_id=f"{m.group(1)}/{m.group(2)}", view=ap or fl,
                            age=age if age.isdigit() else _age(age),
                            sex=_SEX.get(row[isex], "") if isex is not None else "",
                            text="", indication="", split=hint))
    return records, cells, (prefix[:-1] if prefix else str(Path(csv_path).parent)), lines


def read_chexpert(root, uncertain_policy="ignore", blank_policy="zeros", views="all", official_split=True,
                  test_source="carve", test_csv=""):
    """CheXpert-v1.0[-small]: train.csv (labeller labels) + valid.csv (200 studies, 3-radiologist consensus).

    test_source says which rows are the test split (papers report on valid.csv, Irvin et al. 2019):
      valid -- exactly the valid.csv rows; val is carved from training patients (patient-disjoint, stratified);
      carve -- valid.csv is the val split and test is carved from training patients (the behaviour before issue 15,
               and this function's default; data.py's default is auto);
      auto  -- valid when valid.csv is there, else carve.
    test_csv='<file>': the 500-study test labels file (Path + the 14 columns, radiologist consensus); its rows are the
      test split and valid.csv stays the val split (then test_source must not be 'valid').
    Returns labels after the policies (-1 -> uncertain_policy, blank -> blank_policy) and labels_raw with CheXpert's
    own codes (1, 0, -1 = uncertain, NaN = blank), which evaluation turns into its own labels."""
    root = Path(root)
    if root.is_file():
        train_csv, folder = root, root.parent
    else:
        folder = next((d for d in [root, *sorted(root.glob("CheXpert-v1.0*"))] if _first_file(d, ["train.csv"])), None)
        if folder is None:
            raise FileNotFoundError(f"no CheXpert train.csv under {root}: pass --root=<folder holding "
                                    f"CheXpert-v1.0-small/ or its train.csv>")
        train_csv = _first_file(folder, ["train.csv"])
    valid_csv = _first_file(folder, ["valid.csv"]) if official_split else None
    check_label_policies(uncertain_policy, blank_policy)
    if test_source not in _CHEXPERT_TEST_SOURCES:
        raise ValueError(f"test_source={test_source!r} must be one of {list(_CHEXPERT_TEST_SOURCES)}")
    if test_csv:
        if test_source == "valid":
            raise ValueError(f"--test_csv={test_csv} makes that file the test split, and --test_source=valid asks for "
                             f"valid.csv: drop one of them (with --test_csv, valid.csv is the val split)")
        if not Path(test_csv).is_file():
            raise FileNotFoundError(f"--test_csv={test_csv} not found: pass the CheXpert test labels CSV "
                                    f"(Path + the 14 observation columns)")
        resolved = "test_csv"
    elif test_source == "valid" and valid_csv is None:
        raise FileNotFoundError(f"--test_source=valid needs {folder}/valid.csv" +
                                (" and --official_split=True" if not official_split else "") +
                                "; pass --test_source=carve to carve the test split from training patients")
    else:
        resolved = "valid" if test_source == "valid" or (test_source == "auto" and valid_csv) else "carve"
    wanted = _parse_views(views)
    parts = [(train_csv, "", True), (valid_csv, "test" if resolved == "valid" else "val", True)]
    if test_csv:
        parts.append((Path(test_csv), "test", False))
    records, cells, bases, where = [], [], [], []
    for csv_path, hint, demographics in parts:
        if csv_path is not None:
            r, c, base, lines = _read_chexpert_csv(csv_path, hint, wanted, demographics)
            records += r
            cells += c
            bases.append(base)
            where += [(csv_path, line_no) for line_no in lines]
    held_out = {r["patient_id"] for r in records if r["split"]}
    if held_out:
        both = held_out & {r["patient_id"] for r in records if not r["split"]}
        if both:
            raise ValueError(f"patients {sorted(both)[:5]} are in {train_csv} and in the held-out CSV "
                             f"({valid_csv if not test_csv else test_csv}); CheXpert's splits are patient-disjoint: "
                             f"fix the CSVs or pass --official_split=False")
    labels, raw = label_cells(cells, where, CHEXPERT_CLASSES, uncertain_policy, blank_policy)
    official_test = {"valid": "valid.csv", "test_csv": str(test_csv), "carve": None}[resolved]
    policy = dict(uncertain=uncertain_policy, blank=blank_policy, views=views,
                  official_val="valid.csv" if valid_csv and resolved != "valid" else None,
                  test_source=resolved, official_test=official_test)
    return Source(records, labels, list(CHEXPERT_CLASSES), "multilabel", policy,
                  [p for p in (train_csv, valid_csv, test_csv) if p], f"chexpert:{root}", labels_raw=raw,
                  patient_id_source="path: patientNNNNN", root=os.path.commonpath(bases))


# -----------------------------------------------------------------------------
# reader: NIH ChestX-ray14 (Wang et al. 2017) Data_Entry_2017*.csv + images*/

NIH_CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
               "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def _scan_nih_images(folder):
    """name -> path over images*/ and images*/images/ (the Kaggle and the NIH box layouts)."""
    found = {}
    for d in sorted(Path(folder).glob("images*")):
        for sub in (d, d / "images"):
            if sub.is_dir():
                for e in os.scandir(sub):
                    if e.is_file():
                        found.setdefault(e.name, e.path)
    return found


def read_nih(root, views="all", official_split=True):
    root = Path(root)
    if root.is_file():
        csv_path, folder = root, root.parent
    else:
        csv_path = next(iter(sorted(root.glob("Data_Entry_2017*.csv*"))), None)
        folder = root
        if csv_path is None:
            raise FileNotFoundError(f"no Data_Entry_2017*.csv under {root}: pass --root=<the ChestX-ray14 folder>")
    test_names = None
    test_list = _first_file(folder, ["test_list.txt"])
    if official_split and test_list is not None:
        test_names = {line.strip() for _, line in read_lines(test_list) if line.strip()}
    files = _scan_nih_images(folder)
    wanted = _parse_views(views)
    cls_index = {c: i for i, c in enumerate(NIH_CLASSES)}
    records, rows = [], []
    need = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
            "View Position"]
    header, lines = read_csv(csv_path, need)
    ii, il, ifu, ipid, iage, isex, iview = (header.index(c) for c in need)
    for line_no, row in lines:
        if not _keep_view(wanted, row[iview], "frontal"):
            continue
        y = np.zeros(len(NIH_CLASSES), np.float32)
        for finding in row[il].split("|"):
            if finding == "No Finding":
                continue
            if finding not in cls_index:
                raise ValueError(f"{shown(csv_path)}:{line_no}: unknown finding {finding!r}; known: {NIH_CLASSES} "
                                 f"(findings are separated by '|'): fix that cell")
            y[cls_index[finding]] = 1.0
        name, pid = row[ii], row[ipid]
        hint = "test" if test_names is not None and name in test_names else ""
        records.append(index_record(files.get(name, folder / "images" / name), pid, f"{pid}_{row[ifu]}", row[iview],
                                    _age(row[iage]), row[isex], split=hint))
        rows.append(y)
    labels = np.stack(rows) if rows else np.zeros((0, len(NIH_CLASSES)), np.float32)
    policy = dict(no_finding="all zeros", views=views, official_test="test_list.txt" if test_names else None)
    hash_files = [csv_path] + ([test_list] if test_names is not None else [])
    return Source(records, labels, list(NIH_CLASSES), "multilabel", policy, hash_files, f"nih:{root}",
                  patient_id_source="csv column Patient ID", root=str(folder))


# -----------------------------------------------------------------------------
# reader: VinBigData (Nguyen et al. 2022) train.csv, one row per box per radiologist


def read_vinbigdata(root, binary=False):
    root = Path(root)
    csv_path = root if root.is_file() else _first_file(root, ["train.csv"])
    if csv_path is None:
        raise FileNotFoundError(f"no train.csv under {root}: pass --root=<the vinbigdata folder>")
    folder = csv_path.parent
    files = {}
    img_dir = folder / "train" if (folder / "train").is_dir() else folder
    for dirpath, _, names in os.walk(img_dir):
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTS:
                files.setdefault(stem, os.path.join(dirpath, name))
    per_image, class_names = {}, {}
    for line_no, row in read_csv_dicts(csv_path, ["image_id", "class_name", "class_id"]):
        try:
            cid = int(row["class_id"])
        except ValueError:
            raise ValueError(f"{shown(csv_path)}:{line_no}: class_id {row['class_id']!r} is not a class number "
                             f"(VinBigData: 0-13 for the findings, 14 for 'No finding'): fix that cell") from None
        if class_names.setdefault(cid, row["class_name"]) != row["class_name"]:
            raise ValueError(f"{shown(csv_path)}:{line_no}: class_id {cid} is {row['class_name']!r} here and "
                             f"{class_names[cid]!r} on an earlier line: fix the class_name or class_id of that row")
        per_image.setdefault(row["image_id"], set()).add(cid)
    no_finding = next((c for c, n in class_names.items() if n.lower() == "no finding"), None)
    classes = [class_names[c] for c in sorted(class_names)]
    labels = np.zeros((len(per_image), len(classes)), np.float32)
    col = {c: j for j, c in enumerate(sorted(class_names))}
    records = []
    for i, (image_id, cids) in enumerate(per_image.items()):
        # a finding is positive if any radiologist marked it; "No finding" only when every radiologist said so
        for c in cids:
            if c != no_finding:
                labels[i, col[c]] = 1.0
        if no_finding is not None:
            labels[i, col[no_finding]] = float(cids == {no_finding})
        records.append(index_record(files.get(image_id, img_dir / f"{image_id}.dicom"), image_id, image_id))
    policy = dict(aggregation="positive if any radiologist marked it; No finding only if all did", binary=binary)
    if binary:
        nf = labels[:, col[no_finding]] if no_finding is not None else np.zeros(len(labels), np.float32)
        labels, classes = (1.0 - nf)[:, None].astype(np.float32), ["Abnormal"]
    return Source(records, labels, classes, "multilabel", policy, [csv_path], f"vinbigdata:{root}",
                  patient_id_source="image_id (VinBigData has no patient ids: one patient per image)",
                  root=str(folder))


# -----------------------------------------------------------------------------
# readers: ImageFolder (root/<class>/*.png, optionally root/{train,val,test}/<class>/), COVIDx, ROCO

_SPLIT_DIRS = {"train": "", "val": "val", "valid": "val", "validation": "val", "test": "test"}


# Default patient-id rules for file names, tried in order when --patient_pattern is not given. A rule is used only
# when it matches EVERY file stem and finds fewer patients than files (otherwise it would not group anything).
FOLDER_PATIENT_RULES = [
    ("p<digits> / patient<digits> prefix (p007_img0, patient12-a)", re.compile(r"^((?:patient|p)\d+)(?=[-_. ]|$)", re.I)),
    ("<id>_ prefix holding a digit (00000001_000, person1_bacteria_1)", re.compile(r"^([A-Za-z]*\d[A-Za-z0-9]*)_")),
]


def _folder_patient_ids(stems, patient_pattern, root):
    """-> (patient ids, patient_id_source, warnings). See read_folder's docstring for the rule."""
    if patient_pattern:
        pattern = re.compile(patient_pattern)
        ids = []
        for path, stem in stems:
            m = pattern.search(stem)
            if m is None:
                raise ValueError(f"{path}: --patient_pattern={patient_pattern!r} does not match the file stem")
            ids.append(m.group(1) if m.groups() else m.group(0))
        return ids, f"patient_pattern {patient_pattern!r}", []
    for name, rule in FOLDER_PATIENT_RULES:
        ms = [rule.match(stem) for _, stem in stems]
        if all(ms):
            ids = [m.group(1) for m in ms]
            if len(set(ids)) < len(ids):
                return ids, f"inferred: {name}", []
    msg = (f"{root}: no patient id in the file names (e.g. {stems[0][1]!r}), so every FILE is its own patient and "
           f"images of one patient can land in both train and test; pass --patient_pattern='<regex on the file "
           f"stem, group 1 = patient id>' if the names carry one")
    return [stem for _, stem in stems], "file", [msg]


def read_folder(root, patient_pattern="", official_split=True):
    """root/<class>/*.png or root/{train,val,test}/<class>/*.png -> multi-class records.

    Patient ids (splits are by patient, so this decides whether one patient's images can cross splits):
    --patient_pattern='<regex>' searches each file stem, group 1 (or the whole match) is the patient. Without it,
    the first of FOLDER_PATIENT_RULES that matches every stem and groups at least two files is used:
      1. a leading p<digits> or patient<digits> token (case-insensitive), followed by - _ . space or the end:
         p007_img0.png, p007_img1.png -> patient p007;
      2. a leading token holding a digit, followed by '_': 00000001_000.png -> 00000001 (NIH style),
         person1_bacteria_1.jpeg -> person1 (Kermany pneumonia style).
    If none does, every file is its own patient: a warning says so and meta.json records patient_id_source="file".
    The rule used is meta.json's patient_id_source."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root={root} is not a folder (expected root/<class>/*.png)")
    subs = sorted(d for d in root.iterdir() if d.is_dir())
    split_layout = bool(subs) and all(d.name.lower() in _SPLIT_DIRS for d in subs)
    tops = [(d, _SPLIT_DIRS[d.name.lower()] if official_split else "") for d in subs] if split_layout else [(root, "")]
    classes = sorted({c.name for top, _ in tops for c in top.iterdir() if c.is_dir()})
    found, labels = [], []
    for top, hint in tops:
        for j, cls in enumerate(classes):
            for p in sorted((top / cls).rglob("*")) if (top / cls).is_dir() else []:
                if p.suffix.lower() in IMAGE_EXTS:
                    found.append((p, hint))
                    labels.append(j)
    if not found:
        raise FileNotFoundError(f"no images ({sorted(IMAGE_EXTS)}) under {root}/<class>/")
    ids, id_source, warns = _folder_patient_ids([(p, p.stem) for p, _ in found], patient_pattern, root)
    for w in warns:
        warnings.warn(w, stacklevel=2)
    records = [index_record(p, pid, pid, split=hint) for (p, hint), pid in zip(found, ids)]
    policy = dict(layout="root/<split>/<class>" if split_layout else "root/<class>", patient_pattern=patient_pattern)
    return Source(records, np.array(labels, np.int64), classes, "multiclass", policy, [], f"folder:{root}",
                  patient_id_source=id_source, root=str(root), warnings=warns)


def read_covidx(root, official_split=True):
    root = Path(root)
    rows = []
    for name, hint in (("train", ""), ("val", "val"), ("test", "test")):
        txt = _first_file(root, [f"{name}.txt"])
        if txt is None:
            continue
        for line_no, line in read_lines(txt):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 3:
                raise ValueError(f"{shown(txt)}:{line_no}: expected 'patient_id filename label [source]', got "
                                 f"{line.rstrip()!r}: fix that line")
            # 3 columns in COVIDx v1-v7, 4 (with source) from v8; a filename may contain spaces
            fname, label = (parts[1], parts[2]) if len(parts) == 3 else (" ".join(parts[1:-2]), parts[-2])
            rows.append((parts[0], root / name / fname, label, hint if official_split else "", txt))
    if not rows:
        raise FileNotFoundError(f"no train.txt/test.txt under {root}: pass --root=<the COVIDx folder>")
    classes = sorted({r[2] for r in rows})
    records = [index_record(path, pid, pid, split=hint) for pid, path, _, hint, _ in rows]
    labels = np.array([classes.index(r[2]) for r in rows], np.int64)
    return Source(records, labels, classes, "multiclass", dict(labels=classes), sorted({r[4] for r in rows}),
                  f"covidx:{root}", patient_id_source="list column patient_id", root=str(root))


def read_roco(root, official_split=True):
    root = Path(root)
    records, files = [], []
    for name, hint in (("train", ""), ("validation", "val"), ("test", "test")):
        txt = root / name / "radiology" / "captions.txt"
        if not txt.is_file():
            continue
        files.append(txt)
        for line_no, line in read_lines(txt):
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{shown(txt)}:{line_no}: expected 'ROCO_xxxxx<TAB>caption', got {line[:80]!r}: "
                                 f"fix that line")
            roco_id, caption = line.rstrip("\r\n").split("\t", 1)
            path = root / name / "radiology" / "images" / f"{roco_id.strip()}.jpg"
            records.append(index_record(path, roco_id.strip(), roco_id.strip(), text=caption.strip(),
                                        split=hint if official_split else ""))
    if not records:
        raise FileNotFoundError(f"no {{train,validation,test}}/radiology/captions.txt under {root}")
    return Source(records, np.zeros((len(records), 0), np.float32), [], "multilabel", dict(labels="none (captions)"),
                  files, f"roco:{root}", patient_id_source="image id (ROCO has no patient ids)", root=str(root))


# -----------------------------------------------------------------------------
# reader: MIMIC-CXR-JPG 2.0.0 (Johnson et al. 2019) + reports + MIMIC-IV hosp/patients + MIMIC-IV-ED triage

MIMIC_TRIAGE = ["temperature", "heartrate", "resprate", "o2sat", "sbp", "dbp", "pain", "acuity", "chiefcomplaint"]
MIMIC_COLUMNS = ["findings", "impression"] + MIMIC_TRIAGE  # index columns beyond data.INDEX_COLUMNS
_MIMIC_SPLIT = {"train": "", "validate": "val", "test": "test"}
_FRONTAL, _LATERAL = {"PA", "AP", "AP AXIAL", "PA LLD", "AP LLD", "AP RLD", "PA RLD"}, {"LATERAL", "LL", "RL", "LAO", "RAO"}
_SECTION = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.M)


def _report_sections(text):
    """Free-text MIMIC-CXR report -> {SECTION NAME: text} (INDICATION, FINDINGS, IMPRESSION, ...), whitespace
    collapsed. Text before the first heading is kept under ''."""
    out, heads = {}, list(_SECTION.finditer(text))
    starts = [(m.group(1).strip(), m.end(), m.start()) for m in heads]
    if not heads or heads[0].start() > 0:
        out[""] = " ".join(text[:heads[0].start() if heads else len(text)].split())
    for k, (name, a, _) in enumerate(starts):
        b = starts[k + 1][2] if k + 1 < len(starts) else len(text)
        out[name] = " ".join(text[a:b].split())
    return out


def _mimic_time(date, time_):
    """StudyDate 21800506 + StudyTime 213014.531 -> 'YYYY-MM-DD HH:MM:SS' (sorts like the ED's intime/outtime)."""
    t = f"{float(time_ or 0):06.0f}" if time_ else "000000"
    return f"{date[:4]}-{date[4:6]}-{date[6:8]} {t[:2]}:{t[2:4]}:{t[4:6]}"


def _mimic_clinical(folder, times):
    """subject -> (gender, anchor_age, anchor_year) from hosp/patients.csv.gz; (subject, study) -> triage row of the ED
    stay whose [intime, outtime] holds the study time, from ed/edstays.csv.gz + ed/triage.csv.gz. Empty when absent."""
    patients, triage, files = {}, {}, []
    pat = _first_file(Path(folder) / "hosp", ["patients.csv"])
    if pat is not None:
        files.append(pat)
        for _, row in read_csv_dicts(pat, ["subject_id", "gender", "anchor_age", "anchor_year"]):
            patients[row["subject_id"]] = (row["gender"], row["anchor_age"], row["anchor_year"])
    stays_csv, tri_csv = _first_file(Path(folder) / "ed", ["edstays.csv"]), _first_file(Path(folder) / "ed", ["triage.csv"])
    if stays_csv is not None and tri_csv is not None:
        files += [stays_csv, tri_csv]
        by_stay = {row["stay_id"]: row for _, row in read_csv_dicts(tri_csv, ["stay_id"])}
        stays = {}
        for _, row in read_csv_dicts(stays_csv, ["subject_id", "stay_id", "intime", "outtime"]):
            stays.setdefault(row["subject_id"], []).append((row["intime"], row["outtime"], row["stay_id"]))
        for (subject, study), t in times.items():
            hit = [sid for a, b, sid in sorted(stays.get(subject, [])) if a <= t <= b and sid in by_stay]
            if hit:
                triage[subject, study] = by_stay[hit[0]]
    return patients, triage, files


def read_mimic_cxr(root, uncertain_policy="ignore", blank_policy="zeros", views="all", official_split=True,
                   mimic_labeler="chexpert", clinical_root=""):
    """MIMIC-CXR-JPG as PhysioNet ships it, under root:
      mimic-cxr-2.0.0-{chexpert,negbio,metadata,split}.csv.gz and files/pXX/p<subject>/s<study>/<dicom_id>.jpg;
      reports (mimic-cxr-reports) at files/pXX/p<subject>/s<study>.txt: INDICATION (or HISTORY / REASON FOR
      EXAMINATION) -> indication, FINDINGS and IMPRESSION -> their columns, both -> text;
      clinical_root (default root) may hold MIMIC-IV hosp/patients.csv.gz (sex; age = anchor_age + study year -
      anchor_year) and MIMIC-IV-ED ed/edstays.csv.gz + ed/triage.csv.gz (MIMIC_TRIAGE columns of the ED stay whose
      intime..outtime holds the study time; dates are shifted per subject alike in all three databases).
    One record per image (dicom_id); labels per study from the mimic_labeler CSV (chexpert | negbio) under the CheXpert
    policies, labels_raw with the raw codes (a study the labeler skipped is all blank). The official split file
    (train / validate / test) is honoured; a subject in two official splits is an error."""
    root = Path(root)
    names = {k: _first_file(root, [f"mimic-cxr-2.0.0-{k}.csv"]) for k in ("metadata", "split", mimic_labeler)}
    if mimic_labeler not in ("chexpert", "negbio"):
        raise ValueError(f"mimic_labeler={mimic_labeler!r} must be 'chexpert' or 'negbio'")
    missing = [f"mimic-cxr-2.0.0-{k}.csv.gz" for k, v in names.items() if v is None and (k != "split" or official_split)]
    if missing:
        raise FileNotFoundError(f"{missing} not under {root}: pass --root=<the MIMIC-CXR-JPG folder "
                                f"(physionet.org/files/mimic-cxr-jpg/2.0.0)>")
    check_label_policies(uncertain_policy, blank_policy)
    wanted = _parse_views(views)
    study_cells = {}
    for line_no, row in read_csv_dicts(names[mimic_labeler], CHEXPERT_CLASSES + ["subject_id", "study_id"]):
        study_cells[row["subject_id"], row["study_id"]] = ([row[c] for c in CHEXPERT_CLASSES], line_no)
    split_of = {}
    if official_split:
        for line_no, row in read_csv_dicts(names["split"], ["dicom_id", "split"]):
            if row["split"] not in _MIMIC_SPLIT:
                raise ValueError(f"{shown(names['split'])}:{line_no}: unknown split {row['split']!r}; expected "
                                 f"train/validate/test: fix that cell")
            split_of[row["dicom_id"]] = _MIMIC_SPLIT[row["split"]]
    images, times = [], {}
    need = ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"]
    for _, row in read_csv_dicts(names["metadata"], need):
        vp = row["ViewPosition"]
        kind = "frontal" if vp in _FRONTAL else "lateral" if vp in _LATERAL else ""
        if wanted is not None and not _keep_view(wanted, vp, kind):
            continue
        key = (row["subject_id"], row["study_id"])
        t = _mimic_time(row["StudyDate"], row["StudyTime"])
        times[key] = min(times.get(key, t), t)
        images.append((row["dicom_id"], key, vp, t))
    patients, triage, clinical_files = _mimic_clinical(clinical_root or root, times)
    records, cells, where, reports, subject_split = [], [], [], {}, {}
    for dicom_id, (subject, study), vp, t in images:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        if (subject, study) not in reports:
            txt = folder / f"s{study}.txt"
            reports[subject, study] = _report_sections(txt.read_text(encoding="utf-8")) if txt.is_file() else {}
        sec = reports[subject, study]
        indication = sec.get("INDICATION") or sec.get("HISTORY") or sec.get("REASON FOR EXAMINATION") or \
            sec.get("CLINICAL HISTORY", "")
        findings, impression = sec.get("FINDINGS", ""), sec.get("IMPRESSION", "")
        gender, anchor_age, anchor_year = patients.get(subject, ("", "", ""))
        age = str(int(anchor_age) + int(t[:4]) - int(anchor_year)) if anchor_age else ""
        hint = split_of.get(dicom_id, "") if official_split else ""
        if subject_split.setdefault(subject, hint) != hint:
            raise ValueError(f"{names['split']}: subject {subject} is in two official splits "
                             f"({subject_split[subject] or 'train'}, {hint or 'train'}); rerun with --official_split=False")
        rec = index_record(folder / f"s{study}" / f"{dicom_id}.jpg", subject, f"s{study}", vp, age, gender,
                      text=" ".join(x for x in (f"FINDINGS: {findings}" if findings else "",
                                                f"IMPRESSION: {impression}" if impression else "") if x),
                      indication=indication, split=hint)
        tri = triage.get((subject, study), {})
        rec.update(findings=findings, impression=impression, **{c: tri.get(c, "") for c in MIMIC_TRIAGE})
        records.append(rec)
        study_row, line_no = study_cells.get((subject, study), ([""] * len(CHEXPERT_CLASSES), None))
        cells.append(study_row)
        where.append((names[mimic_labeler], line_no))  # a study the labeler skipped: all blank, never named
    labels, raw = label_cells(cells, where, CHEXPERT_CLASSES, uncertain_policy, blank_policy)
    n_unlabelled = sum((s, st) not in study_cells for s, st in {r[1] for r in images})
    policy = dict(uncertain=uncertain_policy, blank=blank_policy, views=views, labeler=mimic_labeler,
                  official_split="mimic-cxr-2.0.0-split.csv.gz" if official_split else None,
                  studies_without_labels=n_unlabelled, clinical=[str(p) for p in clinical_files])
    return Source(records, labels, list(CHEXPERT_CLASSES), "multilabel", policy,
                  [p for p in names.values() if p] + clinical_files, f"mimic_cxr:{root}", labels_raw=raw,
                  patient_id_source="subject_id", root=str(root), extra_columns=list(MIMIC_COLUMNS))


# -----------------------------------------------------------------------------
# reader: a lab's own CSV or TSV, one row per image, + an image root; the --*_col knobs say which column is what


def _csv_sep(path, sep):
    """The field separator: --sep as given (one character, or tab / \\t), else tab for .tsv / .tab, else comma."""
    if sep in ("tab", "\\t", "\t"):
        return "\t"
    if len(sep) > 1:
        raise ValueError(f"--sep={sep!r} must be one character (such as ; or |) or tab; leave it out for comma "
                         f"(tab for a .tsv file)")
    return sep or ("\t" if os.fsdecode(path).lower().removesuffix(".gz").endswith((".tsv", ".tab")) else ",")


def _csv_column(path, header, knob, name):
    """The position of column `name` (given as --knob=name) in the header, or a sentence naming the file, the column,
    the columns it has, and the fix."""
    if name in header:
        return header.index(name)
    near = difflib.get_close_matches(name, header, n=1, cutoff=0.6)
    columns = f"{header[:12]}{' ...' if len(header) > 12 else ''}"
    if len(header) == 1 and any(c in header[0] for c in "\t;|"):
        columns += " (one column: the file is not separated by commas; pass --sep=tab, --sep=';' or --sep='|')"
    raise ValueError(f"{shown(path)}: no column {name!r} (--{knob}={name}); its header has {columns}: "
                     + (f"did you mean --{knob}={near[0]}?" if near else f"pass --{knob}=<one of those columns>"))


# the index columns a csv knob fills, so that --keep_cols does not name one of them twice
_CSV_FIELD_KNOBS = {"path": "path_col", "patient_id": "patient_col", "view": "view_col", "age": "age_col",
                    "sex": "sex_col", "text": "text_col"}
_CSV_SPLITS = {"train": "", "val": "val", "valid": "val", "validation": "val", "validate": "val", "test": "test"}
_SEX_CODES = {"m": "M", "male": "M", "f": "F", "female": "F"}


def read_csv_dataset(root, csv="", path_col="path", patient_col="", label_cols="", class_col="", split_col="",
                     view_col="", age_col="", sex_col="", text_col="", keep_cols="", sep="",
                     uncertain_policy="ignore", blank_policy="zeros"):
    """A lab's own data: `csv` (a CSV, or a TSV by its extension or sep), one row per image; root: the folder the
    paths in path_col are relative to ("" -> the CSV's folder; absolute paths must lie inside it too).

    patient_col is required, since splits are by patient; patient_col='none' says the CSV has no patient ids: each
    image is then its own patient, with a warning (one patient's images can land in train and test). Labels come
    from label_cols (comma list; multi-label cells 1/0/-1/blank under uncertain_policy and blank_policy, as CheXpert's;
    labels_raw keeps the codes) or from class_col (one column of class names -> multi-class), never both. split_col
    (train/val/test) gives the splits; else prepare deals patients by --val_frac / --test_frac. view_col, age_col,
    sex_col, text_col fill those index columns; keep_cols (comma list) are kept under their own names in
    {split}_index.csv, where fusion's clinical_columns and text_column read them."""
    check_label_policies(uncertain_policy, blank_policy)
    if not csv:
        raise ValueError("--dataset=csv needs --csv=<your CSV or TSV file, one row per image> (docs/data.md, 'Your own "
                         "data (CSV)')")
    if not Path(csv).is_file():
        raise FileNotFoundError(f"--csv={csv} is not a file: pass the path of your CSV or TSV file")
    image_root = Path(root) if root else Path(csv).parent
    if not image_root.is_dir():
        raise FileNotFoundError(f"--root={root} is not a folder: pass the folder the paths in the CSV's {path_col!r} "
                                f"column are relative to (default: the CSV's folder)")
    label_list = list(dict.fromkeys(c.strip() for c in label_cols.split(",") if c.strip()))
    if not label_list and not class_col:
        raise ValueError("--dataset=csv needs the labels: --label_cols=<comma list of columns with 1/0/-1/blank cells> "
                         "(multi-label) or --class_col=<one column of class names> (multi-class)")
    if label_list and class_col:
        raise ValueError(f"--label_cols={label_cols} and --class_col={class_col} both say where the labels are: pass "
                         f"one (--label_cols: multi-label 1/0/-1/blank columns; --class_col: a column of class names)")
    header, rows = read_csv(csv, sep=_csv_sep(csv, sep))
    if not patient_col:
        raise ValueError(f"--dataset=csv needs --patient_col=<the column of patient ids> (splits are by patient; "
                         f"{shown(csv)} has {header[:12]}); if the CSV has no patient ids, pass --patient_col=none: "
                         f"each image is then its own patient, and one patient's images can land in train and test")
    no_patient = patient_col.lower() == "none"
    keep = list(dict.fromkeys(c.strip() for c in keep_cols.split(",") if c.strip()))
    for name in keep:
        if name in _CSV_FIELD_KNOBS or name in ("row", "study_id", "indication", "split"):
            fix = (f"pass --{_CSV_FIELD_KNOBS[name]}={name} instead" if name in _CSV_FIELD_KNOBS else
                   "rename that column in the CSV")
            raise ValueError(f"--keep_cols={keep_cols}: {name!r} is a column {{split}}_index.csv has already: {fix}")
    col = {knob: _csv_column(csv, header, knob, name) for knob, name in
           (("path_col", path_col), ("patient_col", "" if no_patient else patient_col), ("class_col", class_col),
            ("split_col", split_col), ("view_col", view_col), ("age_col", age_col), ("sex_col", sex_col),
            ("text_col", text_col)) if name}
    ilabels = [_csv_column(csv, header, "label_cols", c) for c in label_list]
    ikeep = [(name, _csv_column(csv, header, "keep_cols", name)) for name in keep]

    def cell(row, knob):  # the stripped cell of the column a knob names; "" when the knob names none
        return row[col[knob]].strip() if knob in col else ""
    records, cells, names, where, missing, split_of = [], [], [], [], [], {}
    for line_no, row in rows:
        rel = cell(row, "path_col")
        if not rel:
            raise ValueError(f"{shown(csv)}:{line_no}: the {path_col!r} cell is empty: every row needs its image's "
                             f"path; fill it or delete the row")
        path = os.path.join(image_root, rel)  # an absolute path stays as it is
        if not os.path.isfile(path):
            missing.append((line_no, rel))
        pid = rel if no_patient else cell(row, "patient_col")
        if not pid:
            raise ValueError(f"{shown(csv)}:{line_no}: the {patient_col!r} cell is empty: fill in the patient id "
                             f"(or pass --patient_col=none if the CSV has no patient ids)")
        hint = ""
        if split_col:
            value = cell(row, "split_col")
            if value.lower() not in _CSV_SPLITS:
                raise ValueError(f"{shown(csv)}:{line_no}: {split_col} is {value!r}; split cells are train, val or "
                                 f"test: fix that cell (or leave --split_col out to split patients by --val_frac / "
                                 f"--test_frac)")
            hint = _CSV_SPLITS[value.lower()]
            first, first_line = split_of.setdefault(pid, (hint, line_no))
            if first != hint:
                raise ValueError(f"{shown(csv)}:{line_no}: patient {pid!r} is in the {hint or 'train'} split here and "
                                 f"in the {first or 'train'} split on line {first_line}: a patient's rows must share "
                                 f"one split (patients never cross splits); fix those {split_col} cells")
        if class_col:
            names.append(cell(row, "class_col"))
            if not names[-1]:
                raise ValueError(f"{shown(csv)}:{line_no}: the {class_col!r} cell is empty: every row needs its class "
                                 f"name; fill it or delete the row")
        else:
            cells.append([row[i].strip() for i in ilabels])
            where.append((csv, line_no))
        sex = cell(row, "sex_col")
        rec = index_record(path, pid, view=cell(row, "view_col"), age=_age(cell(row, "age_col")),
                           sex=_SEX_CODES.get(sex.lower(), sex), text=cell(row, "text_col"), split=hint)
        rec.update((name, row[i].strip()) for name, i in ikeep)
        records.append(rec)
    if missing:
        line_no, rel = missing[0]
        raise ValueError(f"{shown(csv)}:{line_no}: image {rel!r} (column {path_col!r}) is not a file under "
                         f"{image_root} ({len(missing)} of {len(records)} rows name a missing file): fix the paths, "
                         f"or pass --root=<the folder the paths are relative to>")
    policy = dict(csv=str(csv), split=f"column {split_col}" if split_col else "patients dealt by val_frac/test_frac")
    warns = []
    if no_patient:
        warns.append(f"{shown(csv)}: --patient_col=none, so every IMAGE is its own patient and images of one patient "
                     f"can land in both train and test (the test metrics then come out optimistic); pass "
                     f"--patient_col=<column> if the CSV has patient ids")
        warnings.warn(warns[0], stacklevel=2)
    common = dict(patient_id_source="none (--patient_col=none): each image its own patient" if no_patient else
                  f"csv column {patient_col}", root=str(image_root), warnings=warns, extra_columns=keep)
    if class_col:
        classes = sorted(set(names))
        code = {c: j for j, c in enumerate(classes)}
        return Source(records, np.array([code[n] for n in names], np.int64), classes, "multiclass",
                      dict(policy, class_col=class_col), [csv], f"csv:{csv}", **common)
    labels, raw = label_cells(cells, where, label_list, uncertain_policy, blank_policy,
                              kind="--label_cols cells (multi-label)")
    return Source(records, labels, label_list, "multilabel",
                  dict(policy, label_cols=label_list, uncertain=uncertain_policy, blank=blank_policy), [csv],
                  f"csv:{csv}", labels_raw=raw, **common)


# -----------------------------------------------------------------------------
# reader: the phantom (phantom.py makes the pixels; they go through the same split/write path)


def read_phantom(n_images=12000, image_size=64, seed=0, disparity=""):
    g = phantom.generate(n_images, image_size, seed, disparity)
    keys = ("patient_id", "study_id", "view", "age", "sex", "text", "indication")
    records = [index_record(f"phantom/{i:06d}", **{k: r.get(k, "") for k in keys}) for i, r in enumerate(g["records"])]
    policy = dict(generator="phantom.generate", seed=seed, **({"disparity": disparity} if disparity else {}))
    return Source(records, np.asarray(g["labels"], np.float32), list(g["classes"]), "multilabel", policy,
                  [phantom.__file__], f"phantom.generate(n_images={n_images}, image_size={image_size}, seed={seed}"
                  + (f", disparity={disparity!r})" if disparity else ")"),
                  images=np.asarray(g["images"], np.uint8), patient_id_source="generator patient_id")


def check_inside_root(src, root, allow_outside_root=False):
    """Refuse image paths that leave the dataset root ('../../..' in a CSV, an absolute name in a list file): a list
    file should not make prepare read (and copy into the prepared folder) files from elsewhere on the machine.
    The check is on the path as written (os.path.abspath, no symlink resolution), so a symlinked image folder inside
    the root is fine. src.root is the folder the reader joined the listed paths to (the --root otherwise)."""
    base = os.path.abspath(src.root or (root if os.path.isdir(root) else os.path.dirname(os.path.abspath(root))))
    inside = base.rstrip(os.sep) + os.sep
    outside = [r["path"] for r in src.records if not os.path.abspath(r["path"]).startswith(inside)]
    if not outside:
        return
    msg = (f"{len(outside)} image path(s) leave the dataset root {base}, e.g. {os.path.abspath(outside[0])!r}, "
           f"from {', '.join(map(str, src.hash_files)) or 'the reader'}")
    if not allow_outside_root:
        raise ValueError(f"{msg}: fix those rows, or pass --allow_outside_root=True if the images really live there")
    src.warnings.append(f"{msg} (read because --allow_outside_root=True)")


def read_dataset(cfg):
    name, root = cfg["dataset"], cfg["root"]
    if name == "phantom":
        return read_phantom(cfg["n_images"], cfg["image_size"], cfg["seed"], cfg.get("phantom_disparity", ""))
    readers = dict(chexpert=read_chexpert, nih=read_nih, vinbigdata=read_vinbigdata, folder=read_folder,
                   covidx=read_covidx, roco=read_roco, rocov2=read_rocov2, mimic_cxr=read_mimic_cxr,
                   csv=read_csv_dataset)
    if name not in readers:
        raise ValueError(f"--dataset={name}: unknown; choose one of phantom, {', '.join(readers)}")
    if not root and name != "csv":  # csv: the image root defaults to the CSV's folder
        raise ValueError(f"--dataset={name} needs --root=<the raw dataset folder>")
    src = readers[name](root, **{k: cfg[k] for k in READER_KNOBS[name]})
    check_inside_root(src, root, cfg.get("allow_outside_root", False))
    return src


# -----------------------------------------------------------------------------
# image decoding: any PNG/JPEG mode or DICOM -> grayscale uint8 square


def _rescale_u8(a, lo=None, hi=None):
    a = a.astype(np.float32)
    finite = np.isfinite(a)
    if not finite.all():  # one NaN or inf would make the min-max scaling (and so the whole image) zero
        raise ValueError(f"{a.size - int(finite.sum())} of {a.size} pixel values are NaN or infinite")
    lo = float(a.min()) if lo is None else lo
    hi = float(a.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _read_dicom(path):
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ImportError(f"{path}: reading DICOM needs pydicom: pip install pydicom "
                          f"(or convert the images to PNG first)") from None
    ds = pydicom.dcmread(path)
    a = ds.pixel_array  # compressed transfer syntaxes may need pylibjpeg/gdcm; pydicom says which
    photometric = str(ds.get("PhotometricInterpretation", ""))
    # the look-up tables an image may carry (DICOM PS3.3 C.7.6.3.1.5, C.11.1, C.11.2), any of which may invert it:
    # PALETTE COLOR pixels are indices into red/green/blue tables; a Modality LUT table replaces slope/intercept
    palette = photometric == "PALETTE COLOR"
    modality_table = not palette and "ModalityLUTSequence" in ds
    if palette:
        a = apply_color_lut(a, ds)
    elif modality_table:
        a = apply_modality_lut(a, ds)
    a = a.astype(np.float32)
    color = palette or int(ds.get("SamplesPerPixel", 1)) == 3
    if a.ndim == (4 if color else 3):
        a = a[0]  # the first frame
    if color:
        a = a.mean(-1)
    if not palette and not modality_table:
        a = a * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    lo = hi = None
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if not palette and center is not None and width is not None:
        first = lambda v: float(v[0]) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else float(v)
        c, w = first(center), first(width)
        if w > 1:
            lo, hi = c - w / 2, c + w / 2
    elif not palette and "VOILUTSequence" in ds:  # without a window: the VOI table (its input: integer values)
        a = apply_voi_lut(np.rint(a).astype(np.int64), ds, prefer_lut=True).astype(np.float32)
    u8 = _rescale_u8(a, lo, hi)
    if photometric == "MONOCHROME1":
        u8 = 255 - u8  # MONOCHROME1: high values are dark; flip so that bone is bright in every image
    return u8


def _is_dicom(path):
    """A DICOM file by its content, 'DICM' after the 128-byte preamble (PS3.10 7.1): a PACS export often names its
    files IM0001 or by their UID (1.2.840.113619...), without .dcm."""
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def load_gray(path, draft_size=None):
    """Full-resolution grayscale uint8 (H, W). 16-bit/int/float images are min-max scaled: their data often
    spans 12 bits, so dividing by 65535 would make them nearly black."""
    suffix = Path(path).suffix.lower()
    if suffix in (".dcm", ".dicom") or suffix not in IMAGE_EXTS and _is_dicom(path):
        return _read_dicom(path)
    with Image.open(path, formats=IMAGE_FORMATS) as img:
        if draft_size and img.format == "JPEG":
            img.draft("L", (draft_size, draft_size))  # DCT-domain downscale: decode at >= the needed size, ~4x faster
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return _rescale_u8(np.asarray(img))
        if img.mode not in ("L", "RGB", "RGBA", "LA", "P", "1"):
            img = img.convert("RGB")
        return np.asarray(img if img.mode == "L" else img.convert("L"))


def resize_square(a, image_size, resize_mode="pad"):
    """Keep the aspect ratio: 'pad' fits the long side and pads black, 'center_crop' fits the short side."""
    h, w = a.shape
    if resize_mode not in ("pad", "center_crop"):
        raise ValueError(f"resize_mode={resize_mode!r} must be 'pad' or 'center_crop'")
    s = image_size / (max(h, w) if resize_mode == "pad" else min(h, w))
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if (nh, nw) != (h, w):
        a = np.asarray(Image.fromarray(a).resize((nw, nh), Image.BILINEAR))  # PIL filters (antialiases) on downscale
    if resize_mode == "pad":
        out = np.zeros((image_size, image_size), np.uint8)
        top, left = (image_size - nh) // 2, (image_size - nw) // 2
        out[top:top + nh, left:left + nw] = a
        return out
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    return np.ascontiguousarray(a[top:top + image_size, left:left + image_size])


def decode_image(path, image_size, resize_mode="pad"):
    return resize_square(load_gray(path, draft_size=image_size), image_size, resize_mode)


# -----------------------------------------------------------------------------
# reader: ROCOv2 (Rückert et al. 2024): {train,valid,test}_captions.csv (ID,Caption), {split}_concepts.csv
# (ID,CUIs with ';' between UMLS CUIs; *_concepts_manual.csv holds the manually checked ones), images
# {split}/<ID>.jpg, cui_mapping.csv (CUI,Canonical name) when present. Labels: the image modality CUIs (always
# classes) + the ROCOV2_TOP_K most frequent other CUIs of the train split, 1/0 (the concept lists are complete).

ROCOV2_TOP_K = 20
ROCOV2_MODALITIES = {"C0040405": "Computed Tomography", "C1306645": "Plain X-Ray", "C0024485": "Magnetic Resonance Imaging",
                     "C0041618": "Ultrasonography", "C0002978": "Angiogram", "C0032743": "Positron-Emission Tomography"}


def _rocov2_csv(path, value, key="ID"):
    """{key: value column} of one ROCOv2 csv (header <key>,<value>)."""
    return {r[key].strip(): r[value].strip() for _, r in read_csv_dicts(path, [key, value])}


def read_rocov2(root, top_k=ROCOV2_TOP_K, concepts="concepts"):
    """concepts: 'concepts' (all CUIs) or 'concepts_manual' (the manually validated ones) as the label source."""
    root = Path(root)
    records, cuis, files = [], [], []
    for name, hint in (("train", ""), ("valid", "val"), ("test", "test")):
        cap_path = root / f"{name}_captions.csv"
        if not cap_path.is_file():
            continue
        captions = _rocov2_csv(cap_path, "Caption")
        con_path = root / f"{name}_{concepts}.csv"
        con = _rocov2_csv(con_path, "CUIs") if con_path.is_file() else {}
        files += [cap_path] + ([con_path] if con else [])
        for roco_id, caption in captions.items():
            records.append(index_record(root / name / f"{roco_id}.jpg", roco_id, roco_id, text=caption, split=hint))
            cuis.append({c.strip() for c in con.get(roco_id, "").split(";") if c.strip()})
    if not records:
        raise FileNotFoundError(f"no {{train,valid,test}}_captions.csv under {root} (the ROCOv2 release layout)")
    train_counts = {}
    for r, cs in zip(records, cuis):
        for c in cs:
            if r["split"] == "" and c not in ROCOV2_MODALITIES:
                train_counts[c] = train_counts.get(c, 0) + 1
    top = sorted(train_counts, key=lambda c: (-train_counts[c], c))[:top_k]
    classes = [c for c in ROCOV2_MODALITIES if any(c in cs for cs in cuis)] + top
    names = dict(ROCOV2_MODALITIES)
    if (root / "cui_mapping.csv").is_file():
        names.update(_rocov2_csv(root / "cui_mapping.csv", "Canonical name", key="CUI"))
    labels = np.array([[float(c in cs) for c in classes] for cs in cuis], np.float32).reshape(len(records), len(classes))
    return Source(records, labels, [names.get(c, c) for c in classes], "multilabel",
                  dict(labels=f"UMLS concepts ({concepts}.csv): modality CUIs + the {top_k} most frequent train CUIs",
                       cuis=classes), files, f"rocov2:{root}")


READER_KNOBS["rocov2"] = []  # fixed reader defaults (ROCOV2_TOP_K, all concepts)
