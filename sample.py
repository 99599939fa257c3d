"""
Generate text from a train_gpt.py checkpoint: continue a prompt, or write a report for an image.

    python sample.py --out_dir=out/gpt_phantom_reports --start="Chest radiograph shows" --num_samples=3
    python sample.py --out_dir=out/gpt_report_from_image --image=path/to/cxr.png     # image-conditioned model
    python sample.py --out_dir=out/gpt_report_from_image --image=val:0               # row 0 of the pairs' val split
    python sample.py --out_dir=out/gpt_roco --start=FILE:prompt.txt --top_p=0.9 --temperature=0.8

--start="" (default) starts a new document (the end-of-text token). temperature 0 is greedy; top_k and top_p
filter the distribution before sampling. Prints each sample and the generation speed in tokens/s.
"""

import os
import sys
import time

import numpy as np
import torch

import common
import configurator
import data as data_lib
import runs
import text_data
import tokenizer as tok_lib

# -----------------------------------------------------------------------------
# config

out_dir = "out/gpt"  # folder with ckpt.pt from train_gpt.py
ckpt_path = ""  # a checkpoint file instead of out_dir/ckpt.pt
start = ""  # prompt text, or FILE:path; "" = start of a document
image = ""  # image-conditioned model: a PNG/JPEG/DICOM path, or val:N / test:N (row N of the training pairs)
num_samples = 3
max_new_tokens = 200
temperature = 0.8  # 0 = greedy; <1 sharper, >1 more random
top_k = 0  # keep the k most likely tokens (0 = off)
top_p = 0.95  # nucleus: the smallest set with this much probability (1.0 = off)
stop_at_eot = True  # end a sample at the end-of-text token
use_cache = True  # KV cache (False: recompute the whole context every token, to compare speed)
seed = 1337
device = "auto"
dtype = "auto"

DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per knob; CHECKS: across knobs)
RANGES = dict(temperature="[0, inf)")

# -----------------------------------------------------------------------------


def load_model(cfg):
    path = cfg["ckpt_path"] or os.path.join(cfg["out_dir"], "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found; train one with: python train_gpt.py config/gpt_phantom_reports.py "
                                f"--out_dir={cfg['out_dir']}")
    model, data_info, _ = runs.load_run(path, reader="sample.py")
    return model, tok_lib.from_dict(model.run_info["tokenizer"]), data_info


def load_image(spec, data, image_size):
    """uint8 (1, 1, S, S) from 'val:N' (the checkpoint's pairs data) or an image file resized like data.py would."""
    if ":" in spec and spec.split(":")[0] in ("train", "val", "test") and spec.split(":")[1].isdigit():
        split, row = spec.split(":")
        pairs = text_data.Pairs(data.get("data_dir") or data["dir"], split)
        r = int(row)
        print(f"reference report ({spec}): {pairs.index[r]['text']}")
        return np.array(pairs.images[r])[None, None]  # a writable copy of the memmap row
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--image={spec!r} is neither a file nor val:N / test:N")
    a = data_lib.decode_image(spec, image_size)  # DICOM/PNG/JPEG, padded to a square as prepare does
    return np.asarray(a, dtype=np.uint8)[None, None]


def main(argv=None):
    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)
    device = common.resolve_device(cfg["device"])
    dtype = common.resolve_dtype(cfg["dtype"], device)
    torch.manual_seed(cfg["seed"])
    model, tok, data_info = load_model(cfg)
    model.eval().to(device)
    # temperature 0 is greedy decoding: every sample would be the same text, so there is one
    n_samples = 1 if cfg["temperature"] == 0 else cfg["num_samples"]
    if n_samples < cfg["num_samples"]:
        print(f"temperature=0 is greedy (deterministic): 1 sample instead of num_samples={cfg['num_samples']}")

    images = None
    if cfg["image"]:
        if model.config.n_prefix == 0:
            raise ValueError("--image given but the checkpoint is a text-only model (trained with cond='none')")
        u8 = load_image(cfg["image"], data_info, model.model_args["image_size"])
        images = data_lib.to_float(torch.from_numpy(u8).to(device), data_info["mean"], data_info["std"],
                                   model.config.in_chans).expand(n_samples, -1, -1, -1)  # one row per sample
        if model.config.n_classes > 0:  # what the finding head sees: the tags the report is conditioned on
            with torch.no_grad():
                p = model.classify(images[:1])[0].cpu()
            thr = model.prefix.thresholds.cpu()
            hard = model.config.finding_tags == "hard"
            names = data_info.get("classes") or [f"class {k}" for k in range(len(p))]
            print("findings (head probability" + (", threshold" if hard else "") + "): " + ", ".join(
                f"{n} {p[k]:.2f}" + (f"{'>=' if p[k] >= thr[k] else '<'}{thr[k]:.2f}" if hard else "")
                for k, n in enumerate(names) if p[k] >= 0.1 or (hard and p[k] >= thr[k])))
    elif model.config.n_prefix > 0:
        raise ValueError("this checkpoint writes reports from images: pass --image=path.png (or --image=val:0)")

    text = cfg["start"]
    if text.startswith("FILE:"):
        with open(text[5:], encoding="utf-8") as f:
            text = f.read()
    ids = [tok.eot_id] + tok.encode(text)  # eot = start of a document, as in the training files
    idx = torch.tensor([ids] * n_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])

    t0 = time.perf_counter()
    with torch.no_grad(), common.autocast(device, dtype):
        out = model.generate(idx, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
                             top_p=cfg["top_p"], eos=tok.eot_id if cfg["stop_at_eot"] else None, images=images,
                             use_cache=cfg["use_cache"], generator=gen)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    samples = []
    for row in out[:, len(ids):].tolist():
        if cfg["stop_at_eot"] and tok.eot_id in row:
            row = row[: row.index(tok.eot_id)]
        samples.append(text + tok.decode(row))
    n_new = (out.size(1) - len(ids)) * out.size(0)
    for s in samples:
        print(s)
        print("---------------")
    print(f"{n_new} tokens in {dt:.2f}s: {n_new / dt:,.0f} tokens/s ({'KV cache' if cfg['use_cache'] else 'no cache'}, {device})")
    return samples


if __name__ == "__main__":
    configurator.cli(main)
