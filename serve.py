"""
An inference service and a demo page for trained nanorad models: upload an X-ray and see the findings with
their heatmaps, search an index of images and reports, draft a report. A research demo, not a medical device.

    pip install -r requirements-serve.txt                      # FastAPI, uvicorn, python-multipart
    python serve.py --classifier=out/quickstart/best.pt        # then open http://127.0.0.1:8000/
    python serve.py --classifier=out/quickstart/best.pt --clip=out/clip_phantom/ckpt.pt --index=data/phantom \\
        --split=test --gpt=out/gpt_report_from_image/ckpt.pt --max_batch=8
    python serve.py --host=0.0.0.0 --port=8000 ...             # other machines (Docker: see the Dockerfile)

Every model is optional (--classifier=, --clip=, --gpt=); each is loaded once, kept in eval mode and run under
torch.inference_mode (Grad-CAM needs gradients: the heatmaps run with grad, without touching the weights).

JSON API (images as multipart field `file`: PNG or JPEG, 8/16-bit, gray/RGB/RGBA, or DICOM):
    POST /v1/classify   file                  -> probabilities per class, thresholds, positive findings, and
                                                 Grad-CAM / attention-rollout heatmaps (base64 PNG) of the top findings
    POST /v1/search     query=<text> | file   -> top_k index images (text query) or index reports (image), with scores
    POST /v1/report     file                  -> a report from the image-conditioned GPT and its finding head's tags
    GET  /healthz, GET /v1/models             -> liveness; what is loaded, its classes and provenance (path, sha256, iter)
                                                 and its model card (model_card.json / .md written by evaluate.py)
    GET  /v1/index/<row>.png                  -> an index image (the page shows search hits with it)

Images are decoded by the same function evaluate.py --image uses (data.decode_image: grayscale, long side to the
model's size, padded square), so /v1/classify returns the numbers evaluate.py prints. The thresholds are chosen on
the classifier's own validation split with evaluate.py's rule (Youden by default) when that prepared folder exists,
else 0.5 (the response says which). All model work runs in one worker thread (the event loop keeps answering);
with --max_batch>1 concurrent classify requests that arrive within --batch_wait_ms are run as one batch.
A bad upload (not a PNG, JPEG or DICOM file, truncated, beyond --max_pixels, a DICOM declaring more pixel data than
--max_pixels allows or deflated to inflate beyond it, an unsupported DICOM transfer syntax, an empty query, a body
beyond --max_upload_mb) gets a 4xx with one sentence; the server keeps serving.
"""

import base64
import concurrent.futures
import hashlib
import io
import json
import os
import queue
import sys
import tempfile
import threading
import time
import zlib

import numpy as np
import torch

import common
import configurator
import data
import metrics
import model_clip
import runs
import tokenizer as tok_lib
from cam import find_cam_target, heatmaps, load_image, overlay
from model_gpt import GPT, gpt_config_from_dict

# -----------------------------------------------------------------------------
# config: python serve.py --key=value (or a config file), see configurator.py
classifier = ""           # a train.py checkpoint (best.pt): /v1/classify
clip = ""                 # a train_clip.py checkpoint: /v1/search (needs --index)
gpt = ""                  # an image-conditioned train_gpt.py checkpoint (cond='image'): /v1/report
index = ""                # a prepared folder (data/<name>) whose images + report texts /v1/search ranks
split = "test"            # the split of --index that is indexed
index_size = 0            # first N rows of that split (0 = all); encoding runs once at start-up
threshold = "youden"      # operating point chosen on the classifier's val split: youden | f1 | sensitivity | none (0.5)
target_sensitivity = 0.9  # with threshold="sensitivity"
top_findings = 3          # heatmaps for this many of the most probable classes
top_k = 5                 # search results (a request may ask for up to 50)
max_new_tokens = 120      # report length limit (greedy decoding)
host = "127.0.0.1"        # 0.0.0.0 to serve other machines (and inside Docker)
port = 8000
max_batch = 1             # >1: concurrent classify requests are batched (up to this many images per forward pass)
batch_wait_ms = 5.0       # how long the worker waits for more requests to fill a batch
max_pixels = 40_000_000   # decoded image size limit (width x height); a 3000 x 3000 chest film is 9 M
max_upload_mb = 32.0      # request body limit
threads = 0               # torch CPU threads for inference (0 = torch's default)
device = "cpu"            # cpu | cuda
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per knob; CHECKS: across knobs)
RANGES = dict(index_size="[0, inf)", top_k="[1, 50]", max_new_tokens="[1, inf)", max_batch="[1, inf)",
              max_pixels="[1, inf)", max_upload_mb="(0, inf)", batch_wait_ms="[0, 60000]")

HERE = os.path.dirname(os.path.abspath(__file__))


class BadInput(ValueError):
    """A request the user can fix: answered with `status` and the one-sentence message."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _fastapi():
    import importlib.util
    try:
        import fastapi
        import uvicorn  # noqa: F401
    except ImportError:
        fastapi = None
    # python-multipart (FastAPI's form parser) is imported as python_multipart since 0.0.13, multipart before
    if fastapi is None or not (importlib.util.find_spec("python_multipart") or importlib.util.find_spec("multipart")):
        raise ImportError("serve.py needs FastAPI, uvicorn and python-multipart: pip install -r requirements-serve.txt")
    return fastapi


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def png_base64(rgb_or_gray):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb_or_gray).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# -----------------------------------------------------------------------------
# decoding an upload: check it, then the very function training/evaluate use (data.decode_image on a file)

# DICOM transfer syntaxes pydicom decodes without extra packages: implicit/explicit VR little/big endian, deflated, RLE
_DICOM_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                 "1.2.840.10008.1.2.5"}
_DEFLATED = "1.2.840.10008.1.2.1.99"
# the most pixel data a DICOM upload may declare: --max_pixels x this many bytes (a 32-bit gray or an 8-bit RGBA image
# at the pixel limit). pydicom allocates the declared size before decoding RLE, so a small file could ask for gigabytes
_DICOM_BYTES_PER_PIXEL = 4
# explicit VR little endian (the file meta group's encoding): these VRs have a 4-byte length after 2 reserved bytes
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
# the PIL formats an upload may be; MPO (a camera's multi-picture JPEG) opens through the JPEG plugin. Nothing else
# PIL knows is tried: it would hand an EPS to Ghostscript, and TIFF brings libtiff's many codecs and its float and
# multi-page variants to a public endpoint (a TIFF converts to a 16-bit PNG; prepare still reads TIFF files)
UPLOAD_FORMATS = ("PNG", "JPEG")


def _dicom_meta(raw):
    """-> (the offset of the data set, the transfer syntax): the file meta group (0002,xxxx) after 'DICM' is explicit
    VR little endian whatever the syntax of the rest, so it is read here without pydicom (which would inflate the
    data set of a deflated file first)."""
    pos, ts = 132, "1.2.840.10008.1.2"
    while raw[pos:pos + 2] == b"\x02\x00" and pos + 8 <= len(raw):
        long_vr = raw[pos + 4:pos + 6] in _LONG_VRS
        start = pos + (12 if long_vr else 8)
        end = start + int.from_bytes(raw[pos + 8:pos + 12] if long_vr else raw[pos + 6:pos + 8], "little")
        if raw[pos + 2:pos + 4] == b"\x10\x00":  # (0002,0010) TransferSyntaxUID, a UID padded with NUL or space
            ts = raw[start:end].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = end
    return pos, ts


def _check_inflated_size(raw, limit):
    """pydicom inflates a deflated data set whole (one zlib.decompress) before it reads a header field, and 300 KB of
    deflated zeros are a 1 GB element: inflate it here first, in 1 MB pieces that are counted and dropped."""
    z, rest, n, piece = zlib.decompressobj(-zlib.MAX_WBITS), raw[_dicom_meta(raw)[0]:], 0, 1 << 20
    while True:
        try:
            out = z.decompress(rest, piece)
        except zlib.error as e:
            raise BadInput(f"the deflated DICOM data set cannot be inflated ({e}): the file is damaged or "
                           f"truncated") from None
        n, rest = n + len(out), z.unconsumed_tail
        if n > limit:
            raise BadInput(f"the deflated DICOM data set inflates to more than {limit:,} bytes, more than an image "
                           f"within this server's --max_pixels holds: send an uncompressed DICOM, PNG or JPEG", 413)
        if z.eof or (not rest and len(out) < piece):
            return


def _check_dicom(raw, max_pixels):
    try:
        import pydicom
    except ImportError:
        raise BadInput("reading DICOM needs pydicom on the server (pip install pydicom); send a PNG or JPEG instead", 415) from None
    limit = max_pixels * _DICOM_BYTES_PER_PIXEL
    ts = _dicom_meta(raw)[1]
    if ts == _DEFLATED:
        _check_inflated_size(raw, limit + (1 << 20))  # + 1 MB for the elements besides the pixels
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
    except Exception as e:  # pydicom raises many types for damaged headers
        raise BadInput(f"the DICOM header cannot be read ({type(e).__name__}): the file is damaged or truncated") from None
    # every frame is decoded (pydicom's pixel_array), so the frames count against the pixel limit
    if rows * cols * frames > max_pixels:
        raise BadInput(f"the DICOM image is {cols} x {rows} pixels x {frames} frame(s) = {rows * cols * frames:,} "
                       f"pixels, beyond this server's --max_pixels={max_pixels:,}: downscale it (or send one frame) "
                       f"first", 413)
    size = rows * cols * frames * samples * -(-bits // 8)
    if size > limit:
        raise BadInput(f"the DICOM declares {cols} x {rows} x {frames} frame(s) x {samples} sample(s) x {bits} bits = "
                       f"{size:,} bytes of pixels, beyond this server's {limit:,} (--max_pixels x "
                       f"{_DICOM_BYTES_PER_PIXEL} bytes): send it as an 8- or 16-bit gray image", 413)
    return ts


def decode_upload(raw, size, max_pixels):
    """Bytes of a PNG/JPEG/DICOM -> uint8 (size, size), exactly as evaluate.py --image / data.py prepare decode a file."""
    from PIL import Image
    if not raw:
        raise BadInput("the upload is empty: send an X-ray as the multipart field 'file'")
    is_dicom = len(raw) > 132 and raw[128:132] == b"DICM"
    if is_dicom:
        ts = _check_dicom(raw, max_pixels)
        suffix = ".dcm"
    else:
        try:
            with Image.open(io.BytesIO(raw), formats=UPLOAD_FORMATS) as img:
                w, h, fmt = img.size[0], img.size[1], img.format
        except Image.DecompressionBombError:
            raise BadInput(f"the image is far beyond this server's --max_pixels={max_pixels:,}: downscale it first", 413) from None
        except Exception:
            raise BadInput("the upload is not an image this server reads: send a PNG, JPEG or DICOM file", 415) from None
        if w * h > max_pixels:
            raise BadInput(f"the image is {w} x {h} = {w * h:,} pixels, beyond this server's --max_pixels={max_pixels:,}: "
                           f"downscale it first", 413)
        suffix = {"PNG": ".png", "JPEG": ".jpg"}.get(fmt, "." + (fmt or "img").lower())
    # data.decode_image reads a path (the suffix picks DICOM vs PIL): the same bytes through the same code as a file
    fd, path = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        return _decode_file(path, size, ts if is_dicom else None)
    finally:
        os.remove(path)


def _decode_file(path, size, dicom_ts):
    # PIL raises OSError/SyntaxError/ValueError/EOFError on damaged files; pydicom raises almost anything on damaged
    # or compressed pixel data (no handler, a handler that fails): both are the upload's fault, answered with a 4xx
    failures = Exception if dicom_ts is not None else (OSError, SyntaxError, ValueError, EOFError)
    try:
        return load_image(path, size)
    except failures as e:
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'}"
        if dicom_ts is not None and dicom_ts not in _DICOM_NATIVE:
            raise BadInput(f"DICOM transfer syntax {dicom_ts} (compressed) cannot be decoded on this server ({detail}): "
                           f"send an uncompressed DICOM, PNG or JPEG", 415) from None
        raise BadInput(f"the image cannot be decoded ({detail}): the file is truncated or damaged", 400) from None


# -----------------------------------------------------------------------------
# the models: runs.load_run / runs.predict / runs.model_input (the numbers evaluate.py prints), cam.py's heatmaps,
# the CLIP input and caption encoder of runs.py, model_gpt.py


# the flag that reads each checkpoint family (common.checkpoint_script names a file's family), and how to make one
FLAGS = {"--classifier": (("train.py", "export.py"), "python train.py config/quickstart.py and point --classifier at "
                                                     "out/<run>/best.pt"),
         "--clip": (("train_clip.py",), "python train_clip.py config/clip_phantom.py and point --clip at "
                                       "out/<run>/ckpt.pt or best.pt"),
         "--gpt": (("train_gpt.py",), "python train_gpt.py config/gpt_report_from_image.py and point --gpt at "
                                     "out/<run>/ckpt.pt")}


def read_checkpoint(flag, path):
    """The checkpoint a flag names; a missing file, or one of a family another flag reads, is a sentence naming the
    flag that does (a CLIP given as --classifier is a mistake in the command line, not in the file)."""
    families, how = FLAGS[flag]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}={path} not found: train one ({how})")
    ck = common.load_checkpoint(path)
    script = common.checkpoint_script(ck)
    if script not in families:
        other = next((f for f, (fam, _) in FLAGS.items() if script in fam), None)
        raise ValueError(f"{flag}: {path} is a {script} checkpoint; " +
                         (f"pass it as {other}={path}" if other else f"serve.py reads {', '.join(FLAGS)} checkpoints"))
    return ck


def load_classifier(path, rule, target_sensitivity, dev):
    read_checkpoint("--classifier", path)  # its family; load_run then reads it again (a few MB at start-up)
    net, meta, config = runs.load_run(path, dev, reader="serve.py")
    ck = {"model_args": net.model_args, "meta": meta, "config": config, "iter": net.run_info.get("iter")}
    size = net.model_args.get("image_size", 224)
    x = runs.model_input(torch.zeros(1, 1, size, size, dtype=torch.uint8, device=dev), meta, net.model_args)
    method, target = find_cam_target(net, x)
    thresholds, source = classifier_thresholds(net, meta, rule, target_sensitivity, dev)
    return {"net": net, "ck": ck, "size": size, "classes": list(meta["classes"]), "task": meta["task"],
            "cam": (method, target), "thresholds": thresholds, "threshold_source": source, "path": path}


def classifier_thresholds(net, meta, rule, target_sensitivity, dev):
    """The operating point per class, chosen on the checkpoint's own validation split as evaluate.py does."""
    C = len(meta["classes"])
    if meta["task"] == "multiclass":
        return None, "argmax (multiclass)"
    d = meta.get("data_dir", "")
    if rule == "none" or not d or not os.path.exists(os.path.join(d, "val_labels.npy")):
        why = "threshold=none" if rule == "none" else f"the validation split {d or '(unknown)'} is not on this machine"
        return [0.5] * C, f"0.5 for every class ({why})"
    vs = data.PreparedSplit(d, "val")
    if list(vs.meta["classes"]) != list(meta["classes"]):
        return [0.5] * C, f"0.5 for every class ({d} has other classes than the checkpoint)"
    with torch.inference_mode():
        vp = runs.predict(net, vs.images, meta, 64, device=dev)
    thr = metrics.choose_thresholds(vp, np.asarray(vs.labels, dtype=np.float32), rule, target_sensitivity)
    return [float(t) for t in thr], f"{d} val ({len(vs)} images), {rule}"


def classify_batch(m, u8s, n_top):
    """uint8 (B, S, S) -> per image: probabilities (C,), the top classes, their heatmaps (n_top, S, S)."""
    meta = m["ck"]["meta"]
    with torch.inference_mode():
        probs = runs.predict(m["net"], u8s, meta, len(u8s), device=m["dev"])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :n_top]
    # heatmaps of all images' top classes in one pass; Grad-CAM needs autograd, hence outside inference_mode
    x = runs.model_input(torch.from_numpy(np.ascontiguousarray(u8s))[:, None].to(m["dev"]), meta, m["net"].model_args)
    xs = x.repeat_interleave(n_top, 0)
    maps = heatmaps(m["net"], xs, top.reshape(-1).tolist(), *m["cam"]).reshape(len(u8s), n_top, *xs.shape[-2:])
    return [(probs[i], top[i], maps[i]) for i in range(len(u8s))]


def load_clip(path, dev):
    ck = read_checkpoint("--clip", path)
    cfg = ck["config"]
    net = model_clip.build_clip(**ck["model_args"])
    net.load_state_dict(ck["model"])
    net.to(dev).eval()
    tok = tok_lib.build_tokenizer(cfg["tokenizer"], cfg["tokenizer_path"], cfg["context_length"], None,
                                  cfg["bpe_vocab_size"], saved=ck.get("tokenizer"))
    return {"net": net, "ck": ck, "cfg": cfg, "tok": tok, "size": ck["model_args"]["image_size"], "path": path}


def clip_images(m, u8s):
    x = runs.images_to_float(torch.from_numpy(np.ascontiguousarray(u8s))[:, None].to(m["dev"]), m["ck"]["meta"], m["cfg"])
    return m["net"].encode_image(x).float().cpu()


def clip_texts(m, texts):
    return runs.encode_texts(m["net"], m["tok"], texts, m["cfg"], m["dev"])


def build_index(m, data_dir, split_name, n):
    """Image and report features of the first n rows of a prepared split, once at start-up."""
    s = data.PreparedSplit(data_dir, split_name)
    if s.meta["image_size"] != m["size"]:
        raise ValueError(f"--index={data_dir} holds {s.meta['image_size']} px images but the CLIP in {m['path']} takes "
                         f"{m['size']} px: prepare the index at --image_size={m['size']}")
    n = len(s) if n <= 0 else min(n, len(s))
    texts = [r.get("text", "") for r in s.index[:n]]
    with torch.inference_mode():
        img = torch.cat([clip_images(m, np.array(s.images[a:a + 256])) for a in range(0, n, 256)]) if n else torch.zeros(0)
        txt = clip_texts(m, texts) if any(texts) else None
    first = {}
    for i, t in enumerate(texts):
        if t:
            first.setdefault(t, i)  # identical reports are listed once
    return {"split": s, "n": n, "img": img, "txt": txt, "texts": texts, "distinct": torch.tensor(sorted(first.values())),
            "paths": [r.get("path", "") for r in s.index[:n]], "data_dir": data_dir, "name": split_name}


def load_gpt(path, dev):
    ck = read_checkpoint("--gpt", path)
    net = GPT(gpt_config_from_dict(ck["model_args"]))
    net.load_state_dict(ck["model"])
    if net.config.n_prefix == 0:
        raise ValueError(f"--gpt={path} is a text-only model (cond='none'); /v1/report needs one trained with --cond=image")
    net.to(dev).eval()
    d = ck.get("meta") or ck.get("data") or {}  # the common checkpoint schema's meta (older GPT checkpoints: data)
    classes = d.get("classes") or [f"class {k}" for k in range(net.config.n_classes)]
    return {"net": net, "ck": ck, "tok": tok_lib.from_dict(ck["tokenizer"]), "size": ck["model_args"]["image_size"],
            "classes": classes, "path": path}


def write_report(m, u8, max_tokens):
    """Greedy report for one uint8 (S, S) image, and the finding head's tags (as sample.py --image shows them)."""
    net, tok, d = m["net"], m["tok"], m["ck"].get("meta") or m["ck"].get("data") or {}
    with torch.inference_mode():
        x = (torch.from_numpy(u8)[None, None].to(m["dev"]).float() / 255.0 - d["mean"]) / d["std"]
        tags = []
        if net.config.n_classes > 0:
            p = net.classify(x)[0].cpu()
            thr = net.prefix.thresholds.cpu() if net.config.finding_tags == "hard" else torch.full_like(p, 0.5)
            tags = [{"finding": c, "probability": float(p[k]), "threshold": float(thr[k]), "present": bool(p[k] >= thr[k])}
                    for k, c in enumerate(m["classes"])]
            tags.sort(key=lambda t: -t["probability"])
        idx = torch.tensor([[tok.eot_id]], device=m["dev"])  # eot = start of a document, as in the training files
        out = net.generate(idx, max_tokens, temperature=0.0, eos=tok.eot_id, images=x)[0, 1:].tolist()
    if tok.eot_id in out:
        out = out[:out.index(tok.eot_id)]
    return tok.decode(out), tags


def run_model_card(ckpt_path):
    """The model card evaluate.py wrote beside a checkpoint: {"model_card": its JSON, "model_card_md": its markdown}
    ({} when the run folder has no model_card.json), for /v1/models and the page's link."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    path = os.path.join(folder, "model_card.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        out = {"model_card": json.load(f)}
    md = os.path.join(folder, "model_card.md")
    if os.path.exists(md):
        with open(md, encoding="utf-8") as f:
            out["model_card_md"] = f.read()
    return out


# -----------------------------------------------------------------------------
# the worker: one thread runs every model call (in order), batching classify requests when max_batch > 1


class Worker:
    def __init__(self, service, max_batch, wait_s):
        self.service, self.max_batch, self.wait_s = service, max_batch, wait_s
        self.jobs, self.stopped = queue.Queue(), False
        self.batches = []  # sizes of the classify batches run (for /v1/models and the tests)
        self.thread = threading.Thread(target=self._loop, name="serve-worker", daemon=True)
        self.thread.start()

    def submit(self, kind, payload):
        fut = concurrent.futures.Future()
        self.jobs.put((kind, payload, fut))
        return fut

    def close(self):
        self.stopped = True
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _loop(self):
        held = []
        while True:
            job = held.pop(0) if held else self.jobs.get()
            if job is None:
                return
            kind, payload, fut = job
            if kind != "classify":
                self._run(fut, getattr(self.service, "_" + kind), payload)
                continue
            batch = [job]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None or nxt[0] != "classify":
                    held.append(nxt)
                    break
                batch.append(nxt)
            self.batches.append(len(batch))
            try:
                results = self.service._classify([p for _, p, _ in batch])
            except Exception as e:  # the requests see the error; the worker keeps serving
                for _, _, f in batch:
                    f.set_exception(e)
                continue
            for (_, _, f), r in zip(batch, results):
                f.set_result(r)

    @staticmethod
    def _run(fut, fn, payload):
        try:
            fut.set_result(fn(payload))
        except Exception as e:
            fut.set_exception(e)


class Service:
    """The loaded models, the index and the worker; the HTTP layer only parses requests and calls these."""

    def __init__(self, cfg):
        self.cfg = cfg
        dev = cfg["device"]
        if cfg["threads"] > 0:
            torch.set_num_threads(cfg["threads"])
        self.models, self.index = {}, None
        if cfg["classifier"]:
            self.models["classifier"] = load_classifier(cfg["classifier"], cfg["threshold"], cfg["target_sensitivity"], dev)
        if cfg["clip"]:
            self.models["clip"] = load_clip(cfg["clip"], dev)
        if cfg["gpt"]:
            self.models["gpt"] = load_gpt(cfg["gpt"], dev)
        for m in self.models.values():
            m["dev"], m["sha256"] = dev, sha256(m["path"])
        if cfg["index"]:
            if "clip" not in self.models:
                raise ValueError("--index needs --clip=<a train_clip.py checkpoint> to encode it")
            t0 = time.time()
            self.index = build_index(self.models["clip"], cfg["index"], cfg["split"], cfg["index_size"])
            self.index["seconds"] = time.time() - t0
        elif "clip" in self.models:
            raise ValueError("--clip needs --index=data/<name> (a prepared folder with report texts) to search in")
        self.worker = Worker(self, max(1, cfg["max_batch"]), cfg["batch_wait_ms"] / 1000.0)

    def close(self):
        self.worker.close()

    def need(self, name, flag):
        if name not in self.models:
            raise BadInput(f"this server runs without a {name} model: start it with {flag}=<checkpoint>", 404)
        return self.models[name]

    # --- run in the worker thread

    def _classify(self, u8s):
        m = self.models["classifier"]
        n_top = min(self.cfg["top_findings"], len(m["classes"]))
        out = []
        for (probs, top, maps), u8 in zip(classify_batch(m, np.stack(u8s), n_top), u8s):
            out.append(self._classify_json(m, probs, top, maps, u8))
        return out

    def _classify_json(self, m, probs, top, maps, u8):
        classes, thr = m["classes"], m["thresholds"]
        rows = [{"finding": c, "probability": float(probs[k]), "threshold": None if thr is None else thr[k],
                 "positive": bool(k == int(np.argmax(probs))) if thr is None else bool(probs[k] >= thr[k])}
                for k, c in enumerate(classes)]
        rows.sort(key=lambda r: -r["probability"])
        return {"model": m["ck"]["model_args"].get("model"), "task": m["task"], "classes": classes,
                "probabilities": [float(p) for p in probs], "thresholds": thr, "threshold_source": m["threshold_source"],
                "findings": rows, "positive": [r["finding"] for r in rows if r["positive"]],
                "heatmap_method": m["cam"][0], "image": png_base64(u8),
                "heatmaps": [{"finding": classes[int(c)], "probability": float(probs[int(c)]),
                              # drawn at the class's probability, as evaluate.py --image does: a map of a finding
                              # the model rules out is not a saturated overlay
                              "png": png_base64(overlay(u8, maps[j], strength=float(probs[int(c)])))}
                             for j, c in enumerate(top)]}

    def _search(self, req):
        m, ix = self.models["clip"], self.index
        k = req["top_k"]
        with torch.inference_mode():
            if req.get("query") is not None:  # ranked against "No <query>." (runs.rank_by_query), like train_clip.py --query
                score, neg = runs.rank_by_query(m["net"], m["tok"], ix["img"], req["query"], m["cfg"], m["dev"])
                kind = "text"
            else:
                q = clip_images(m, req["u8"][None])[0]
                score, neg, kind = ix["img"] @ q, "", "image"
        out = {"query": req.get("query"), "negative": neg, "kind": kind,
               "index": f"{ix['data_dir']} {ix['name']} ({ix['n']} rows)"}
        scores, order = score.topk(min(k, ix["n"]))
        out["images"] = [self._hit(int(i), float(s)) for s, i in zip(scores, order)]
        if kind == "image" and ix["txt"] is not None:
            cand = ix["distinct"]
            scores, order = (ix["txt"][cand] @ q).topk(min(k, len(cand)))
            out["reports"] = [self._hit(int(cand[o]), float(s)) for s, o in zip(scores, order)]
        return out

    def _hit(self, row, score):
        ix = self.index
        return {"row": row, "score": score, "report": ix["texts"][row], "source": ix["paths"][row],
                "image_url": f"/v1/index/{row}.png"}

    def _report(self, u8):
        m = self.models["gpt"]
        text, tags = write_report(m, u8, self.cfg["max_new_tokens"])
        return {"report": text, "tags": tags, "present": [t["finding"] for t in tags if t["present"]],
                "finding_tags": m["net"].config.finding_tags}

    # --- provenance

    def describe(self):
        out = {}
        for name, m in self.models.items():
            ck = m["ck"]
            d = {"path": os.path.abspath(m["path"]), "sha256": m["sha256"], "image_size": m["size"],
                 "iter": ck.get("iter", ck.get("iter_num"))}
            if name == "classifier":
                d.update(model=ck["model_args"].get("model"), task=m["task"], classes=m["classes"],
                         thresholds=m["thresholds"], threshold_source=m["threshold_source"], heatmaps=m["cam"][0],
                         data_dir=ck["meta"].get("data_dir"))
            elif name == "clip":
                d.update(image_model=ck["model_args"].get("image_model"), text_model=ck["model_args"].get("text_model"),
                         tokenizer=m["cfg"]["tokenizer"], data_dir=ck["meta"].get("data_dir"))
            else:
                d.update(classes=m["classes"], finding_tags=m["net"].config.finding_tags, data_dir=(ck.get("meta") or ck.get("data") or {}).get("data_dir"),
                         n_layer=m["net"].config.n_layer, n_embd=m["net"].config.n_embd)
            d.update(run_model_card(m["path"]))
            out[name] = d
        if self.index is not None:
            ix = self.index
            out["index"] = {"data_dir": os.path.abspath(ix["data_dir"]), "split": ix["name"], "rows": ix["n"],
                            "encode_seconds": round(ix["seconds"], 2)}
        b = self.worker.batches
        out["server"] = {"max_batch": self.worker.max_batch, "classify_batches": {
                             "count": len(b), "max": max(b, default=0), "mean": round(float(np.mean(b)), 2) if b else 0.0}, "max_pixels": self.cfg["max_pixels"],
                         "max_upload_mb": self.cfg["max_upload_mb"], "device": self.cfg["device"],
                         "torch_threads": torch.get_num_threads(), "notice": "research demo, not a medical device"}
        return out


# -----------------------------------------------------------------------------
# the HTTP layer


def build_app(argv=None):
    """The FastAPI app for `python serve.py [argv]` (tests drive it with TestClient; main() runs it with uvicorn)."""
    fastapi = _fastapi()
    from fastapi import File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)
    if not (cfg["classifier"] or cfg["clip"] or cfg["gpt"]):
        raise ValueError("give at least one model: --classifier=out/<run>/best.pt, --clip=... (with --index=...) or --gpt=...")
    service = Service(cfg)
    app = fastapi.FastAPI(title="nanorad serve", description="research demo, not a medical device")
    app.state.service = service
    limit = int(cfg["max_upload_mb"] * 2 ** 20)
    with open(os.path.join(HERE, "serve.html"), encoding="utf-8") as f:
        page = f.read()

    def error(status, message):
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(BadInput)
    async def bad_input(request, exc):
        return error(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_form(request, exc):
        fields = sorted({str(e.get("loc", ["", "?"])[-1]) for e in exc.errors()})
        return error(422, f"the request lacks or mangles the form field(s) {', '.join(fields)}: send multipart/form-data "
                          f"with the image as 'file' (search: 'query' or 'file')")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        # browsers, curl and httpx send Content-Length with a form; a body without one is refused rather than buffered
        if request.method == "POST":
            n = request.headers.get("content-length")
            if n is None:
                return error(411, "send the request with a Content-Length header (chunked uploads are not accepted)")
            if not n.isdigit() or int(n) > limit:
                return error(413, f"the request body ({n} bytes) is beyond this server's --max_upload_mb={cfg['max_upload_mb']:g}")
        return await call_next(request)

    async def image_of(file, size):
        import asyncio
        raw = await file.read()
        # decoding (a 3000 px PNG: ~0.1 s) runs in a thread too, so the event loop keeps answering meanwhile
        return await asyncio.to_thread(decode_upload, raw, size, cfg["max_pixels"])

    async def run(kind, payload):
        import asyncio
        return await asyncio.wrap_future(service.worker.submit(kind, payload))

    @app.get("/", response_class=HTMLResponse)
    async def index_page():
        return page

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "models": sorted(service.models), "worker_alive": service.worker.thread.is_alive()}

    @app.get("/v1/models")
    async def models():
        return service.describe()

    @app.post("/v1/classify")
    async def classify(file: UploadFile = File(...)):
        m = service.need("classifier", "--classifier")
        return await run("classify", await image_of(file, m["size"]))

    @app.post("/v1/search")
    async def search(query: str = Form(None), file: UploadFile = File(None), top_k: int = Form(0)):
        m = service.need("clip", "--clip")
        k = top_k if top_k > 0 else cfg["top_k"]
        if not 1 <= k <= 50:
            raise BadInput(f"top_k={k} must be between 1 and 50")
        if file is not None and query is None:
            return await run("search", {"u8": await image_of(file, m["size"]), "top_k": k})
        if query is None or not query.strip():
            raise BadInput("the search query is empty: send a text 'query' (like 'left pleural effusion') or an image 'file'")
        if len(query) > 2000:
            raise BadInput(f"the query is {len(query)} characters long; 2000 is the limit")
        return await run("search", {"query": query.strip(), "top_k": k})

    @app.post("/v1/report")
    async def report(file: UploadFile = File(...)):
        m = service.need("gpt", "--gpt")
        return await run("report", await image_of(file, m["size"]))

    @app.get("/v1/index/{row}.png")
    async def index_image(row: int):
        ix = service.index
        if ix is None or not 0 <= row < ix["n"]:
            raise BadInput(f"no index row {row}" + ("" if ix is None else f" (the index has rows 0..{ix['n'] - 1})"), 404)
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(np.array(ix["split"].images[row])).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.on_event("shutdown")
    def shutdown():
        service.close()

    return app


def main(argv=None):
    app = build_app(argv)
    import uvicorn
    cfg = app.state.service.cfg
    desc = app.state.service.describe()
    print(json.dumps({k: {kk: v for kk, v in d.items() if kk in ("path", "rows", "threshold_source", "iter")}
                      for k, d in desc.items() if k != "server"}, indent=1))
    print(f"serving on http://{cfg['host']}:{cfg['port']}/ (research demo, not a medical device)", flush=True)
    uvicorn.run(app, host=cfg["host"], port=cfg["port"], log_level="warning")


if __name__ == "__main__":
    configurator.cli(main)
