"""Hostile and odd images (issue 31): serve.py's upload decoding (a DICOM deflate bomb, huge declared DICOM sizes,
formats outside PNG / JPEG / DICOM), its checkpoint flags, and readers.py's decoding shared with prepare (DICOM
look-up tables, float images with NaN / inf pixels). Tiny inputs, in-process; each case well under a second except
the bomb (~0.5 s to build 100 MB of deflated zeros)."""

import io
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import configurator  # noqa: E402
import data  # noqa: E402
import readers  # noqa: E402
import serve  # noqa: E402


def dicom(a, photometric="MONOCHROME2", transfer_syntax="1.2.840.10008.1.2.1", padding=0, **elements):
    """A secondary-capture DICOM file's bytes, written by pydicom's own writers (file meta, then the data set) and
    deflated by hand for the deflated syntax, so that `padding` zero bytes of trailing padding (FFFC,FFFC) are
    streamed into the deflater 1 MB at a time and never held: a bomb of ~0.5 MB."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import UID, SecondaryCaptureImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = a.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    bits = a.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.PixelData = a.astype(f"<u{a.dtype.itemsize}").tobytes()
    head, body = DicomBytesIO(), DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    if transfer_syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return head.getvalue() + body.getvalue()
    z = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(body.getvalue())]
    if padding:
        out.append(z.compress(b"\xfc\xff\xfc\xffOB\0\0" + padding.to_bytes(4, "little")))
        zeros = bytes(1 << 20)
        out += [z.compress(zeros) for _ in range(padding >> 20)]
    return head.getvalue() + b"".join(out + [z.flush()])


RAMP = (np.arange(48 * 64).reshape(48, 64) % 4096).astype(np.uint16)


def test_deflate_bomb_is_refused_with_bounded_memory(tmp_path):
    """A 100 MB zero element deflated into ~100 KB (the issue: 1 MB of upload took 1.4 GB and 5 s, then a 200):
    refused with a 413 after inflating at most --max_pixels x 4 bytes + 1 MB, counted in 1 MB pieces. tracemalloc
    sees zlib's output buffers: before, the peak was 209 MB and 3.5 s; now ~3 MB."""
    deflated = "1.2.840.10008.1.2.1.99"
    good = dicom(RAMP, transfer_syntax=deflated)
    (tmp_path / "good.dcm").write_bytes(good)
    assert np.array_equal(serve.decode_upload(good, 32, 10 ** 6), data.decode_image(str(tmp_path / "good.dcm"), 32))
    bomb = dicom(RAMP, transfer_syntax=deflated, padding=100 << 20)
    assert len(bomb) < 1_000_000
    tracemalloc.start()
    try:
        with pytest.raises(serve.BadInput, match="inflates to more than 5,048,576 bytes.*send an uncompressed") as e:
            serve.decode_upload(bomb, 32, 10 ** 6)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.status == 413 and peak < 20 * 2 ** 20, peak


def test_huge_declared_dicom_sizes_are_refused_before_the_pixels():
    """Rows x columns x frames x samples x bits are checked against --max_pixels before pydicom reads a pixel (it
    allocates the declared size to decode RLE): before, only rows x columns was, so 1000 frames of 100 x 100 passed."""
    frames = dicom(np.zeros((100, 100), np.uint8), NumberOfFrames=1000)
    with pytest.raises(serve.BadInput, match=r"100 x 100 pixels x 1000 frame\(s\) = 10,000,000 pixels.*max_pix") as e:
        serve.decode_upload(frames, 32, 10 ** 6)
    assert e.value.status == 413
    wide = dicom(np.zeros((600, 800), np.uint32), SamplesPerPixel=3)  # 0.48 M pixels, but 32-bit RGB
    with pytest.raises(serve.BadInput, match=r"3 sample\(s\) x 32 bits = 5,760,000 bytes of pixels.*4,000,000") as e:
        serve.decode_upload(wide, 32, 10 ** 6)
    assert e.value.status == 413


def _image_bytes(fmt):
    buf = io.BytesIO()
    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["EPS", "GIF", "BMP", "TIFF"])
def test_uploads_outside_png_jpeg_dicom_are_refused(fmt, monkeypatch):
    """Before, any format PIL knows was decoded (GIF, BMP, TIFF: a 200; EPS went to Ghostscript, a 400 where it is not
    installed). Now 415 and a sentence; Ghostscript never runs. PNG and JPEG still decode."""
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript ran on an upload"))
    with pytest.raises(serve.BadInput, match="not an image this server reads: send a PNG, JPEG or DICOM file") as e:
        serve.decode_upload(_image_bytes(fmt), 32, 10 ** 6)
    assert e.value.status == 415
    for ok in ("PNG", "JPEG"):
        assert serve.decode_upload(_image_bytes(ok), 32, 10 ** 6).shape == (32, 32)


def test_prepare_never_hands_a_file_to_ghostscript(tmp_path, monkeypatch):
    """A dataset's 'x-ray.png' that is an EPS: readers opens only PNG / JPEG / BMP / TIFF, so it is a bad image
    (named by prepare, or skipped with --on_bad_image=skip), never a Ghostscript run."""
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript ran on a dataset file"))
    path = tmp_path / "x-ray.png"
    path.write_bytes(_image_bytes("EPS"))
    with pytest.raises(Image.UnidentifiedImageError, match="x-ray.png"):
        data.decode_image(str(path), 32)


@pytest.mark.parametrize("flag,family,right", [("--classifier", "clip", "--clip"), ("--classifier", "gpt", "--gpt"),
                                               ("--clip", "classifier", "--classifier"), ("--clip", "gpt", "--gpt"),
                                               ("--gpt", "classifier", "--classifier"), ("--gpt", "clip", "--clip")])
def test_checkpoint_on_the_wrong_flag_names_the_right_one(tmp_path, monkeypatch, capsys, flag, family, right):
    """`python serve.py --gpt=<a train.py checkpoint>` and the other five mix-ups: exit 2 and one line naming the flag
    that reads the file. Before: '--classifier=<CLIP>' said 'serve.py does not' read it, '--gpt=<classifier>' was a
    KeyError on the GPT config ('vocab_size'), '--clip=<GPT>' a sentence without the flag to use."""
    pytest.importorskip("fastapi")
    ckpts = {"classifier": {"model": {}, "model_args": {"model": "convnext_atto", "num_classes": 2}},
             "clip": {"model": {}, "model_args": {"image_model": "vit", "text_model": "transformer"}},
             "gpt": {"model": {}, "model_args": {"n_layer": 1, "n_embd": 8}, "tokenizer": {"kind": "char"}}}
    path = tmp_path / f"{family}.pt"
    torch.save(ckpts[family], path)
    script = {"classifier": "train.py", "clip": "train_clip.py", "gpt": "train_gpt.py"}[family]
    monkeypatch.setattr(sys, "argv", ["serve.py", f"{flag}={path}"])
    with pytest.raises(SystemExit) as e:
        configurator.cli(serve.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0] == f"error: {flag}: {path} is a {script} checkpoint; pass it as {right}={path}"


# -----------------------------------------------------------------------------
# readers.py decoding (prepare, evaluate.py --image and serve.py all decode through it)

def _lut(values, bits=16):
    return np.asarray(values, f"<u{bits // 8}").tobytes()


def test_dicom_look_up_tables_are_applied(tmp_path):
    """An image whose pixels are indices 0..255 through a table that inverts them decodes inverted: a palette DICOM
    (red = green = blue table), a Modality LUT table, a VOI LUT table. Before, each table was ignored (the pixels
    decoded as the plain indices). Without a table the indices decode as they are."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset
    idx = np.arange(256, dtype=np.uint8).reshape(16, 16)
    inverted = (65535 - 257 * np.arange(256)).astype(np.uint16)  # 255 - i in 16-bit table entries

    def table(**kw):
        item = Dataset()
        item.LUTDescriptor, item.LUTData = [256, 0, 16], _lut(inverted)
        for k, v in kw.items():
            setattr(item, k, v)
        return pydicom.Sequence([item])

    palette = {f"{c}PaletteColorLookupTable{part}": v for c in ("Red", "Green", "Blue")
               for part, v in (("Descriptor", [256, 0, 16]), ("Data", _lut(inverted)))}
    files = {"plain": dicom(idx), "palette": dicom(idx, "PALETTE COLOR", **palette),
             "modality": dicom(idx, ModalityLUTSequence=table(ModalityLUTType="US")),
             "voi": dicom(idx, VOILUTSequence=table())}
    got = {}
    for name, raw in files.items():
        (tmp_path / f"{name}.dcm").write_bytes(raw)
        got[name] = readers.load_gray(str(tmp_path / f"{name}.dcm")).astype(int)
    assert np.array_equal(got["plain"], idx)
    for name in ("palette", "modality", "voi"):
        assert np.abs(got[name] - (255 - idx)).max() <= 1, (name, got[name][0, :8])


def _float_tiff(path, a):
    Image.fromarray(a.astype(np.float32), mode="F").save(path, format="TIFF")
    return str(path)


def test_float_tiff_with_nan_or_inf_is_a_bad_image(tmp_path):
    """One NaN or inf pixel made the min-max scaling zero the whole image, which prepare stored as a good one.
    Now it is a bad image: prepare names it (--on_bad_image=error) or skips and lists it (skip)."""
    a = np.linspace(0.0, 1.0, 30 * 40).reshape(30, 40)
    assert readers.load_gray(_float_tiff(tmp_path / "ok.tif", a)).max() == 255
    for value in (np.nan, np.inf):
        b = a.copy()
        b[3, 4] = value
        with pytest.raises(ValueError, match="1 of 1200 pixel values are NaN or infinite"):
            readers.load_gray(_float_tiff(tmp_path / "bad.tif", b))
    root = tmp_path / "raw"
    for j, cls in enumerate(("normal", "opacity")):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            _float_tiff(root / cls / f"p{i}_{cls}.tif", a * (i + j + 1))
    b = a.copy()
    b[0, 0] = np.nan
    bad = _float_tiff(root / "opacity" / "p4_nan.tif", b)
    # five patients: each holds over 10% of the images, so the patient rule is said, not inferred
    cfg = dict(dataset="folder", root=str(root), image_size=16, num_workers=1, patient_pattern=r"^(p\d+)_")
    with pytest.raises(ValueError, match=r"p4_nan\.tif: ValueError: 1 of 1200 pixel values are NaN or infinite"):
        data.prepare(dict(cfg, out_dir=str(tmp_path / "o1")))
    meta = data.prepare(dict(cfg, out_dir=str(tmp_path / "o2"), on_bad_image="skip"))
    assert meta["bad_images"] == [bad] and sum(meta["splits"].values()) == 10
