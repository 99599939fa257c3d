"""The MIMIC-CXR-JPG reader (issue 17) on a fixture in the exact PhysioNet layout: mimic-cxr-2.0.0-*.csv.gz with the
real column names, files/pXX/p<subject>/s<study>/<dicom_id>.jpg, reports s<study>.txt, MIMIC-IV hosp/patients.csv.gz
and MIMIC-IV-ED ed/{edstays,triage}.csv.gz."""

import csv
import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import readers  # noqa: E402

LABEL_COLS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
              "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
              "Pneumothorax", "Support Devices"]  # the order of mimic-cxr-2.0.0-chexpert.csv
META_COLS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
             "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
             "PatientOrientationCodeSequence_CodeMeaning"]
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection {k}

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities {k}.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def _gz(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def mimic_fixture(tmp_path, n_subjects=10):
    rng = np.random.default_rng(0)
    root = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    meta, split, chex, negbio, pats, stays, tri, expected = [], [], [], [], [], [], [], {}
    for k in range(n_subjects):
        subject = str(10000032 + 1111 * k)
        sp = "train" if k < 6 else "validate" if k < 8 else "test"
        pats.append([subject, "F" if k % 2 else "M", 40 + k, 2180, "2014 - 2016", ""])
        for j in range(2):
            study = str(50000000 + 100 * k + j)
            date, time_ = f"2180{j + 5:02d}{10 + k:02d}", f"{10 + j:02d}3014.531"
            cells = list(rng.choice(["1.0", "0.0", "-1.0", ""], 14))
            chex.append([subject, study] + cells)
            negbio.append([subject, study] + ["0.0"] * 14)
            stay = str(30000000 + 10 * k + j)
            if j == 0:  # the first study of each subject happens during an ED stay
                stays.append([subject, "", stay, f"2180-{j + 5:02d}-{10 + k:02d} 08:00:00",
                              f"2180-{j + 5:02d}-{10 + k:02d} 18:00:00", "F", "WHITE", "WALK IN", "ADMITTED"])
                tri.append([subject, stay, 98.6, 80 + k, 18, 97, 120, 80, 3, 2, "Dyspnea"])
            for view, vp in ((1, "PA"), (2, "LATERAL")):
                dicom = f"{k:08x}-{j:08x}-{view:08x}-0000000{view}-00000000"
                meta.append([dicom, subject, study, "CHEST (PA AND LAT)", vp, 30, 24, date, time_, "CHEST (PA AND LAT)",
                             "postero-anterior" if vp == "PA" else "lateral", "Erect"])
                split.append([dicom, study, subject, sp])
                img = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
                img.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(20, 230, (24, 30), dtype=np.uint8)).save(img, format="JPEG")
                expected[str(img)] = dict(subject=subject, study=study, cells=cells, split=sp, vp=vp, k=k, j=j)
            (root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt").write_text(REPORT.format(k=k))
    _gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", META_COLS, meta)
    _gz(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split)
    _gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + LABEL_COLS, chex)
    _gz(root / "mimic-cxr-2.0.0-negbio.csv.gz", ["subject_id", "study_id"] + LABEL_COLS, negbio)
    _gz(root / "hosp" / "patients.csv.gz", ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group",
                                            "dod"], pats)
    _gz(root / "ed" / "edstays.csv.gz", ["subject_id", "hadm_id", "stay_id", "intime", "outtime", "gender", "race",
                                         "arrival_transport", "disposition"], stays)
    _gz(root / "ed" / "triage.csv.gz", ["subject_id", "stay_id", "temperature", "heartrate", "resprate", "o2sat", "sbp",
                                        "dbp", "pain", "acuity", "chiefcomplaint"], tri)
    return root, expected


def test_mimic_prepares_with_report_clinical_columns_and_official_split(tmp_path):
    root, expected = mimic_fixture(tmp_path)
    out = tmp_path / "out"
    meta = data.prepare(dict(dataset="mimic_cxr", root=str(root), out_dir=str(out), image_size=8, num_workers=1,
                             uncertain_policy="ones"))
    assert meta["raw_labels"] is True and meta["patient_id_source"] == "subject_id"
    for c in ("indication", "text", "age", "sex", "view", "findings", "impression") + tuple(readers.MIMIC_TRIAGE):
        assert c in meta["index_columns"], c
    subjects = {}
    for s in data.SPLITS:
        sp = data.PreparedSplit(out, s)
        subjects[s] = {r["patient_id"] for r in sp.index}
        for r, raw in zip(sp.index, sp.labels_raw):
            e = expected[r["path"]]
            assert r["patient_id"] == e["subject"] and r["study_id"] == f"s{e['study']}" and r["view"] == e["vp"]
            assert {"train": "train", "validate": "val", "test": "test"}[e["split"]] == s
            want = np.array([float(c) if c else np.nan for c in e["cells"]], np.float32)
            np.testing.assert_array_equal(raw, want[[LABEL_COLS.index(c) for c in readers.CHEXPERT_CLASSES]])
            assert r["indication"] == f"___F with new onset ascites // eval for infection {e['k']}"
            assert r["findings"].startswith("There is no focal consolidation") and r["findings"].endswith(f"{e['k']}.")
            assert r["impression"] == "No acute cardiopulmonary process."
            assert r["text"] == f"FINDINGS: {r['findings']} IMPRESSION: {r['impression']}"
            assert r["age"] == str(40 + e["k"]) and r["sex"] == ("F" if e["k"] % 2 else "M")
            if e["j"] == 0:  # inside the ED stay: its triage row
                assert r["heartrate"] == str(80 + e["k"]) and r["chiefcomplaint"] == "Dyspnea" and r["acuity"] == "2"
            else:
                assert r["heartrate"] == "" and r["chiefcomplaint"] == ""
    assert len(subjects["train"]) == 6 and len(subjects["val"]) == 2 and len(subjects["test"]) == 2
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"]) \
        and not (subjects["val"] & subjects["test"])


def test_mimic_views_labeler_and_split_errors(tmp_path):
    root, expected = mimic_fixture(tmp_path, n_subjects=4)
    src = readers.read_mimic_cxr(root, views="frontal")
    assert len(src.records) == 8 and {r["view"] for r in src.records} == {"PA"}
    assert (readers.read_mimic_cxr(root, mimic_labeler="negbio").labels_raw == 0).all()
    with pytest.raises(ValueError, match="mimic_labeler"):
        readers.read_mimic_cxr(root, mimic_labeler="chexbert")
    # a subject in two official splits
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "rt") as f:
        rows = list(csv.reader(f))
    rows[1][3] = "test"
    _gz(root / "mimic-cxr-2.0.0-split.csv.gz", rows[0], rows[1:])
    with pytest.raises(ValueError, match="two official splits.*official_split=False"):
        readers.read_mimic_cxr(root)
    assert len(readers.read_mimic_cxr(root, official_split=False).records) == 16
    (root / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.csv.gz"):
        readers.read_mimic_cxr(root)
