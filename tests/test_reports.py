"""Real radiology reports: the IU X-ray reader, the report labeler (negation, uncertainty, synonyms; validated
against the collection's manual MeSH tags), the xz baseline, the GPT on real reports, and the ROCOv2 reader."""

import csv
import os
import re

import numpy as np
import pytest
from PIL import Image

import labeler
import readers
import text_data

SAMPLE = "iu_xray_reports_sample.tgz"


def lab(text, observations=("Cardiomegaly", "Pleural Effusion", "Lung Opacity", "Atelectasis", "Nodule", "Edema",
                            "Pneumothorax", "Pneumonia", "Support Devices", "Emphysema", "Lung Lesion", "No Finding")):
    """{observation: 1 / 0 / -1} of the mentioned ones."""
    y = labeler.label_reports([text], list(observations))[0]
    return {c: int(v) for c, v in zip(observations, y) if not np.isnan(v)}


def test_negation_uncertainty_and_synonyms():
    # negation: before the mention, inside it, after it; the scope ends at the clause
    assert lab("No pleural effusion or pneumothorax.") == {"Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}
    assert lab("The heart is not enlarged.") == {"Cardiomegaly": 0, "No Finding": 1}
    assert lab("The lungs are clear without evidence of consolidation or edema.")["Edema"] == 0
    assert lab("Small left effusion but no pneumothorax.") == {"Pleural Effusion": 1, "Pneumothorax": 0, "No Finding": 0}
    assert lab("Previously seen right pneumothorax has resolved.")["Pneumothorax"] == 0
    assert lab("Interval removal of the right IJ catheter.")["Support Devices"] == 0
    assert lab("Stable cardiomegaly. No change in the left basilar atelectasis.")["Atelectasis"] == 1  # not a negation
    assert lab("Pulmonary vascular engorgement appears within normal limits.")["Edema"] == 0
    assert lab("Mild interstitial edema, heart size normal.")["Edema"] == 1  # "normal" belongs to the heart
    # uncertainty
    assert lab("Pneumonia cannot be excluded.")["Pneumonia"] == -1
    assert lab("Possible right lower lobe pneumonia.")["Pneumonia"] == -1
    assert lab("Opacity in the left base may represent atelectasis.") == {"Lung Opacity": 1, "Atelectasis": -1, "No Finding": 0}
    assert lab("Cannot exclude a small left pleural effusion.")["Pleural Effusion"] == -1
    # synonyms a radiologist writes
    assert lab("Enlarged cardiac silhouette.")["Cardiomegaly"] == 1
    assert lab("Mild enlargement of the cardiac silhouette.")["Cardiomegaly"] == 1
    assert lab("Blunting of the right costophrenic angle.")["Pleural Effusion"] == 1
    assert lab("Blunting of the left costophrenic XXXX.")["Pleural Effusion"] == 1  # anonymised word
    assert lab("Patchy airspace disease in the right base.")["Lung Opacity"] == 1
    assert lab("Bibasilar infiltrates.")["Lung Opacity"] == 1
    assert lab("Lungs are hyperinflated, consistent with COPD.")["Emphysema"] == 1
    assert lab("Pulmonary vascular congestion.")["Edema"] == 1
    assert lab("Left subclavian pacemaker with leads in the right ventricle.")["Support Devices"] == 1
    assert lab("Right PICC with tip in the SVC.")["Support Devices"] == 1
    # a granuloma is not a nodule unless called one; a pericardial effusion is not a pleural one
    g = lab("Calcified granuloma in the right upper lobe.")
    assert "Nodule" not in g and "Lung Lesion" not in g and g["No Finding"] == 1
    assert lab("Calcified nodule in the right upper lobe, likely a granuloma.")["Nodule"] == 1
    assert lab("Small pericardial effusion.") == {"No Finding": 1}
    # No Finding: no pathology positive or uncertain; support devices do not count
    assert lab("ET tube 4 cm above the carina. Lungs are clear.") == {"Support Devices": 1, "No Finding": 1}
    assert lab("Possible small left effusion.")["No Finding"] == 0


def test_label_reports_shape_order_and_phantom_subset():
    y = labeler.label_reports(["Cardiomegaly.", "Normal chest.", ""])
    assert y.shape == (3, 14) and y.dtype == np.float32
    assert labeler.OBSERVATIONS == readers.CHEXPERT_CLASSES, "CheXpert's order"
    assert y[0, 2] == 1 and y[0, 0] == 0 and np.isnan(y[1, 1:]).all() and y[1, 0] == 1
    phantom = pytest.importorskip("phantom")
    assert set(phantom.CLASSES) <= set(labeler.RULES) | {"No Finding"}
    with pytest.raises(ValueError, match="Hernia"):
        labeler.label_reports(["x"], ["Hernia"])


def _xml(uid, findings, impression, indication="Cough.", mesh=("normal",), images=("1001", "2001")):
    secs = "".join(f'<AbstractText Label="{k}">{v}</AbstractText>' for k, v in
                   (("COMPARISON", "None."), ("INDICATION", indication), ("FINDINGS", findings), ("IMPRESSION", impression)))
    imgs = "".join(f'<parentImage id="CXR{uid}_IM-0001-{s}"><figureId>F{k}</figureId><caption>Xray Chest PA and Lateral'
                   f'</caption></parentImage>' for k, s in enumerate(images, 1))
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR{uid}"/><MedlineCitation><Article><Abstract>'
            f'{secs}</Abstract></Article></MedlineCitation><MeSH>{"".join(f"<major>{m}</major>" for m in mesh)}'
            f'<automatic>Lung</automatic></MeSH>{imgs}</eCitation>')


@pytest.fixture
def iu_folder(tmp_path):
    """A hand-written collection in the Open-i layout: 40 reports, 1 with neither findings nor impression."""
    d = tmp_path / "iu" / "ecgen-radiology"
    d.mkdir(parents=True)
    texts = ["The heart is normal in size. The lungs are clear. No XXXX of pleural effusion.",
             "Mild cardiomegaly. Small right pleural effusion. XXXX XXXX are intact.",
             "Right PICC with tip in the SVC. Left basilar atelectasis."]
    for i in range(40):
        f, imp = (texts[i % 3], "No acute disease on XXXX XXXX.") if i else ("", "")
        (d / f"{i + 1}.xml").write_text(_xml(i + 1, f, imp))
    return tmp_path / "iu"


def test_iu_reader_fixture_text_bins_keep_xxxx(iu_folder, tmp_path):
    recs, skipped = text_data.read_iu_xray(str(iu_folder))
    assert len(recs) == 39 and skipped == 1
    r = recs[0]
    assert r["images"] == [("CXR2_IM-0001-1001", "frontal"), ("CXR2_IM-0001-2001", "lateral")]
    assert r["mesh_major"] == ["normal"] and r["indication"] == "Cough." and r["comparison"] == "None."
    assert r["text"].startswith(r["findings"]) and r["text"].endswith(r["impression"]) and r["patient_id"] == "CXR2"
    meta = text_data.main(["--dataset=iu_xray", f"--root={iu_folder}", "--vocab_size=300", "--val_frac=0.2",
                           "--test_frac=0.0", f"--out_dir={tmp_path / 'iu_text'}"])
    assert sum(s["documents"] for s in meta["splits"].values()) == 39
    tok = text_data.tok_lib.load(str(tmp_path / "iu_text" / "tokenizer.json"))
    for s in ("XXXX", " XXXX", "x-XXXX"):
        assert [tok.decode([i]) for i in tok.encode(s)][-1] == s.lstrip("x-"), "XXXX must stay one token"


def test_iu_pairs_fixture_with_pngs(iu_folder, tmp_path):
    png = iu_folder / "NLMCXR_png"
    png.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 40):  # report 40's lateral image is missing: counted, skipped
        for s in ("1001", "2001")[: 1 if i == 39 else 2]:
            Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(png / f"CXR{i + 1}_IM-0001-{s}.png")
    meta = text_data.main(["--dataset=iu_xray", f"--root={iu_folder}", "--vocab_size=300", "--image_size=32",
                           f"--out_dir={tmp_path / 'pairs'}"])
    assert meta["kind"] == "pairs" and sum(meta["splits"].values()) == 2 * 39 - 1 and "1 images missing" in meta["source"]
    assert meta["classes"] == labeler.OBSERVATIONS
    for split in meta["splits"]:
        p = text_data.Pairs(str(tmp_path / "pairs"), split)
        assert {r["view"] for r in p.index} <= {"frontal", "lateral"}
        for row, y in zip(p.index, p.labels):
            cm = "cardiomegaly" in row["text"].lower()
            assert y[labeler.OBSERVATIONS.index("Cardiomegaly")] == float(cm)
            assert y[labeler.OBSERVATIONS.index("Support Devices")] == float("PICC" in row["text"])
    tr = text_data.Pairs(str(tmp_path / "pairs"), "train")
    assert tr.images.shape[1:] == (32, 32) and len({r["patient_id"] for r in tr.index}) < len(tr)  # 2 images a report


@pytest.mark.parametrize("image_id", ["../../outside/secret", "CXR1_IM-0001/../../../outside/secret", "/etc/secret"])
def test_iu_image_id_outside_the_image_folder_is_refused(tmp_path, image_id):
    """Issue 31: a <parentImage id> is a file name in NLMCXR_png/; one that climbs out of it (or is absolute) would
    make prepare read any .png on the machine as a training image. The reader names the XML and the id."""
    d = tmp_path / "iu" / "ecgen-radiology"
    d.mkdir(parents=True)
    (d / "1.xml").write_text(_xml(1, "Heart size is normal.", "No acute disease."))
    (d / "2.xml").write_text(_xml(2, "Heart size is normal.", "Clear.").replace("CXR2_IM-0001-1001", image_id))
    with pytest.raises(ValueError, match=rf"2\.xml: <parentImage id='{re.escape(image_id)}'> leaves the image folder"):
        text_data.read_iu_xray(str(tmp_path / "iu"))
    inside = text_data.parse_iu_report(_xml(3, "Clear.", "Normal.").replace("CXR3_IM-0001-1001", "sub/../CXR3_IM-1"))
    assert inside["images"][0][0] == "sub/../CXR3_IM-1"  # stays inside the folder: allowed


def test_iu_reader_on_the_real_sample(real_dir):
    recs, skipped = text_data.read_iu_xray(str(real_dir / SAMPLE))
    assert len(recs) + skipped == 994 and skipped == 10
    assert sum(bool(r["findings"]) for r in recs) == 872 and sum(bool(r["impression"]) for r in recs) == 984
    assert sum(bool(r["mesh_major"]) for r in recs) == 984
    assert sum(len(r["images"]) for r in recs) > 1700
    heavy = max(recs, key=lambda r: r["text"].count("XXXX"))
    assert heavy["text"].count("XXXX") >= 8 and heavy["findings"]
    tok = text_data.tok_lib.train_bpe([r["text"] for r in recs[:200]], 400, keep=("XXXX",))
    ids = tok.encode(heavy["text"])
    assert sum(tok.decode([i]).strip() == "XXXX" for i in ids) == heavy["text"].count("XXXX")
    assert {r["split"] for r in recs} == {"train", "val", "test"}


def test_label_eval_on_the_real_sample(real_dir, capsys):
    res = text_data.main(["--dataset=iu_xray", f"--root={real_dir / SAMPLE}", "--label_eval"])
    out = capsys.readouterr().out
    assert "macro F1 over Cardiomegaly, Pleural Effusion, Lung Opacity, Atelectasis, Nodule, Edema, Support Devices, " \
           "No Finding" in out
    assert res["target_macro_f1"] >= 0.90, out
    assert all(res[c]["support"] >= 20 for c in text_data.LABEL_EVAL_TARGET)
    # issue 38 on this sample (before -> after): Lung Lesion precision 0.575 -> 0.611, Pneumonia's definite
    # positives 0.615 -> 0.800, Fracture 0.700 -> 0.750; the observations with few MeSH positives are printed too
    assert "definite P" in out and "fewer than 20 MeSH positives" in out and "\nPneumonia " in out
    assert res["Lung Lesion"]["precision"] >= 0.6 and res["Fracture"]["precision"] >= 0.74, out
    assert res["Pneumonia"]["definite_precision"] >= 0.75, out


def test_report_metrics_on_real_references(real_dir):
    """BLEU-4, ROUGE-L and the clinical F1 (label_reports) with IU X-ray reports as references."""
    recs, _ = text_data.read_iu_xray(str(real_dir / SAMPLE))
    refs = [r["text"] for r in recs[:200]]
    y = text_data.iu_pair_labels(refs)
    same = text_data.report_metrics(refs, refs, y, labeler.OBSERVATIONS)
    assert same["bleu4"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0) and same["macro_f1"] == 1.0
    normal = ["The heart is normal in size. The lungs are clear. No acute disease."] * len(refs)
    m = text_data.report_metrics(normal, refs, y, labeler.OBSERVATIONS)
    assert 0 < m["bleu4"] < 0.5 and 0 < m["rouge_l"] < 0.6 and m["per_class"]["Cardiomegaly"]["recall"] == 0.0
    assert m["per_class"]["No Finding"]["recall"] == 1.0 and m["macro_f1"] < 0.3


def test_xz_baseline_formula(tmp_path):
    import lzma
    tok = text_data.tok_lib.CharTokenizer.from_texts(["abc heart normal", "lungs clear"])
    train = np.array([tok.eot_id] + tok.encode("abc heart normal") + [tok.eot_id], np.uint16)
    val = np.array(tok.encode("lungs clear") + [tok.eot_id], np.uint16)
    t, v = b"\nabc heart normal\n", b"lungs clear\n"
    want = (len(lzma.compress(t + v, preset=9)) - len(lzma.compress(t, preset=9))) * 8 / len(v)
    assert text_data.xz_bpb(train, val, tok) == pytest.approx(want)


def _rocov2_fixture(root, n=(48, 16, 16)):
    """The ROCOv2 release layout: captions, concepts (';'-separated CUIs), images {split}/<ID>.jpg."""
    rng = np.random.default_rng(0)
    words = {"C0040405": "CT", "C1306645": "X-ray", "C0817096": "chest", "C0000726": "abdomen", "C0032227": "effusion"}
    for split, k in zip(("train", "valid", "test"), n):
        (root / split).mkdir(parents=True)
        caps, cons = [], []
        for i in range(k):
            rid = f"ROCOv2_2023_{split}_{i:06d}"
            cui = ["C0040405" if i % 2 else "C1306645", "C0817096" if i % 3 else "C0000726"] + (["C0032227"] if i % 4 == 0 else [])
            caps.append((rid, " ".join(words[c] for c in cui) + " image."))
            cons.append((rid, ";".join(cui)))
            Image.fromarray(rng.integers(0, 255, (24, 30), dtype=np.uint8)).convert("RGB").save(root / split / f"{rid}.jpg")
        for name, rows, col in ((f"{split}_captions.csv", caps, "Caption"), (f"{split}_concepts.csv", cons, "CUIs")):
            with open(root / name, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["ID", col])
                w.writerows(rows)
    with open(root / "cui_mapping.csv", "w", newline="") as f:
        csv.writer(f).writerows([["CUI", "Canonical name"], ["C0817096", "Chest"], ["C0000726", "Abdomen"],
                                 ["C0032227", "Pleural effusion disorder"]])


def test_rocov2_reader_prepare_and_clip_smoke(tmp_path, capsys):
    import data
    import train_clip
    _rocov2_fixture(tmp_path / "rocov2")
    src = readers.read_rocov2(tmp_path / "rocov2")
    assert src.classes[:2] == ["Computed Tomography", "Plain X-Ray"] and "Pleural effusion disorder" in src.classes
    assert src.labels.shape == (80, len(src.classes)) and set(np.unique(src.labels)) == {0.0, 1.0}
    assert [r["split"] for r in src.records].count("test") == 16
    out = tmp_path / "prepared"
    meta = data.main(["--dataset=rocov2", f"--root={tmp_path / 'rocov2'}", f"--out_dir={out}", "--image_size=32",
                      "--num_workers=1"])
    assert meta["classes"] == src.classes and np.load(out / "train_labels.npy").shape[1] == len(src.classes)
    res = train_clip.main([f"--data_dir={out}", f"--out_dir={tmp_path / 'clip'}", "--image_size=32", "--device=cpu",
                           "--tensorboard_log=False", "--tokenizer=bpe", "--bpe_vocab_size=280", "--max_iters=2",
                           "--eval_interval=2", "--batch_size=8", "--vision_width=16", "--vision_layers=1",
                           "--vision_heads=2", "--text_width=16", "--text_layers=1", "--text_heads=2", "--embed_dim=16",
                           "--warmup_iters=1"])
    assert res["iters"] == 2
    assert "findings-match i2t R@1/5/10" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.learning
def test_gpt_beats_xz_on_real_reports(real_dir, tmp_path, learning):
    """python train_gpt.py config/gpt_iu_xray.py on the 994-report sample: val bits per byte below xz -9's."""
    import train_gpt
    data_dir = tmp_path / "iu_xray"
    text_data.main(["--dataset=iu_xray", f"--root={real_dir / SAMPLE}", "--vocab_size=1024", f"--out_dir={data_dir}"])
    cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "gpt_iu_xray.py")
    res = train_gpt.main([cfg, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", "--tensorboard=False"])
    assert res["xz_bpb"] is not None, res
    learning("xz -9 bpb - val bpb", res["xz_bpb"] - res["val_bpb"], 0.0)
