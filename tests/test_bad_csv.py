"""Hand-made and damaged dataset CSVs (issue 31): every reader opens its CSV / list files through readers.read_csv /
read_lines, so an Excel BOM reads as if it were not there, and a latin-1 byte, a row cut short, an empty or
header-only file, a bad VinBigData class_id and a non-UTF-8 folder name each get one sentence naming file:line and
the fix. Tiny files in tmp_path, no images (the readers do not open them); each case well under a second."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import readers  # noqa: E402

CHEX_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + readers.CHEXPERT_CLASSES
CHEX_ROWS = [["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP", "1.0"]
             + [""] * 12 + ["0.0"],
             ["CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", "Male", "70", "Frontal", "PA", ""]
             + ["-1.0"] * 13]
NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position"]
NIH_ROWS = [["00000001_000.png", "Cardiomegaly", "0", "1", "58", "M", "PA"],
            ["00000002_000.png", "No Finding", "0", "2", "81", "F", "AP"]]
VIN_HEADER = ["image_id", "class_name", "class_id", "rad_id"]
VIN_ROWS = [["a", "No finding", "14", "R1"], ["b", "Cardiomegaly", "3", "R2"]]


def csv_text(header, rows):
    return "".join(",".join(r) + "\r\n" for r in [header, *rows])  # \r\n as Excel and the csv module write


def _dataset(name, reader):
    """(root, text, encoding) -> (the CSV written where the reader looks for it, a call of the reader)."""
    def make(root, text, encoding="utf-8"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode(encoding))
        return path, lambda: reader(root)
    return make


chexpert = _dataset("CheXpert-v1.0-small/train.csv", readers.read_chexpert)
nih = _dataset("Data_Entry_2017_v2020.csv", readers.read_nih)
vinbigdata = _dataset("train.csv", readers.read_vinbigdata)
rocov2 = _dataset("train_captions.csv", readers.read_rocov2)
covidx = _dataset("train.txt", readers.read_covidx)


CASES = {"chexpert": (chexpert, csv_text(CHEX_HEADER, CHEX_ROWS)), "nih": (nih, csv_text(NIH_HEADER, NIH_ROWS)),
         "vinbigdata": (vinbigdata, csv_text(VIN_HEADER, VIN_ROWS)),
         "rocov2": (rocov2, csv_text(["ID", "Caption"], [["ROCOv2_1", "chest CT"], ["ROCOv2_2", "hand X-ray"]])),
         "covidx": (covidx, "p1 a.png positive sirm\np2 b.png negative rsna\n")}


@pytest.mark.parametrize("name", list(CASES))
def test_excel_bom_reads_like_plain_utf8(tmp_path, name):
    """Excel's 'CSV UTF-8' starts with EF BB BF: before, the first column was named '\\ufeffPath' ("missing CheXpert
    columns ['Path']"; ROCOv2: "expected the header 'ID,Caption'"; COVIDx: patient '\\ufeffp1')."""
    make, text = CASES[name]
    _, plain = make(tmp_path / "plain", text)
    _, bom = make(tmp_path / "bom", text, "utf-8-sig")
    a, b = plain(), bom()
    assert [r["patient_id"] for r in a.records] == [r["patient_id"] for r in b.records] and len(a.records) == 2
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("name", list(CASES))
def test_latin1_byte_names_file_line_and_byte(tmp_path, name):
    """A latin-1 'é' on line 3 (2 of COVIDx's list): before, a bare UnicodeDecodeError naming neither file nor line."""
    make, text = CASES[name]
    lines = text.splitlines(keepends=True)
    k = 1 if name == "covidx" else 2
    lines[k] = lines[k].replace("a", "é", 1).replace("2", "é", 1)
    path, read = make(tmp_path, "".join(lines), "latin-1")
    with pytest.raises(ValueError, match=rf"{path}:{k + 1}: byte \d+ \(0xe9\) is not UTF-8 .*'CSV UTF-8'"):
        read()


@pytest.mark.parametrize("name", ["chexpert", "nih", "vinbigdata", "rocov2"])
def test_short_last_row_names_its_line_and_field_counts(tmp_path, name):
    """A last row cut short (a copy that stopped mid-line): before, IndexError / TypeError / a silently blank cell."""
    make, text = CASES[name]
    lines = text.splitlines(keepends=True)
    n = lines[-1].count(",") + 1
    lines[-1] = ",".join(lines[-1].split(",")[:n - 1 if name == "rocov2" else 3]) + "\r\n"
    path, read = make(tmp_path, "".join(lines))
    with pytest.raises(ValueError, match=rf"{path}:3 has {1 if name == 'rocov2' else 3} fields, the header has {n}: "
                                         rf"the file is cut short"):
        read()


@pytest.mark.parametrize("name", ["chexpert", "nih", "vinbigdata", "rocov2"])
def test_empty_and_header_only_csv_are_named(tmp_path, name):
    """A zero-byte file and a header-only file: before, StopIteration (CheXpert, NIH), or an empty data set whose
    advice later pointed at the split fractions (VinBigData, ROCOv2)."""
    make, text = CASES[name]
    path, read = make(tmp_path / "empty", "")
    with pytest.raises(ValueError, match=rf"{path} is empty \(no header line\).*fetch or save the file again"):
        read()
    path, read = make(tmp_path / "header", text.splitlines(keepends=True)[0])
    with pytest.raises(ValueError, match=rf"{path} has a header but no rows.*fetch or save the file again"):
        read()


def test_vinbigdata_without_class_id_or_with_a_word_for_it(tmp_path):
    """Before: KeyError 'class_id' (a traceback) and "invalid literal for int() with base 10: 'three'"."""
    path, read = vinbigdata(tmp_path / "nocol", csv_text(["image_id", "class_name", "rad_id"], [["a", "Nodule", "R1"]]))
    with pytest.raises(ValueError, match=rf"{path}:1: the header lacks the column\(s\) \['class_id'\]"):
        read()
    path, read = vinbigdata(tmp_path / "word", csv_text(VIN_HEADER, VIN_ROWS + [["c", "Nodule", "three", "R3"]]))
    with pytest.raises(ValueError, match=rf"{path}:4: class_id 'three' is not a class number .*fix that cell"):
        read()


def test_non_utf8_folder_name_reads_and_is_named_with_repr(tmp_path):
    """A folder whose name is not UTF-8 (bytes b'\\xff' from an old archive): the files in it read, and an error
    about one names it with repr() (the surrogate os.fsdecode keeps, '\\udcff'), never raw or as a crash."""
    folder = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9-\xff")
    path, read = vinbigdata(Path(folder), csv_text(VIN_HEADER, VIN_ROWS))
    assert [r["patient_id"] for r in read().records] == ["a", "b"]
    path.write_text(csv_text(VIN_HEADER, VIN_ROWS + [["c", "Nodule"]]))
    with pytest.raises(ValueError) as e:
        read()
    assert f"{repr(str(path))}:4 has 2 fields" in str(e.value) and "\\udcff" in str(e.value)
    str(e.value).encode("utf-8")  # printable on any terminal: the sentence itself holds no surrogate


def test_cut_gzip_and_overlong_field_are_named(tmp_path):
    """A .gz download cut short (before: EOFError, a traceback) and a field past the csv module's limit (before:
    _csv.Error without the file): each a sentence naming the file and its line."""
    import gzip
    rows = [[f"{i:08d}_000.png", "No Finding", "0", str(i), "50", "M", "PA"] for i in range(2000)]
    packed = gzip.compress(csv_text(NIH_HEADER, rows).encode())
    root = tmp_path / "gz"
    root.mkdir()
    (root / "Data_Entry_2017_v2020.csv.gz").write_bytes(packed[:len(packed) // 2])
    with pytest.raises(ValueError, match=r"Data_Entry_2017_v2020\.csv\.gz cannot be read at line \d+ \(EOFError: .*"
                                         r"cut short; fetch the file again"):
        readers.read_nih(root)
    path, read = nih(tmp_path / "long", csv_text(NIH_HEADER, NIH_ROWS + [["x.png", "A" * 200_000] + ["1"] * 5]))
    with pytest.raises(ValueError, match=rf"{path}:4: field larger than field limit .*fix that line"):
        read()


@pytest.mark.parametrize("cell", ["yes", "2.0"])
def test_chexpert_bad_label_cell_names_its_file_and_line(tmp_path, cell):
    """A label cell that is not 1.0 / 0.0 / -1.0 / blank in valid.csv: before, the sentence named train.csv and no
    line; now the file, the line, the column and the cell."""
    _, read = chexpert(tmp_path, csv_text(CHEX_HEADER, CHEX_ROWS))
    valid = [["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Male", "73", "Frontal", "AP"]
             + ["0.0"] * 14] * 2
    valid[1] = valid[1][:7] + [cell] + valid[1][8:]
    path = tmp_path / "CheXpert-v1.0-small" / "valid.csv"
    path.write_text(csv_text(CHEX_HEADER, valid))
    with pytest.raises(ValueError, match=rf"{path}:3: Cardiomegaly is '{cell}'; CheXpert label cells are 1.0, 0.0, "
                                         rf"-1.0 \(uncertain\) or blank: fix that cell"):
        read()
