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
    python train_gpt.py config/gpt_roco_finetune.py --init_path=out/gpt_pubmed/ckpt.pt
From OpenAI's GPT-2 (a local Hugging Face directory; data tokenized with --tokenizer=gpt2):
    python train_gpt.py config/gpt_roco.py --init_from=gpt2 --init_path=/models/gpt2 --dataset=roco_gpt2
Resume: same command with --init_from=resume (reads out_dir/ckpt.pt; batches depend only on (seed, step)).
Sample: python sample.py --out_dir=out/gpt_phantom_reports --start="Chest radiograph shows"

Eval prints val loss, perplexity and bits per byte (nats summed over the val tokens / ln 2 / their UTF-8
bytes: comparable across tokenizers); cond='image' adds BLEU-4, ROUGE-L and the finding macro-F1 of
greedy reports for eval_reports val images.
"""

import contextlib
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import configurator
import text_data
import tokenizer as tok_lib
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
always_save_checkpoint = True  # False: save only when val loss improves
init_from = "scratch"  # scratch | resume (out_dir/ckpt.pt) | finetune (weights of init_path, fresh optimizer) | gpt2 (HF dir init_path)
init_path = ""  # finetune: a ckpt.pt (or its folder); gpt2: a Hugging Face GPT-2 folder
tensorboard = True
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
seed = 1337

DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

# -----------------------------------------------------------------------------
# helpers: data preparation, evaluation, report generation


def ensure_data(cfg, data_dir, dist):
    """Prepare the phantom sets when missing (rank 0 writes, the others wait); other datasets name the command."""
    if not os.path.isfile(os.path.join(data_dir, "meta.json")) and cfg["dataset"] in ("phantom_reports", "phantom_pairs"):
        if dist.master:
            args = [f"--dataset={cfg['dataset']}", f"--out_dir={data_dir}"]
            args += ["--tokenizer=bpe", "--vocab_size=1024"] + (["--max_tokens=64"] if cfg["dataset"] == "phantom_pairs" else [])
            text_data.main(args)
        if dist.ddp:
            tdist.barrier()
    return text_data.load_meta(data_dir)


def images_to_float(x_u8, mean, std, device):
    """uint8 (B, 1, H, W) -> normalized float on device (pinned + non_blocking on CUDA)."""
    x = torch.from_numpy(np.ascontiguousarray(x_u8))
    if device.startswith("cuda"):
        x = x.pin_memory().to(device, non_blocking=True)
    return (x.to(device).float() / 255.0 - mean) / std


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


def load_init_checkpoint(path):
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found (init_path must be a ckpt.pt written by train_gpt.py or its folder)")
    return common.load_checkpoint(path)


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)
    if cfg["cond"] not in ("none", "image"):
        raise ValueError(f"cond must be 'none' or 'image', got {cfg['cond']!r}")
    if cfg["init_from"] not in ("scratch", "resume", "finetune", "gpt2"):
        raise ValueError(f"init_from must be scratch, resume, finetune or gpt2, got {cfg['init_from']!r}")

    # --- setup: distributed, device, precision, seed
    dist = common.setup_distributed(cfg["device"], cfg["backend"])
    device = dist.device
    cfg["dtype"] = dtype = common.resolve_dtype(cfg["dtype"], device)
    logger = common.Logger(cfg["out_dir"], cfg["tensorboard"], dist.master)
    try:
        return _train(cfg, dist, device, dtype, logger)
    finally:
        logger.close()
        common.cleanup_distributed()


def _train(cfg, dist, device, dtype, logger):
    common.start_run("train_gpt.py", cfg, dist, logger)  # header, config (+ config.json), seeds, TF32

    # --- data
    data_dir = cfg["data_dir"] or os.path.join("data", cfg["dataset"])
    meta = ensure_data(cfg, data_dir, dist)
    tok = tok_lib.load(os.path.join(data_dir, "tokenizer.json"))
    tbytes = torch.from_numpy(text_data.token_byte_lengths(tok))
    image_cond = cfg["cond"] == "image"
    if image_cond:
        train_pairs, val_pairs = text_data.Pairs(data_dir, "train"), text_data.Pairs(data_dir, "val")
        mean, std = meta["mean"], meta["std"]
        T = train_pairs.tokens.shape[1] - 1  # text positions per row (inputs drop the last token)
        n_classes = len(meta["classes"]) if cfg["aux_cls_weight"] > 0 else 0  # the finding head adds a token each
        seq_len = cfg["n_prefix"] + n_classes + T
        n_train = len(train_pairs)
    else:
        if meta.get("kind") != "text":
            raise ValueError(f"{data_dir} holds {meta.get('kind')!r} data; cond='none' needs a text dataset "
                             f"(or set cond='image' for (image, report) pairs)")
        train_bin, val_bin = text_data.load_bin(data_dir, "train"), text_data.load_bin(data_dir, "val")
        T = seq_len = cfg["block_size"]
        eval_starts = text_data.eval_windows(len(val_bin), T, cfg["eval_max_windows"])
    world = dist.world_size
    gas = cfg["gradient_accumulation_steps"]
    assert gas % world == 0, (f"gradient_accumulation_steps={gas} must be divisible by the world size {world} "
                              f"(it is global; each rank does gas // world micro-steps)")
    accum = gas // world
    global_batch = cfg["batch_size"] * gas
    tokens_per_iter = global_batch * seq_len
    logger.line(f"data {data_dir}: {meta['kind']}, tokenizer {tok.kind} (vocab {tok.vocab_size}), "
                f"unigram entropy {meta['unigram_entropy']:.3f} nats/token")
    logger.line(f"global batch {global_batch} sequences = {cfg['batch_size']} x {accum} micro-steps x {world} ranks; "
                f"{tokens_per_iter:,} positions/step")

    # --- model
    model_keys = ("n_layer", "n_head", "n_embd", "dropout", "bias", "pos", "grad_checkpoint", "image_encoder", "prefix_width")
    model_args = {k: cfg[k] for k in model_keys}
    model_args.update(block_size=seq_len, vocab_size=tok.vocab_size, n_prefix=cfg["n_prefix"] if image_cond else 0)
    if image_cond:
        model_args.update(image_size=meta["image_size"], in_chans=1, aux_cls_weight=cfg["aux_cls_weight"],
                          n_classes=n_classes, finding_tags=cfg["finding_tags"])
        if cfg["finding_tags"] == "hard" and n_classes == 0:
            raise ValueError("finding_tags='hard' needs a finding head: set aux_cls_weight > 0 (e.g. 1.0)")
        report_pairs = val_pairs if cfg["report_split"] == "val" else text_data.Pairs(data_dir, cfg["report_split"])
        if cfg["finding_tags"] == "hard" and cfg["report_split"] == "val":
            logger.line("warning: finding_tags='hard' chooses its thresholds on val and report_split='val' scores the "
                        "reports on the same images (optimistic); set --report_split=test")
    iter_num, best_val_loss, ckpt = 0, float("inf"), None
    if cfg["init_from"] == "scratch":
        model = GPT(GPTConfig(**model_args))
        if image_cond and cfg["image_init"]:
            if cfg["image_encoder"] == "conv":
                raise ValueError("image_init needs image_encoder = a model.py name (e.g. convnext_atto), not 'conv'")
            import model as models
            r = models.load_image_init(model.prefix.encoder.net, cfg["image_init"])
            kept = model.prefix.encoder.load_class_head(cfg["image_init"], meta["classes"]) if n_classes else []
            logger.line(f"image encoder from {cfg['image_init']} ({r['layout']} layout; head reset: {len(r['reset'])} tensors"
                        + (f"; its classifier over the same {n_classes} findings kept as the finding head: {kept})" if kept else ")"))
    elif cfg["init_from"] in ("resume", "finetune"):
        ckpt = load_init_checkpoint(cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_path"])
        if ckpt["tokenizer"] != tok.to_dict():
            raise ValueError(f"the checkpoint's tokenizer differs from {data_dir}/tokenizer.json: prepare the data with "
                             f"--tokenizer=<the pretraining data dir>/tokenizer.json so the ids mean the same tokens")
        margs = dict(ckpt["model_args"])
        if cfg["init_from"] == "finetune":  # keep the architecture; take this run's regularisation and context
            margs.update(dropout=cfg["dropout"], grad_checkpoint=cfg["grad_checkpoint"])
            if margs["pos"] != "learned":
                margs["block_size"] = seq_len  # no position table: any context length
        model = GPT(gpt_config_from_dict(margs))
        model.load_state_dict(ckpt["model"])
        if cfg["init_from"] == "finetune" and margs["pos"] == "learned" and seq_len < margs["block_size"]:
            model.crop_block_size(seq_len)
        if cfg["init_from"] == "resume":
            iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    else:  # gpt2
        if tok.kind != "gpt2":
            raise ValueError(f"init_from='gpt2' needs data tokenized with GPT-2's BPE (python text_data.py ... "
                             f"--tokenizer=gpt2 --gpt2_dir={cfg['init_path']}), {data_dir} uses {tok.kind!r}")
        model = GPT.from_pretrained(cfg["init_path"], dropout=cfg["dropout"], grad_checkpoint=cfg["grad_checkpoint"],
                                    block_size=seq_len)
    if model.config.pos == "learned" and seq_len > model.config.block_size:
        raise ValueError(f"block_size={seq_len} exceeds the model's learned positions ({model.config.block_size})")
    model_args = gpt_config_to_dict(model.config)
    model.to(device)
    raw_model = model
    logger.line(f"GPT {model.get_num_params() / 1e6:.2f}M parameters (non-embedding), pos={model.config.pos}, "
                f"{model.flops_per_token(seq_len) / 1e6:.1f} MFLOPs/token (train)")
    torch.manual_seed(cfg["seed"] + 1000 * dist.rank)  # dropout differs per rank; the init above does not

    # --- optimizer
    optimizer = common.make_optimizer(raw_model.param_groups(cfg["weight_decay"], cfg["prefix_lr_mult"]), cfg["learning_rate"],
                                      (cfg["beta1"], cfg["beta2"]), device)
    if cfg["init_from"] == "resume":
        optimizer.load_state_dict(ckpt["optimizer"])
        if "torch_rng" in ckpt:
            torch.set_rng_state(ckpt["torch_rng"])
    ckpt = None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    if cfg["compile"]:
        logger.line("compiling the model (takes a minute)")
        model = torch.compile(model)
    if dist.ddp:
        model = DDP(model, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
    peak = common.device_peak_flops(device, dtype)
    lr_decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]

    def get_batch(step):
        """This rank's micro-batches at this step: a pure function of (seed, step)."""
        slices = text_data.rank_slice(global_batch, dist.rank, world, accum)
        if image_cond:
            rows = text_data.epoch_batch_indices(n_train, global_batch, cfg["seed"], step)
            out = []
            for s in slices:
                images_u8, x, y = train_pairs.batch(rows[s])
                if cfg["token_dropout"] > 0:  # word dropout on inputs after the start token; targets stay intact
                    rng = np.random.default_rng((cfg["seed"], step, s.start))
                    drop = rng.random(x.shape) < cfg["token_dropout"]
                    drop[:, 0] = False
                    x = np.where(drop, rng.integers(0, tok.vocab_size, size=x.shape), x)
                labels = torch.from_numpy(train_pairs.labels[rows[s]]).to(device) if cfg["aux_cls_weight"] > 0 else None
                out.append((to_device(x, device), to_device(y, device), images_to_float(images_u8, mean, std, device), labels))
            return out
        starts = text_data.text_windows(len(train_bin), T, global_batch, cfg["seed"], step)
        return [tuple(to_device(a, device) for a in text_data.text_batch(train_bin, starts[s], T)) + (None, None)
                for s in slices]

    def run_eval(step, last):
        if image_cond:
            res = evaluate_loss(raw_model, pairs_eval_batches(val_pairs, cfg["batch_size"], mean, std, device, dist),
                                tbytes, dist, device, dtype)
            if cfg["eval_reports"] and (step > 0 or last):
                rows = np.arange(min(cfg["eval_reports"], len(report_pairs)))
                if cfg["finding_tags"] == "hard":  # the operating point: per class the F1-best threshold on val
                    import evaluate
                    p_val = finding_probs(raw_model, val_pairs, np.arange(len(val_pairs)), mean, std, device, dtype)
                    thr = evaluate.choose_thresholds(p_val, val_pairs.labels.astype(np.float64), "f1")
                    raw_model.prefix.thresholds.copy_(torch.as_tensor(thr, dtype=torch.float32))
                    p_rep = finding_probs(raw_model, report_pairs, rows, mean, std, device, dtype)
                    res["thresholds"] = [round(float(t), 4) for t in thr]
                    res["head_macro_f1"] = text_data.finding_scores(p_rep >= thr, report_pairs.labels[rows],
                                                                      meta["classes"])["macro_f1"]
                hyps = generate_reports(raw_model, report_pairs, rows, tok, mean, std, device, dtype, cfg["batch_size"], dist)
                refs = [report_pairs.index[r]["text"] for r in rows]
                rm = text_data.report_metrics(hyps, refs, report_pairs.labels[rows], meta["classes"])
                res.update(bleu4=rm["bleu4"], rouge_l=rm["rouge_l"], macro_f1=rm["macro_f1"], report_split=cfg["report_split"])
                res["per_class_f1"] = {c: round(v["f1"], 4) for c, v in rm["per_class"].items()}
                res["sample_report"] = hyps[0]
        else:
            res = evaluate_loss(raw_model, text_eval_batches(val_bin, eval_starts, T, cfg["batch_size"], device, dist),
                                tbytes, dist, device, dtype)
        return res

    # --- the loop
    model.train()
    timer = common.Timer(device)
    running_loss, last_eval, t_start = None, {}, time.time()
    step = iter_num
    while True:
        last_step = step == cfg["max_iters"]
        if step % cfg["eval_interval"] == 0 or last_step or cfg["eval_only"]:
            res = run_eval(step, last_step or cfg["eval_only"])
            last_eval = dict(res, step=step)
            extra = "".join(f" | {k} {res[k]:.4f}" for k in ("bleu4", "rouge_l", "macro_f1", "head_macro_f1") if k in res)
            extra += f" ({res['report_split']} reports)" if "report_split" in res else ""
            logger.line(f"eval step {step} | val loss {res['val_loss']:.4f} | ppl {res['val_ppl']:.2f} | "
                        f"bpb {res['val_bpb']:.4f}{extra}")
            if "sample_report" in res:
                logger.line(f"  report: {res['sample_report']}")
            logger.scalars({k: v for k, v in res.items() if isinstance(v, float)}, step, prefix="val/")
            logger.jsonl({"split": "val", **last_eval})
            if cfg["eval_only"]:
                break
            if dist.master and step > 0 and (res["val_loss"] < best_val_loss or cfg["always_save_checkpoint"]):
                best_val_loss = min(best_val_loss, res["val_loss"])
                common.save_checkpoint({
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
                    "iter_num": step, "best_val_loss": best_val_loss, "config": cfg, "tokenizer": tok.to_dict(),
                    "data": {"dir": data_dir, "kind": meta["kind"], "mean": meta.get("mean"), "std": meta.get("std"),
                             "classes": meta.get("classes"), "max_tokens": meta.get("max_tokens")},
                    "torch_rng": torch.get_rng_state(),
                }, os.path.join(cfg["out_dir"], "ckpt.pt"))
        if last_step:
            break
        if step % cfg["eval_interval"] == 0:
            timer.lap()  # the step time below excludes the evaluation

        # the canonical step: micro-steps (gradient sync only on the last), clip, step, zero_grad
        lr = common.get_lr(step, cfg["learning_rate"], cfg["warmup_iters"], cfg["plateau_iters"], lr_decay_iters,
                           cfg["min_lr"]) if cfg["decay_lr"] else cfg["learning_rate"]
        common.set_lr(optimizer, lr)
        loss_sum = 0.0
        micro = get_batch(step)
        for k, (x, y, images, labels) in enumerate(micro):
            sync = not dist.ddp or k == accum - 1
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with common.autocast(device, dtype):
                    _, loss = model(x, y, images=images, labels=labels)
                    loss = loss / accum
                scaler.scale(loss).backward()
            loss_sum += loss.item()
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"]).item()
        else:
            norm = common.grad_norm(raw_model.parameters()).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        dt = timer.lap()

        running_loss = loss_sum if running_loss is None else 0.9 * running_loss + 0.1 * loss_sum
        if step % cfg["log_interval"] == 0:
            mfu = raw_model.estimate_mfu(tokens_per_iter, dt, peak, seq_len)
            mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "-"
            logger.line(f"step {step:5d} | loss {loss_sum:.4f} | norm {norm:.3f} | lr {lr:.2e} | ms {1000 * dt:.0f} | "
                        f"tok/s {tokens_per_iter / dt:,.0f} | mfu {mfu_s}")
            logger.scalars({"loss": loss_sum, "norm": norm, "lr": lr, "ms": 1000 * dt, "mfu": mfu}, step, prefix="train/")
            logger.jsonl({"split": "train", "step": step, "loss": loss_sum, "norm": norm, "lr": lr, "ms": 1000 * dt,
                          "tok_per_s": tokens_per_iter / dt, "mfu": mfu})
        step += 1

    logger.line(f"done in {common.format_eta(time.time() - t_start)}; val loss {last_eval.get('val_loss', float('nan')):.4f} "
                f"vs unigram entropy {meta['unigram_entropy']:.4f} nats/token")
    xz = None if image_cond else text_data.xz_bpb(train_bin, val_bin, tok)  # classical baseline on the same bytes
    if xz:
        logger.line(f"val bpb {last_eval.get('val_bpb', float('nan')):.4f} vs xz -9 given the train text {xz:.4f}")
    return {"unigram_entropy": meta["unigram_entropy"], "train_loss": running_loss, "xz_bpb": xz, **last_eval}


if __name__ == "__main__":
    main()
