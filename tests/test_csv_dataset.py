"""Issue 34, "Your own data": `python data.py --dataset=csv` reads a lab's own CSV or TSV (one row per image) and an
image root. Two tiny labs in tmp_path: a multi-label CSV (1 / 0 / -1 / blank cells; PNG, JPEG, TIFF and two DICOMs
written here with pydicom, one named without .dcm; an official split column; clinical columns kept for fusion) and a
multi-class TSV (a class-name column, the patient-level random split); each is prepared, trained 2 steps with
train.main and scored on its test split with evaluate.main. A CSV without a patient column is refused unless
--patient_col=none says so (then the leakage warning); every other mistake is one sentence naming file:line or the
column, and the fix."""

import re
import sys

import numpy as np
import pytest
from PIL import Image

import configurator
import data
import evaluate
import fusion
import readers
import train

TINY = ["--model=convnext_atto", "--image_size=32", "--batch_size=4", "--eval_batch_size=64", "--log_interval=1",
        "--tensorboard=False", "--warmup_iters=1", "--max_iters=2", "--eval_interval=2", "--lr_decay_iters=2"]
EVAL = ["--split=test", "--n_bootstrap=0", "--figures=False", "--tensorboard=False", "--device=cpu",
        "--model_card=False"]
HEADER = ["image", "patient", "Effusion", "Nodule", "split", "view", "age", "sex", "report", "heart_rate", "smoker"]
LAB_KNOBS = ["--path_col=image", "--patient_col=patient", "--label_cols=Effusion,Nodule", "--split_col=split",
             "--view_col=view", "--age_col=age", "--sex_col=sex", "--text_col=report", "--keep_cols=heart_rate,smoker"]


def write_dicom(path, a):
    """A 12-bit MONOCHROME2 DICOM of the uint8 array a (scaled by 16), as a scanner's export would hold it."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = a.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (a.astype(np.uint16) * 16).tobytes()
    ds.save_as(str(path))


def write_image(path, bright):
    """A 40 x 48 grayscale image (not square: prepare pads it) with a bright box where the finding is."""
    a = np.full((40, 48), 30, np.uint8)
    a[10:30, 12:36] = 220 if bright else 90
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".dcm", ""):
        write_dicom(path, a)
    else:
        Image.fromarray(a).save(path)


def lab_rows():
    """24 rows, 12 patients with 2 images each: p00-p07 train, p08-p09 val, p10-p11 test; each split holds positives
    and negatives of both findings, and -1 and blank cells."""
    rows = []
    for k in range(12):
        split = "train" if k < 8 else "val" if k < 10 else "test"
        for part, effusion, nodule in (("a", "1" if k % 2 == 0 else "0", "0" if k % 2 == 0 else "1"),
                                       ("b", ["", "-1", "0"][k % 3], ["1.0", "", "0.0", "-1.0"][k % 4])):
            ext = {(0, "a"): ".dcm", (1, "b"): ""}.get((k, part), [".png", ".jpg", ".tif"][(2 * k + (part == "b")) % 3])
            rows.append([f"images/p{k:02d}_{part}{ext}", f"p{k:02d}", effusion, nodule, split, ["PA", "AP"][k % 2],
                         f"{50 + k:03d}Y", ["Male", "F"][k % 2], "effusion" if effusion == "1" else "clear",
                         str(60 + k), ["yes", "no"][k % 2]])
    return rows


def write_table(path, header, rows, sep=","):
    path.write_text("".join(sep.join(r) + "\n" for r in [header, *rows]))
    return path


def write_lab(root, rows=None, name="labels.csv", sep=","):
    """The images of lab_rows() under root and a table of `rows` (lab_rows() unless given); -> the table's path."""
    for row in lab_rows():
        write_image(root / row[0], row[2] == "1")
    return write_table(root / name, HEADER, lab_rows() if rows is None else rows, sep)


def test_multilabel_csv_with_dicom_prepares_trains_and_evaluates(tmp_path):
    path = write_lab(tmp_path / "lab")
    out = tmp_path / "data" / "lab"
    meta = data.main(["--dataset=csv", f"--csv={path}", *LAB_KNOBS, "--image_size=32", f"--out_dir={out}",
                      "--num_workers=1"])
    assert meta["task"] == "multilabel" and meta["classes"] == ["Effusion", "Nodule"] and meta["raw_labels"]
    assert meta["splits"] == {"train": 16, "val": 4, "test": 4}  # the split column, as written
    assert meta["patient_id_source"] == "csv column patient" and not meta["warnings"]
    splits = {s: data.PreparedSplit(out, s) for s in data.SPLITS}
    assert {r["patient_id"] for r in splits["test"].index} == {"p10", "p11"}
    raw = np.concatenate([splits[s].labels_raw for s in data.SPLITS])
    y = np.concatenate([splits[s].labels for s in data.SPLITS])
    assert (raw == -1).sum() == 7 and np.isnan(raw).sum() == 7  # the -1 and blank cells of lab_rows
    assert np.isnan(y[raw == -1]).all() and (y[np.isnan(raw)] == 0).all()  # uncertain: ignore, blank: zeros
    index = splits["train"].index
    assert meta["index_columns"][-2:] == ["heart_rate", "smoker"] and list(index[0])[-2:] == ["heart_rate", "smoker"]
    row = next(r for r in index if r["path"].endswith("p00_a.dcm"))
    assert (row["view"], row["age"], row["sex"], row["text"], row["heart_rate"], row["smoker"]) == \
        ("PA", "50", "M", "effusion", "60", "yes")
    dicom = splits["train"].images[int(row["row"])]
    assert dicom.max() > 200 and dicom[16, 16] > dicom[16, 4] + 100  # the bright box decoded, not a blank image
    row = next(r for r in index if r["path"].endswith("p01_b"))  # a DICOM named without .dcm, as PACS exports are
    assert splits["train"].images[int(row["row"])].max() > 80
    spec = fusion.clinical_spec(index, "age,sex,view,heart_rate,smoker")  # fusion reads the kept columns by name
    assert np.isfinite(fusion.clinical_features(splits["test"].index, spec)).all()

    train.main([f"--data_dir={out}", f"--out_dir={tmp_path / 'run'}", *TINY])
    rep = evaluate.main([f"--ckpt={tmp_path / 'run' / 'best.pt'}", *EVAL])
    assert set(rep["auc"]) == {"Effusion", "Nodule"} and 0 <= rep["auc_macro"] <= 1


def test_multiclass_tsv_with_a_class_column_prepares_trains_and_evaluates(tmp_path):
    root = tmp_path / "lab"
    rows = [[f"scans/{i:02d}.{'png' if i % 2 else 'jpg'}", f"s{i // 2:02d}", ["normal", "pneumonia"][i % 4 < 2]]
            for i in range(32)]
    for r in rows:
        write_image(root / r[0], r[2] == "pneumonia")
    path = write_table(root / "cases.tsv", ["file", "subject", "diagnosis"], rows, sep="\t")  # a TSV by its extension
    out = tmp_path / "data" / "cases"
    meta = data.main(["--dataset=csv", f"--csv={path}", "--path_col=file", "--patient_col=subject",
                      "--class_col=diagnosis", "--val_frac=0.25", "--test_frac=0.25", "--image_size=32",
                      f"--out_dir={out}", "--num_workers=1"])
    assert meta["task"] == "multiclass" and meta["classes"] == ["normal", "pneumonia"]
    assert sum(meta["splits"].values()) == 32 and all(meta["pos_counts"]["test"].values())
    assert data.PreparedSplit(out, "test").labels.dtype == np.int64
    patients = [{r["patient_id"] for r in data.PreparedSplit(out, s).index} for s in data.SPLITS]
    assert sum(map(len, patients)) == len(set.union(*patients)) == 16  # each patient in one split

    train.main([f"--data_dir={out}", f"--out_dir={tmp_path / 'run'}", *TINY])
    rep = evaluate.main([f"--ckpt={tmp_path / 'run' / 'best.pt'}", *EVAL])
    assert set(rep["auc"]) == {"normal", "pneumonia"}


def test_a_csv_without_patient_column_is_refused_unless_none_is_said(tmp_path, monkeypatch, capsys):
    path = write_lab(tmp_path / "lab")
    argv = ["--dataset=csv", f"--csv={path}", "--path_col=image", "--label_cols=Effusion,Nodule", "--image_size=32",
            f"--out_dir={tmp_path / 'out'}", "--num_workers=1"]
    monkeypatch.setattr(sys, "argv", ["data.py", *argv])
    with pytest.raises(SystemExit) as e:
        configurator.cli(data.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --dataset=csv needs --patient_col="), err
    assert "--patient_col=none" in err[0] and "'patient'" in err[0]  # names the fix and the columns there are

    with pytest.warns(UserWarning, match="every IMAGE is its own patient"):
        meta = data.main([*argv, "--patient_col=none"])
    assert meta["patient_id_source"].startswith("none") and "its own patient" in meta["warnings"][0]
    assert "WARNING: " in capsys.readouterr().out
    index = [r for s in data.SPLITS for r in data.PreparedSplit(tmp_path / "out", s).index]
    assert len({r["patient_id"] for r in index}) == 24  # one per image


def _edit(rows, line, column, value):
    """rows with the cell at file line `line` (the header is line 1) and HEADER column `column` set to value."""
    rows[line - 2][HEADER.index(column)] = value
    return rows


MISTAKES = {  # case: (knobs over LAB_KNOBS, edited rows or None, the sentence as a regex; {csv} = the file)
    "missing column": (dict(path_col="file"), None,
                       r"{csv}: no column 'file' \(--path_col=file\); its header has \['image', .*: pass "
                       r"--path_col=<one of those columns>"),
    "misspelt label column": (dict(label_cols="Effusion,Nodle"), None,
                              r"no column 'Nodle' \(--label_cols=Nodle\); .*did you mean --label_cols=Nodule\?"),
    "missing image": ({}, lambda r: _edit(r, 4, "image", "images/nope.png"),
                      r"{csv}:4: image 'images/nope.png' \(column 'image'\) is not a file under .*lab \(1 of 24 rows "
                      r"name a missing file\): fix the paths, or pass --root="),
    "bad label cell": ({}, lambda r: _edit(r, 3, "Effusion", "yes"),
                       r"{csv}:3: Effusion is 'yes'; --label_cols cells \(multi-label\) are 1.0, 0.0, -1.0 "
                       r"\(uncertain\) or blank: fix that cell \(1 such cells\)"),
    "no labels": (dict(label_cols=""), None, r"--dataset=csv needs the labels: --label_cols=.* or --class_col="),
    "both label kinds": (dict(class_col="view"), None, r"--label_cols=Effusion,Nodule and --class_col=view both say "
                                                       r"where the labels are: pass one"),
    "bad split cell": ({}, lambda r: _edit(r, 2, "split", "training"),
                       r"{csv}:2: split is 'training'; split cells are train, val or test: fix that cell"),
    "patient in two splits": ({}, lambda r: _edit(r, 3, "split", "test"),
                              r"{csv}:3: patient 'p00' is in the test split here and in the train split on line 2"),
    "empty patient cell": ({}, lambda r: _edit(r, 5, "patient", ""),
                           r"{csv}:5: the 'patient' cell is empty: fill in the patient id \(or pass "
                           r"--patient_col=none"),
    "kept column clash": (dict(keep_cols="heart_rate,age"), None,
                          r"--keep_cols=heart_rate,age: 'age' is a column \{{split\}}_index.csv has already: pass "
                          r"--age_col=age instead"),
    "tabs in a .csv": (dict(sep=""), "tsv", r"one column: the file is not separated by commas; pass --sep=tab"),
    "bad sep": (dict(sep=";;"), None, r"--sep=';;' must be one character"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_each_mistake_is_one_sentence_with_its_place_and_fix(tmp_path, case):
    knobs, edit, pattern = MISTAKES[case]
    if edit == "tsv":
        path = write_lab(tmp_path / "lab", sep="\t")
    else:
        path = write_lab(tmp_path / "lab", edit(lab_rows()) if edit else None)
    cfg = dict(arg.lstrip("-").split("=", 1) for arg in LAB_KNOBS)
    cfg.update(knobs, csv=str(path))
    with pytest.raises(ValueError, match=pattern.format(csv=re.escape(str(path)))):
        readers.read_csv_dataset("", **cfg)


def test_label_cells_follow_the_chexpert_policies(tmp_path):
    path = write_lab(tmp_path / "lab", name="labels.txt", sep="|")
    cfg = dict(arg.lstrip("-").split("=", 1) for arg in LAB_KNOBS)
    src = readers.read_csv_dataset(str(tmp_path / "lab"), csv=str(path), sep="|", uncertain_policy="ones",
                                   blank_policy="ignore", **cfg)
    raw, y = src.labels_raw, src.labels
    assert (y[raw == -1] == 1).all() and np.isnan(y[np.isnan(raw)]).all()
    assert np.array_equal(y[np.isfinite(raw) & (raw != -1)], raw[np.isfinite(raw) & (raw != -1)])
    assert src.label_policy["uncertain"] == "ones" and src.label_policy["blank"] == "ignore"
    with pytest.raises(ValueError, match=r"uncertain_policy='maybe' must be one of \['ignore', 'zeros', 'ones'\]"):
        readers.read_csv_dataset("", csv=str(path), sep="|", uncertain_policy="maybe", **cfg)
