"""serve.py: the JSON API in-process (FastAPI's TestClient) on checkpoints trained in the tests, and a real server
process under a bounded load. The browser test is tests/test_browser.py."""

import base64
import http.client
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")  # TestClient's transport
if not (importlib.util.find_spec("python_multipart") or importlib.util.find_spec("multipart")):
    pytest.skip("python-multipart is not installed (pip install -r requirements-serve.txt)", allow_module_level=True)
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import metrics  # noqa: E402
import runs  # noqa: E402
import serve  # noqa: E402


@pytest.fixture(scope="module")
def client(serve_models):
    app = serve.build_app([f"--classifier={serve_models['classifier']}", f"--clip={serve_models['clip']}",
                           f"--index={serve_models['data_dir']}", "--split=test", f"--gpt={serve_models['gpt']}",
                           "--max_pixels=250000", "--max_upload_mb=1"])
    with TestClient(app) as c:
        yield c


def phantom_image(data_dir, split="test", row=0):
    return np.array(data.PreparedSplit(data_dir, split).images[row])


def png_bytes(a, **kw):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def write_dicom(path, a16, transfer_syntax="1.2.840.10008.1.2.1", pixel_data=None):
    """A minimal secondary-capture DICOM: 16-bit MONOCHROME2 (uncompressed), or `pixel_data` frames encapsulated under
    a compressed transfer syntax."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "phantom"
    ds.Rows, ds.Columns = a16.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixel_data is None:
        ds.PixelData = a16.astype("<u2").tobytes()
    else:
        ds.PixelData = pydicom.encaps.encapsulate([pixel_data])
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def evaluate_image(ckpt, path, tmp_path):
    res = evaluate.main([f"--ckpt={ckpt}", f"--image={path}", f"--out_dir={tmp_path / 'eval'}", "--device=cpu"])
    return np.array(res["probs"])


def test_decode_upload_is_data_decode_image_and_refuses_bad_files(tmp_path):
    """No model needed (fast): uploads decode exactly like data.decode_image on the same file (what evaluate.py --image
    and prepare use), for 8/16-bit gray, RGB, RGBA and DICOM; bad files raise BadInput with a 4xx and one sentence."""
    rng = np.random.default_rng(0)
    a = (rng.random((70, 90)) * 255).astype(np.uint8)
    files = {"g8.png": png_bytes(a), "g16.png": png_bytes(a.astype(np.uint16) * 200),
             "rgb.jpg": png_bytes(np.dstack([a, a // 2, a]), format="JPEG"), "rgba.png": png_bytes(np.dstack([a, a, a, a]))}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    write_dicom(str(tmp_path / "x.dcm"), a.astype(np.uint16) * 16)
    for name in [*files, "x.dcm"]:
        raw = (tmp_path / name).read_bytes()
        got = serve.decode_upload(raw, 32, 10 ** 6)
        assert got.shape == (32, 32) and got.dtype == np.uint8
        assert np.array_equal(got, data.decode_image(str(tmp_path / name), 32)), name
    good = files["g8.png"]
    write_dicom(str(tmp_path / "j2k.dcm"), a.astype(np.uint16), "1.2.840.10008.1.2.4.90", pixel_data=b"\xff\x4f" + bytes(64))
    j2k = (tmp_path / "j2k.dcm").read_bytes()
    for raw, status, words in [(b"", 400, "empty"), (b"plain text, not a picture" * 10, 415, "not an image"),
                               (good[:len(good) // 2], 400, "truncated"), (good, 413, "max_pixels"),
                               (j2k, 415, "transfer syntax")]:
        with pytest.raises(serve.BadInput, match=words) as e:
            serve.decode_upload(raw, 32, 10 ** 6 if words != "max_pixels" else 1000)
        assert e.value.status == status and str(e.value).count(". ") == 0


@pytest.mark.slow
def test_classify_equals_evaluate_image(client, serve_models, tmp_path):
    """The same file through POST /v1/classify and `python evaluate.py --image=`: equal probabilities (1e-5), for an
    8-bit gray PNG, a larger 16-bit PNG (resized + min-max scaled), an RGB JPEG, an RGBA PNG and a 16-bit DICOM."""
    u8 = phantom_image(serve_models["data_dir"])
    big = np.array(Image.fromarray(u8).resize((90, 70), Image.BILINEAR))
    files = {"gray8.png": png_bytes(u8), "gray16.png": png_bytes((big.astype(np.uint16) * 16 + 100).astype(np.uint16)),
             "rgb.jpg": png_bytes(np.stack([big, big // 2, big], -1), format="JPEG", quality=90),
             "rgba.png": png_bytes(np.dstack([big, big, big, np.full_like(big, 255)]))}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    write_dicom(str(tmp_path / "ct16.dcm"), big.astype(np.uint16) * 12)
    net, meta, _ = runs.load_run(serve_models["classifier"])
    classes = meta["classes"]
    for name in [*files, "ct16.dcm"]:
        path = tmp_path / name
        r = client.post("/v1/classify", files={"file": (name, path.read_bytes(), "application/octet-stream")})
        assert r.status_code == 200, (name, r.text)
        res = r.json()
        want = evaluate_image(serve_models["classifier"], str(path), tmp_path)
        np.testing.assert_allclose(res["probabilities"], want, atol=1e-5, err_msg=name)
        assert res["classes"] == classes and len(res["findings"]) == len(classes)
        probs = [f["probability"] for f in res["findings"]]
        assert probs == sorted(probs, reverse=True)
        assert res["positive"] == [f["finding"] for f in res["findings"] if f["probability"] >= f["threshold"]]
        assert len(res["heatmaps"]) == 3 and res["heatmaps"][0]["finding"] == res["findings"][0]["finding"]
        heat = Image.open(io.BytesIO(base64.b64decode(res["heatmaps"][0]["png"])))
        assert heat.mode == "RGB" and heat.size[0] >= 224  # overlay() enlarges 32 px to >= 224
    # the thresholds: evaluate.py's rule (Youden) on the checkpoint's own validation split
    vs = data.PreparedSplit(serve_models["data_dir"], "val")
    vp = runs.predict(net, vs.images, meta)
    want_thr = metrics.choose_thresholds(vp, np.asarray(vs.labels, np.float32), "youden")
    np.testing.assert_allclose(res["thresholds"], want_thr, atol=1e-6)
    assert "val" in res["threshold_source"] and "youden" in res["threshold_source"]


@pytest.mark.slow
def test_bad_inputs_get_4xx_and_the_server_keeps_serving(client, serve_models, tmp_path):
    u8 = phantom_image(serve_models["data_dir"])
    good = png_bytes(u8)
    big = png_bytes(np.zeros((600, 600), np.uint8))  # 360,000 pixels > --max_pixels=250000
    j2k = write_dicom(str(tmp_path / "j2k.dcm"), u8.astype(np.uint16), "1.2.840.10008.1.2.4.90", pixel_data=b"\xff\x4f" + bytes(64))
    huge_dicom_hdr = write_dicom(str(tmp_path / "huge.dcm"), np.zeros((600, 600), np.uint16))
    cases = [
        ("/v1/classify", {"files": {"file": ("notes.txt", b"this is a radiology report, not a picture", "text/plain")}}, 415, "not an image"),
        ("/v1/classify", {"files": {"file": ("x.png", good[:len(good) // 2], "image/png")}}, 400, "truncated"),
        ("/v1/classify", {"files": {"file": ("x.png", b"", "image/png")}}, 400, "empty"),
        ("/v1/classify", {"files": {"file": ("big.png", big, "image/png")}}, 413, "max_pixels"),
        ("/v1/classify", {"files": {"file": ("j2k.dcm", open(j2k, "rb").read(), "application/dicom")}}, 415, "transfer syntax"),
        ("/v1/classify", {"files": {"file": ("huge.dcm", open(huge_dicom_hdr, "rb").read(), "application/dicom")}}, 413, "max_pixels"),
        ("/v1/classify", {"files": {"file": ("x.png", bytes(2 * 2 ** 20), "image/png")}}, 413, "max_upload_mb"),
        ("/v1/classify", {"data": {"nothing": "here"}}, 422, "'file'"),
        ("/v1/search", {"data": {"query": "   "}}, 400, "query is empty"),
        ("/v1/search", {"data": {"query": "effusion", "top_k": "500"}}, 400, "top_k"),
        ("/v1/report", {"files": {"file": ("notes.txt", b"\x00\x01 garbage", "text/plain")}}, 415, "not an image"),
        ("/v1/classify", {"files": {"file": ("x.gif", png_bytes(u8, format="GIF"), "image/gif")}}, 415,
         "PNG, JPEG or DICOM"),
        ("/v1/index/100000.png", None, 404, "no index row"),
    ]
    for url, kw, status, words in cases:
        r = client.post(url, **kw) if kw is not None else client.get(url)
        assert r.status_code == status, (url, words, r.status_code, r.text)
        msg = r.json()["error"]
        assert words in msg and msg.count(". ") == 0 and len(msg) < 300, msg  # one sentence that says what to do
        assert client.get("/healthz").json()["status"] == "ok"
    r = client.post("/v1/classify", files={"file": ("x.png", good, "image/png")})
    assert r.status_code == 200 and client.get("/healthz").json()["worker_alive"]


@pytest.mark.slow
def test_search_report_and_models(client, serve_models):
    """The 1-step CLIP: plumbing (ranked scores that equal the index features' dot products, images served); the
    report GPT: a report and its finding head's tags; /v1/models: provenance that matches the files."""
    r = client.post("/v1/search", data={"query": "Moderate left pleural effusion.", "top_k": "4"})
    assert r.status_code == 200, r.text
    hits = r.json()["images"]
    assert len(hits) == 4 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    split = data.PreparedSplit(serve_models["data_dir"], "test")
    assert hits[0]["report"] == split.index[hits[0]["row"]]["text"]
    img = client.get(hits[0]["image_url"])
    assert img.status_code == 200 and np.array_equal(np.array(Image.open(io.BytesIO(img.content))), split.images[hits[0]["row"]])
    r = client.post("/v1/search", files={"file": ("x.png", png_bytes(phantom_image(serve_models["data_dir"])), "image/png")})
    assert r.status_code == 200 and len(r.json()["reports"]) == 5 and r.json()["kind"] == "image"

    r = client.post("/v1/report", files={"file": ("x.png", png_bytes(phantom_image(serve_models["pairs"], "val")), "image/png")})
    assert r.status_code == 200, r.text
    res = r.json()
    assert isinstance(res["report"], str) and len(res["tags"]) == 10
    assert res["present"] == [t["finding"] for t in res["tags"] if t["probability"] >= t["threshold"]]

    m = client.get("/v1/models").json()
    assert set(m) == {"classifier", "clip", "gpt", "index", "server"}
    net, _, _ = runs.load_run(serve_models["classifier"])
    assert m["classifier"]["sha256"] == serve.sha256(serve_models["classifier"]) and m["classifier"]["iter"] == net.run_info["iter"]
    assert m["index"]["rows"] == len(split) and "not a medical device" in m["server"]["notice"]
    page = client.get("/")
    assert page.status_code == 200 and "not a medical device" in page.text.lower()


@pytest.mark.slow
def test_start_up_errors_name_the_fix(serve_models, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="at least one model"):
        serve.build_app([])
    with pytest.raises(ValueError, match="--index"):
        serve.build_app([f"--clip={serve_models['clip']}"])
    with pytest.raises(FileNotFoundError, match="train one"):
        serve.build_app([f"--classifier={tmp_path / 'nothing.pt'}"])
    c = TestClient(serve.build_app([f"--gpt={serve_models['gpt']}"]))
    r = c.post("/v1/classify", files={"file": ("x.png", png_bytes(phantom_image(serve_models["data_dir"])), "image/png")})
    assert r.status_code == 404 and "--classifier" in r.json()["error"]
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install -r requirements-serve.txt"):
        serve.build_app([f"--gpt={serve_models['gpt']}"])


@pytest.mark.slow
@pytest.mark.learning
def test_search_finds_the_own_report_of_an_index_image(serve_clip, learning):
    """A CLIP that has learned its training pairs (serve_clip) searching an index of those pairs: an image uploaded
    as a PNG file gets its own reference report in the top 5 (of 400+ distinct reports) for most images, and every
    score equals the direct computation with runs.py's CLIP encoders (the ones train_clip.py trains with)."""
    import torch

    app = serve.build_app([f"--clip={serve_clip['clip']}", f"--index={serve_clip['data_dir']}", "--split=train"])
    split = data.PreparedSplit(serve_clip["data_dir"], "train")
    m = app.state.service.models["clip"]
    hits = []
    with TestClient(app) as c:
        for row in range(0, 60, 3):
            r = c.post("/v1/search", files={"file": ("x.png", png_bytes(np.array(split.images[row])), "image/png")})
            assert r.status_code == 200, r.text
            reports = r.json()["reports"]
            hits.append(split.index[row]["text"] in [h["report"] for h in reports])
            x = runs.images_to_float(torch.from_numpy(np.array(split.images[row]))[None, None], m["ck"]["meta"], m["cfg"])
            with torch.no_grad():
                v = m["net"].encode_image(x)[0]
                t = runs.encode_texts(m["net"], m["tok"], [h["report"] for h in reports], m["cfg"], "cpu")
            np.testing.assert_allclose([h["score"] for h in reports], (t @ v).numpy(), atol=1e-5)
    print(f"own report in the top 5: {sum(hits)}/{len(hits)}")
    learning("own report in the top 5", np.mean(hits), 0.4)  # chance: 5 / 400+ ~ 0.012


# -----------------------------------------------------------------------------
# a real server process (uvicorn on a free localhost port); also used by tests/test_browser.py


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """python serve.py ... as a subprocess on 127.0.0.1:<free port>; stopped (by its own pid) on exit."""

    def __init__(self, args, log_path, timeout=120):
        self.port = free_port()
        self.log = open(log_path, "w")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), *args, f"--port={self.port}"],
                                     cwd=str(ROOT), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"serve.py exited: {open(log_path).read()[-2000:]}"
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"serve.py did not answer /healthz within {timeout} s: {open(log_path).read()[-2000:]}")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def get(self, path):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def post_file(self, path, name, raw):
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + raw + f"\r\n--{boundary}--\r\n".encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@pytest.mark.slow
def test_load_8_clients_x_20_requests(serve_models, tmp_path):
    """8 concurrent clients x 20 classify requests against serve.py --max_batch=8 on localhost: every answer 200 and
    equal (1e-5) to the single-request answer for its image, batches of more than one formed; prints req/s, p50/p95."""
    split = data.PreparedSplit(serve_models["data_dir"], "test")
    images = [png_bytes(np.array(split.images[i])) for i in range(8)]
    with Server([f"--classifier={serve_models['classifier']}", "--max_batch=8", "--batch_wait_ms=10"],
                tmp_path / "serve.log") as srv:
        ref = []
        for raw in images:
            status, res = srv.post_file("/v1/classify", "x.png", raw)
            assert status == 200, res
            ref.append(res["probabilities"])
        lat, errors = [], []
        lock = threading.Lock()

        def client(k):
            for j in range(20):
                i = (k + j) % len(images)
                t0 = time.perf_counter()
                try:
                    status, res = srv.post_file("/v1/classify", "x.png", images[i])
                    ok = status == 200 and np.allclose(res["probabilities"], ref[i], atol=1e-5)
                    err = None if ok else f"status {status}: {str(res)[:200]}"
                except Exception as e:  # a refused or dropped connection is a failure of the test, kept to report
                    err = repr(e)
                with lock:
                    lat.append(time.perf_counter() - t0)
                    if err:
                        errors.append(err)

        health, running = [], [True]

        def prober():  # the event loop must keep answering while the worker computes
            while running[0]:
                t1 = time.perf_counter()
                status = srv.get("/healthz")[0]
                health.append((status, time.perf_counter() - t1))
                time.sleep(0.2)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        probe = threading.Thread(target=prober)
        for t in threads + [probe]:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        running[0] = False
        probe.join()
        assert not errors, errors[:5]
        assert len(lat) == 160 and srv.get("/healthz")[0] == 200
        batches = json.loads(srv.get("/v1/models")[1])["server"]["classify_batches"]
    p50, p95 = np.percentile(lat, [50, 95])
    h = np.array([dt for _, dt in health])
    print(f"load: 8 clients x 20 requests in {wall:.1f} s = {160 / wall:.1f} req/s | latency p50 {1000 * p50:.0f} ms "
          f"p95 {1000 * p95:.0f} ms | classify batches {batches} | /healthz during the load: {len(h)} probes, "
          f"median {1000 * np.median(h):.0f} ms, max {1000 * h.max():.0f} ms")
    assert batches["max"] > 1, batches
    assert all(status == 200 for status, _ in health) and len(h) >= 5
    assert np.median(h) < 0.25 * p50, (np.median(h), p50)  # not queued behind the inference
