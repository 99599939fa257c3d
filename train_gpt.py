"""
Train a GPT on radiology captions and reports (text only), or write reports from images
(cond='image': n_prefix visual tokens from an image encoder before the text; loss on report tokens only).

Prepare data first (text_data.py; the phantom sets are prepared automatically when missing):
    python text_data.py --dataset=phantom_reports --tokenizer=bpe --vocab_size=1024
    python text_data.py --dataset=roco_text --root=/data/roco --tokenizer=bpe --vocab_size=8192

CPU quick run (a few minutes; val loss well below the unigram entropy it prints):
    python train_gpt.py config/gpt_phantom_reports.py
Report from image on the phantom (CPU, ~10 min; prints BLEU-4, ROUGE-L, finding macro-F1):
    python train_gpt.py config/gpt_report_from_image.py
One GPU:
    python train_gpt.py config/gpt_roco.py
Four GPUs on one node (gradient_accumulation_steps is global: each rank does 1/4 of it):
    torchrun --standalone --nproc_per_node=4 train_gpt.py config/gpt_roco.py
Two nodes x 8 GPUs (run on both, --node_rank=0 on the master, 1 on the other):
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
        train_gpt.py config/gpt_pubmed_pretrain.py
Two stages: pretrain on PubMed abstracts, then finetune on ROCO captions (same tokenizer):
    python train_gpt.py config/gpt_pubmed_pretrain.py
    python train_gpt.py config/gpt_roco_finetune.py --pretrained_path=out/gpt_pubmed/ckpt.pt
From OpenAI's GPT-2 (a local Hugging Face directory; data tokenized with --tokenizer=gpt2):
    python train_gpt.py config/gpt_roco.py --init_from=pretrained --pretrained_path=/models/gpt2 --dataset=roco_gpt2
Resume: same command with --init_from=resume (reads out_dir/ckpt.pt; batches depend only on (seed, step)); with no
checkpoint yet it starts from scratch.
Sample: python sample.py --out_dir=out/gpt_phantom_reports --start="Chest radiograph shows"

Eval prints val loss, perplexity and bits per byte (nats summed over the val tokens / ln 2 / their UTF-8
bytes: comparable across tokenizers); cond='image' adds BLEU-4, ROUGE-L and the finding macro-F1 of
greedy reports for eval_reports val images.
"""

import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as tdist

import common
import configurator
import data
import metrics
import model as models
import text_data
import tokenizer as tok_lib
import tracking
from model_gpt import GPT, GPTConfig, gpt_config_from_dict, gpt_config_to_dict

# -----------------------------------------------------------------------------
# config: every knob, its unit and a rule of thumb; config/gpt_*.py and --key=value override them

# I/O
out_dir = "out/gpt"
eval_interval = 250  # steps between evaluations (+ checkpoint); the last step always evaluates
log_interval = 10  # steps between log lines
eval_max_windows = 200  # val windows of block_size tokens (0 = every token of val.bin)
eval_reports = 64  # cond='image': images to write a report for at each eval (greedy), from report_split; 0 = off
report_split = "val"  # cond='image': the split those images come from (test when finding_tags='hard': its thresholds
#                       are chosen on val, so scoring the reports on val would grade them on the images that tuned them)
eval_only = False  # evaluate the init_from model and exit
select_metric = "val_loss"  # best.pt keeps the best of: val_loss | val_bpb | bleu4 | macro_f1 | any key of the eval record
early_stop_patience = 0  # stop after this many evals without improvement; 0 = off
keep_last = 0  # also keep the last k periodic checkpoints ckpt_<iter>.pt
init_from = "scratch"  # scratch | resume (out_dir/ckpt.pt) | pretrained (pretrained_path's weights, fresh optimizer, step 0)
pretrained_path = ""  # pretrained: a train_gpt.py ckpt.pt (or its folder), or a Hugging Face GPT-2 folder (config.json)
globals().update(tracking.KNOBS)  # tensorboard, trackers, mlflow_uri, mlflow_experiment, wandb_project, wandb_mode,
# track_checkpoints: the tracker knobs, the same for every train script (defaults and meaning in tracking.py)
overwrite = False  # True: a fresh run may replace the run already in out_dir (its checkpoints and metrics are removed)
allow_data_change = False  # True: init_from=resume may continue on data other than the checkpoint's (the best so far is reset)
# data
dataset = "phantom_reports"  # name under data/ (phantom_reports / phantom_pairs are prepared when missing)
data_dir = ""  # default data/<dataset>
cond = "none"  # none: language model on text | image: report from an image (a pairs dataset)
batch_size = 32  # sequences per micro-batch per rank
gradient_accumulation_steps = 1  # global: each of N ranks does gradient_accumulation_steps // N micro-steps
block_size = 256  # tokens per training window (text); cond='image' uses n_prefix + the report length instead
# model
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0  # 0 for pretraining; 0.1-0.2 when finetuning on little data
bias = False  # biases in Linear/LayerNorm (GPT-2 checkpoints need True; init_from=gpt2 sets it)
pos = "learned"  # learned | alibi (evaluates past block_size) | rope
grad_checkpoint = False  # recompute blocks in backward: less activation memory, ~30% more compute
n_prefix = 16  # cond='image': visual tokens (a square for image_encoder='conv')
image_encoder = "conv"  # conv | a model.py build_model name (e.g. convnext_atto) used as the prefix backbone
prefix_width = 128  # conv encoder channels / features per visual token
aux_cls_weight = 0.0  # cond='image': weight of the auxiliary finding loss (BCE of a head on the visual tokens vs the
#                       pairs' labels) added to the LM loss; ~1 makes the image encoder learn the findings first
token_dropout = 0.0  # cond='image': fraction of report input tokens replaced by random ids (word dropout), so the
#                      model cannot write the report from the text so far alone and must read the image; ~0.1-0.3
image_init = ""  # cond='image' with image_encoder = a model.py name: start the encoder from these weights (a train.py
#                  best.pt, timm/torchvision files); its classifier head becomes the token projection (+ the finding
#                  head: a train.py head over the same classes is kept for those rows)
tag_forcing = 0.0  # cond='image' with a finding head: fraction of training rows whose finding tokens are the true
#                   labels instead of the head's (teacher forcing of the tags): the language model learns to write what
#                   the tags say, so the reports follow the head's decisions at generation (eval: always the head's)
prefix_lr_mult = 1.0  # cond='image': lr multiplier of the image encoder + mapping network (a from-scratch encoder: 1-3)
finding_tags = "soft"  # cond='image' with a finding head: soft (token = mix by the head's probability) | hard (token =
#                       the decision p >= threshold, per class the F1-best threshold on the val split, re-chosen at
#                       every eval: the reports then name what the head calls at its operating point)
# optimizer (AdamW; decay on >= 2-D weights)
learning_rate = 6e-4  # peak; ~1e-3 small models, 6e-4 GPT-2 small, 3e-5..1e-4 finetuning
max_iters = 5000  # optimizer steps
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95  # 0.95 for large batches of tokens (GPT-3); 0.99 for tiny runs
grad_clip = 1.0  # max global grad norm; 0 = off
decay_lr = True
warmup_iters = 200  # ~1-5% of max_iters
plateau_iters = 0  # constant lr after warmup before the cosine
lr_decay_iters = 0  # end of the cosine; 0 = max_iters
min_lr = 6e-5  # ~learning_rate / 10 (Chinchilla)
# system
device = "auto"  # auto | cpu | cuda | cuda:1
dtype = "auto"  # auto (bf16 on a GPU that has it, else fp16 on GPU + GradScaler, fp32 on CPU) | float32 | bfloat16 | float16
compile = False  # torch.compile the model (minutes of compile, then faster on GPU)
backend = "auto"  # nccl on GPU, gloo on CPU
dist_timeout = 600  # seconds a collective waits for a peer before failing
seed = 1337

DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per knob; CHECKS: across knobs)
RANGES = dict(tag_forcing="[0, 1]", aux_cls_weight="[0, 1000]")
CHECKS = {"min_lr <= learning_rate": "the cosine decays from learning_rate down to min_lr",
          "learning_rate * prefix_lr_mult <= 1": "the peak LR of the image encoder",
          "batch_size * gradient_accumulation_steps <= 1048576": "a global batch of at most 2**20 samples"}

# -----------------------------------------------------------------------------
# helpers: data preparation, evaluation, report generation


def ensure_data(cfg, data_dir, dist):
    """Prepare the phantom sets when missing (rank 0 writes, the others wait); other datasets name the command."""
    missing = not os.path.isfile(os.path.join(data_dir, "meta.json"))
    if missing and cfg["dataset"] in ("phantom_reports", "phantom_pairs") and data.is_phantom_folder(data_dir):
        if dist.master:
            args = [f"--dataset={cfg['dataset']}", f"--out_dir={data_dir}"]
            args += ["--tokenizer=bpe", "--vocab_size=1024"] + (["--max_tokens=64"] if cfg["dataset"] == "phantom_pairs" else [])
            text_data.main(args)
        if dist.ddp:
            tdist.barrier()
    return data.load_meta(data_dir, f"python text_data.py --dataset={cfg['dataset']} --out_dir={data_dir}")


def images_to_float(x_u8, mean, std, device):
    """uint8 (B, 1, H, W) numpy -> normalized float on device (data.to_float; pinned + non_blocking on CUDA)."""
    return data.to_float(to_device(x_u8, device).to(device), mean, std, 1)


def to_device(a, device):
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t


@torch.no_grad()
def evaluate_loss(model, batches, tbytes, dist, device, dtype):
    """Exact token-weighted val loss: each rank sums nats, tokens and bytes over its batches; all-reduce the sums.
    batches yields (x, y, images|None) with y=-1 on ignored positions. Returns loss, perplexity, bits per byte."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for x, y, images in batches:
        with common.autocast(device, dtype):
            _, loss = model(x, y, images=images, loss_reduction="sum")
        valid = y >= 0
        sums += torch.tensor([loss.item(), valid.sum().item(), tbytes[y[valid].cpu()].sum().item()], dtype=torch.float64)
    if dist.ddp:
        comm = sums.to(device) if device.startswith("cuda") else sums
        tdist.all_reduce(comm)
        sums = comm.cpu()
    model.train()
    nats, n_tok, n_bytes = sums.tolist()
    loss = nats / max(n_tok, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": nats / math.log(2) / max(n_bytes, 1)}


@torch.no_grad()
def generate_reports(model, pairs, rows, tok, mean, std, device, dtype, batch_size, dist):
    """Greedy reports for the given val rows (sharded across ranks, gathered) -> list of texts in row order."""
    model.eval()
    mine = rows[dist.rank::dist.world_size]
    out = []
    max_new = pairs.tokens.shape[1] - 1
    for i in range(0, len(mine), batch_size):
        r = mine[i: i + batch_size]
        images_u8, _, _ = pairs.batch(r)
        start = torch.full((len(r), 1), tok.eot_id, dtype=torch.long, device=device)
        with common.autocast(device, dtype):
            ids = model.generate(start, max_new, temperature=0, eos=tok.eot_id,
                                 images=images_to_float(images_u8, mean, std, device))
        for row, seq in zip(r, ids[:, 1:].tolist()):
            seq = seq[: seq.index(tok.eot_id)] if tok.eot_id in seq else seq
            out.append((int(row), tok.decode(seq)))
    if dist.ddp:
        gathered = [None] * dist.world_size
        tdist.all_gather_object(gathered, out)
        out = [x for part in gathered for x in part]
    model.train()
    return [text for _, text in sorted(out)]


@torch.no_grad()
def finding_probs(model, pairs, rows, mean, std, device, dtype, batch_size=256):
    """The finding head's probabilities (len(rows), n_classes) for these rows (every rank computes all of them)."""
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        images_u8, _, _ = pairs.batch(rows[i: i + batch_size])
        with common.autocast(device, dtype):
            out.append(model.classify(images_to_float(images_u8, mean, std, device)).cpu())
    model.train()
    return torch.cat(out).numpy()


def pairs_eval_batches(pairs, batch_size, mean, std, device, dist):
    rows = np.arange(len(pairs))[dist.rank::dist.world_size]
    for i in range(0, len(rows), batch_size):
        images_u8, x, y = pairs.batch(rows[i: i + batch_size])
        yield to_device(x, device), to_device(y, device), images_to_float(images_u8, mean, std, device)


def text_eval_batches(data, starts, block_size, batch_size, device, dist):
    mine = starts[dist.rank::dist.world_size]
    for i in range(0, len(mine), batch_size):
        x, y = text_data.text_batch(data, mine[i: i + batch_size], block_size)
        yield to_device(x, device), to_device(y, device), None


def load_data(cfg, dist, log):
    """What the loop reads, as one namespace: meta, tokenizer, token byte lengths, train / val (image-report pairs or
    token arrays), the text positions T per row and the model's sequence length."""
    data_dir = cfg["data_dir"] or os.path.join("data", cfg["dataset"])
    meta = ensure_data(cfg, data_dir, dist)
    tok = tok_lib.load(os.path.join(data_dir, "tokenizer.json"))
    d = SimpleNamespace(dir=data_dir, meta=meta, tok=tok, tbytes=torch.from_numpy(text_data.token_byte_lengths(tok)),
                        image_cond=cfg["cond"] == "image", n_classes=0)
    if d.image_cond:
        d.train, d.val = text_data.Pairs(data_dir, "train"), text_data.Pairs(data_dir, "val")
        d.T = d.train.tokens.shape[1] - 1  # text positions per row (inputs drop the last token)
        d.n_classes = len(meta["classes"]) if cfg["aux_cls_weight"] > 0 else 0  # the finding head adds a token each
        d.seq_len = cfg["n_prefix"] + d.n_classes + d.T
        if not 0 <= cfg["tag_forcing"] <= 1:
            raise ValueError(f"tag_forcing={cfg['tag_forcing']} is a fraction of the rows: 0 <= tag_forcing <= 1")
        for knob, on in (("finding_tags='hard'", cfg["finding_tags"] == "hard"), ("tag_forcing > 0", cfg["tag_forcing"] > 0)):
            if on and d.n_classes == 0:
                raise ValueError(f"{knob} needs a finding head: set aux_cls_weight > 0 (e.g. 1.0)")
        d.report = d.val if cfg["report_split"] == "val" else text_data.Pairs(data_dir, cfg["report_split"])
        if cfg["finding_tags"] == "hard" and cfg["report_split"] == "val":
            log.line("warning: finding_tags='hard' chooses its thresholds on val and report_split='val' scores the "
                     "reports on the same images (optimistic); set --report_split=test")
    else:
        if meta.get("kind") != "text":
            raise ValueError(f"{data_dir} holds {meta.get('kind')!r} data; cond='none' needs a text dataset "
                             f"(or set cond='image' for (image, report) pairs)")
        d.train, d.val = text_data.load_bin(data_dir, "train"), text_data.load_bin(data_dir, "val")
        d.T = d.seq_len = cfg["block_size"]
        d.eval_starts = text_data.eval_windows(len(d.val), d.T, cfg["eval_max_windows"])
    return d


def load_init_checkpoint(path):
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found (pretrained_path must be a ckpt.pt written by train_gpt.py or "
                                f"its folder, or a Hugging Face GPT-2 folder with config.json)")
    return common.load_checkpoint(path)


def build_gpt(cfg, ckpt, d, log):
    """The GPT: resumed (ckpt), pretrained (a train_gpt.py checkpoint: its weights and architecture, this run's
    regularisation and context; or a Hugging Face GPT-2 folder) or from scratch (+ image_init for the encoder)."""
    path = cfg["pretrained_path"]
    hf = (cfg["init_from"] == "pretrained" and os.path.isfile(os.path.join(path, "config.json"))
          and not os.path.isfile(os.path.join(path, "ckpt.pt")))  # a run folder holds config.json too
    if cfg["init_from"] == "pretrained" and not hf:
        ckpt = load_init_checkpoint(path)
    if hf:
        if d.tok.kind != "gpt2":
            raise ValueError(f"a GPT-2 pretrained_path needs data tokenized with GPT-2's BPE (python text_data.py ... "
                             f"--tokenizer=gpt2 --gpt2_dir={path}), {d.dir} uses {d.tok.kind!r}")
        return GPT.from_pretrained(path, dropout=cfg["dropout"], grad_checkpoint=cfg["grad_checkpoint"], block_size=d.seq_len)
    if ckpt is None:
        model_keys = ("n_layer", "n_head", "n_embd", "dropout", "bias", "pos", "grad_checkpoint", "image_encoder", "prefix_width")
        margs = {k: cfg[k] for k in model_keys}
        margs.update(block_size=d.seq_len, vocab_size=d.tok.vocab_size, n_prefix=cfg["n_prefix"] if d.image_cond else 0)
        if d.image_cond:
            margs.update(image_size=d.meta["image_size"], in_chans=1, aux_cls_weight=cfg["aux_cls_weight"],
                         n_classes=d.n_classes, finding_tags=cfg["finding_tags"])
        model = GPT(GPTConfig(**margs))
        if d.image_cond and cfg["image_init"]:
            if cfg["image_encoder"] == "conv":
                raise ValueError("image_init needs image_encoder = a model.py name (e.g. convnext_atto), not 'conv'")
            r = models.load_image_init(model.prefix.encoder.net, cfg["image_init"])
            kept = model.prefix.encoder.load_class_head(cfg["image_init"], d.meta["classes"]) if d.n_classes else []
            log.line(f"image encoder from {cfg['image_init']} ({r['layout']} layout; head reset: {len(r['reset'])} tensors"
                     + (f"; its classifier over the same {d.n_classes} findings kept as the finding head: {kept})" if kept else ")"))
        return model
    if ckpt["tokenizer"] != d.tok.to_dict():
        raise ValueError(f"the checkpoint's tokenizer differs from {d.dir}/tokenizer.json: prepare the data with "
                         f"--tokenizer=<the pretraining data dir>/tokenizer.json so the ids mean the same tokens")
    margs = dict(ckpt["model_args"])
    finetune = cfg["init_from"] == "pretrained"
    if finetune:  # keep the architecture; take this run's regularisation and context
        margs.update(dropout=cfg["dropout"], grad_checkpoint=cfg["grad_checkpoint"])
        if margs["pos"] != "learned":
            margs["block_size"] = d.seq_len  # no position table: any context length
    model = GPT(gpt_config_from_dict(margs))
    model.load_state_dict(ckpt["model"])
    if finetune and margs["pos"] == "learned" and d.seq_len < margs["block_size"]:
        model.crop_block_size(d.seq_len)
    return model


def get_batch(d, cfg, step, dist, accum, global_batch):
    """This rank's micro-batches at this step, (x, y, images | None, labels | None, tags | None) each: a pure function
    of (seed, step)."""
    device = dist.device
    def micro(a):  # data.py's split of the global batch into this rank's micro-batches
        return data.rank_micro_indices(a, dist.rank, dist.world_size, accum)
    if not d.image_cond:
        starts = text_data.text_windows(len(d.train), d.T, global_batch, cfg["seed"], step)
        return [tuple(to_device(a, device) for a in text_data.text_batch(d.train, s, d.T)) + (None, None, None)
                for s in micro(starts)]
    B = global_batch // (dist.world_size * accum)
    out = []
    for k, rows in enumerate(micro(data.global_batch_indices(len(d.train), global_batch, cfg["seed"], step))):
        images_u8, x, y = d.train.batch(rows)
        if cfg["token_dropout"] > 0:  # word dropout on inputs after the start token; targets stay intact
            rng = np.random.default_rng((cfg["seed"], step, (dist.rank * accum + k) * B))  # the micro-batch's offset
            drop = rng.random(x.shape) < cfg["token_dropout"]
            drop[:, 0] = False
            x = np.where(drop, rng.integers(0, d.tok.vocab_size, size=x.shape), x)
        labels = torch.from_numpy(d.train.labels[rows]).to(device) if cfg["aux_cls_weight"] > 0 else None
        tags = None
        if labels is not None and cfg["tag_forcing"] > 0:  # the true labels on a fraction of the rows, NaN elsewhere
            rng = np.random.default_rng((cfg["seed"], step, (dist.rank * accum + k) * B, 1))
            forced = torch.from_numpy(rng.random(len(rows)) < cfg["tag_forcing"]).to(device)
            tags = torch.where(forced[:, None], labels, torch.full_like(labels, float("nan")))
        out.append((to_device(x, device), to_device(y, device),
                    images_to_float(images_u8, d.meta["mean"], d.meta["std"], device), labels, tags))
    return out


def run_eval(raw_model, d, cfg, dist, step, last):
    """Val loss / perplexity / bits per byte; cond='image' adds greedy reports scored against the references. With
    finding_tags='hard' the operating point (per class the finding head's F1-best threshold on val) is chosen first,
    so the val loss and the reports of one eval use the same tags, whatever evals came before."""
    device, dtype, mean, std = dist.device, cfg["dtype"], d.meta.get("mean"), d.meta.get("std")
    if not d.image_cond:
        return evaluate_loss(raw_model, text_eval_batches(d.val, d.eval_starts, d.T, cfg["batch_size"], device, dist),
                             d.tbytes, dist, device, dtype)
    reports = cfg["eval_reports"] and not (step == 0 and not last)
    if reports and cfg["finding_tags"] == "hard":
        p_val = finding_probs(raw_model, d.val, np.arange(len(d.val)), mean, std, device, dtype)
        thr = metrics.choose_thresholds(p_val, d.val.labels.astype(np.float64), "f1")
        raw_model.prefix.thresholds.copy_(torch.as_tensor(thr, dtype=torch.float32))
    res = evaluate_loss(raw_model, pairs_eval_batches(d.val, cfg["batch_size"], mean, std, device, dist),
                        d.tbytes, dist, device, dtype)
    if not reports:
        return res
    rows = np.arange(min(cfg["eval_reports"], len(d.report)))
    if cfg["finding_tags"] == "hard":
        p_rep = finding_probs(raw_model, d.report, rows, mean, std, device, dtype)
        res["thresholds"] = [round(float(t), 4) for t in thr]
        res["head_macro_f1"] = text_data.finding_scores(p_rep >= thr, d.report.labels[rows], d.meta["classes"])["macro_f1"]
    hyps = generate_reports(raw_model, d.report, rows, d.tok, mean, std, device, dtype, cfg["batch_size"], dist)
    refs = [d.report.index[r]["text"] for r in rows]
    rm = text_data.report_metrics(hyps, refs, d.report.labels[rows], d.meta["classes"])
    res.update(bleu4=rm["bleu4"], rouge_l=rm["rouge_l"], macro_f1=rm["macro_f1"], report_split=cfg["report_split"])
    res["per_class_f1"] = {c: round(v["f1"], 4) for c, v in rm["per_class"].items()}
    res["sample_report"] = hyps[0]
    return res


def log_eval(log, res):
    extra = "".join(f" | {k} {res[k]:.4f}" for k in ("bleu4", "rouge_l", "macro_f1", "head_macro_f1") if k in res)
    extra += f" ({res['report_split']} reports)" if "report_split" in res else ""
    log.line(f"eval iter {res['iter']} | val loss {res['val_loss']:.4f} | ppl {res['val_ppl']:.2f} | "
             f"bpb {res['val_bpb']:.4f}{extra}")
    if "sample_report" in res:
        log.line(f"  report: {res['sample_report']}")
    log.scalars({k: v for k, v in res.items() if isinstance(v, float)}, res["iter"], prefix="val/")


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)
    if cfg["cond"] not in ("none", "image"):
        raise ValueError(f"cond must be 'none' or 'image', got {cfg['cond']!r}")
    return common.launch(_train, cfg)


def _train(cfg, dist, log):
    common.check_init_from(cfg)
    ckpt = common.resume_checkpoint(cfg, "train_gpt.py", log)
    common.start_run("train_gpt.py", cfg, dist, log, DEFAULTS, save_config=ckpt is None)

    # --- data
    d = load_data(cfg, dist, log)
    accum, global_batch, note = common.batch_plan(cfg["batch_size"], cfg["gradient_accumulation_steps"], dist.world_size)
    if note:
        log.line(note)
    tokens_per_iter = global_batch * d.seq_len
    log.line(f"data {d.dir}: {d.meta['kind']}, tokenizer {d.tok.kind} (vocab {d.tok.vocab_size}), "
             f"unigram entropy {d.meta['unigram_entropy']:.3f} nats/token")
    log.line(f"global batch {global_batch} sequences = {cfg['batch_size']} x {accum} micro-steps x {dist.world_size} "
             f"ranks; {tokens_per_iter:,} positions/step")

    # --- model, optimizer
    raw_model = build_gpt(cfg, ckpt, d, log)
    if raw_model.config.pos == "learned" and d.seq_len > raw_model.config.block_size:
        raise ValueError(f"block_size={d.seq_len} exceeds the model's learned positions ({raw_model.config.block_size})")
    model_args = gpt_config_to_dict(raw_model.config)
    raw_model.to(dist.device)
    log.line(f"GPT {raw_model.get_num_params() / 1e6:.2f}M parameters (non-embedding), pos={raw_model.config.pos}, "
             f"{raw_model.flops_per_token(d.seq_len) / 1e6:.1f} MFLOPs/token (train)")
    torch.manual_seed(cfg["seed"] + 1000 * dist.rank)  # dropout differs per rank; the init above does not
    optimizer = common.make_optimizer(raw_model.param_groups(cfg["weight_decay"], cfg["prefix_lr_mult"]),
                                      cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), dist.device)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg["dtype"] == "float16")
    ckpt_meta = common.checkpoint_meta(d.meta, d.dir, ("kind", "mean", "std", "classes", "max_tokens"))
    prog = common.new_progress()
    if ckpt is not None:
        prog = common.restore(ckpt, cfg, ckpt_meta, optimizer, scaler, dist, log)
    ckpt = None
    step = prog["iter"]
    if cfg["compile"]:
        log.line("compiling the model (takes a minute)")
    model = common.wrap(raw_model, cfg["compile"], dist)
    peak = common.device_peak_flops(dist.device, cfg["dtype"])
    flops_per_step = raw_model.flops_per_token(d.seq_len) * tokens_per_iter

    # --- the loop
    model.train()
    timer = common.Timer(dist.device)
    resumed_at, last_eval, train_loss = (step if step > 0 else -1), {}, None
    while True:
        last_step = step >= cfg["max_iters"]
        lr = common.schedule_lr(optimizer, step, cfg) if cfg["decay_lr"] else cfg["learning_rate"]  # constant: as built

        # evaluate, log and checkpoint
        if common.eval_due(step, cfg, last_step, resumed_at):
            with timer.paused():
                last_eval = {"iter": step, "split": "val", **run_eval(raw_model, d, cfg, dist, step, last_step or cfg["eval_only"])}
                improved = common.select(prog, last_eval, cfg, common.higher_is_better(cfg["select_metric"]), step)
                log_eval(log, last_eval)
                log.jsonl(last_eval)
                common.save_run(cfg, dist, log, "train_gpt.py", step, prog, improved, raw_model, model_args, ckpt_meta,
                                optimizer, scaler, tokenizer=d.tok.to_dict())
            last_step = last_step or common.early_stop(prog, cfg, log)
        if last_step or cfg["eval_only"]:
            break

        # TRAINING SECTION: micro-steps (gradient sync only on the last), then the optimizer step
        micro = get_batch(d, cfg, step, dist, accum, global_batch)
        loss_sum = torch.zeros((), device=dist.device)
        for k, (x, y, images, labels, tags) in enumerate(micro):
            with common.grad_sync(model, k == len(micro) - 1):
                with common.autocast(dist.device, cfg["dtype"]):
                    _, loss = model(x, y, images=images, labels=labels, tags=tags)
                    loss = loss / len(micro)
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        norm = common.optimizer_step(optimizer, scaler, list(raw_model.parameters()), cfg["grad_clip"])
        step += 1
        timer.step()
        # TRAINING SECTION END: what follows is the log line

        if step % cfg["log_interval"] == 0 or step == cfg["max_iters"]:
            train_loss = common.log_step(log, dist, timer, step, cfg, loss_sum, norm, lr, tokens_per_iter, "tok",
                                         flops_per_step, peak, jsonl=True)

    final = common.finish(log, prog, cfg, step, timer)
    log.line(f"val loss {last_eval.get('val_loss', float('nan')):.4f} vs unigram entropy "
             f"{d.meta['unigram_entropy']:.4f} nats/token")
    xz = None if d.image_cond else text_data.xz_bpb(d.train, d.val, d.tok)  # classical baseline on the same bytes
    if xz:
        log.line(f"val bpb {last_eval.get('val_bpb', float('nan')):.4f} vs xz -9 given the train text {xz:.4f}")
    return {**final, "unigram_entropy": d.meta["unigram_entropy"], "train_loss": train_loss, "xz_bpb": xz, **last_eval,
            "step": step}


if __name__ == "__main__":
    configurator.cli(main)
