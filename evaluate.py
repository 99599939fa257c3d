"""
Test-set evaluation of a classifier checkpoint: per-class ROC AUC with a patient-level bootstrap
95% CI, average precision, sensitivity / specificity / precision / recall / F1 at a threshold chosen on
validation (and at 0.5), macro and micro means, the CheXpert competition AUC, calibration, curves,
predictions CSV, Grad-CAM / attention-rollout heatmaps. The statistics are metrics.py's; this is the command.

    python evaluate.py --ckpt=out/phantom/best.pt --split=test           # writes out/phantom/eval_test.json
    python evaluate.py --ckpt=out/x/best.pt --data_dir=data/nih          # another data set: shared classes only
    python evaluate.py --ckpt=out/x/best.pt --tta=8 --n_bootstrap=2000   # 8 augmented views, tighter CI
    python evaluate.py --ckpt=out/x/best.pt --cam=4                      # heatmaps: 4 best hits + 4 worst errors per class
    python evaluate.py --ckpt=out/x/best.pt --image=some_cxr.png         # one image: probabilities + heatmaps
    python evaluate.py --ckpt=out/x/pruned.pt                            # export.py's pruned / int8 files too
    python evaluate.py --ckpt=out/x/best.pt --predict_csv=test.csv --root=/data   # challenge inference: a Path column
    python evaluate.py --ckpt=out/x/best.pt --subgroups=sex,age,view      # who it fails: per-group AUC, gaps (Holm)

Labels: when the prepared folder holds the source's raw codes ({split}_labels_raw.npy, CheXpert), the model is
scored against them with uncertain cells masked and blank cells per the data's blank policy (--eval_uncertain=mask,
the default), whatever policy training used; --eval_uncertain=as_policy scores against the training labels.

Outputs next to the checkpoint (or in --out_dir), `<tag>` = split, or <dataset>_<split> for another data set:
    eval_<tag>.json          every number printed, plus the reliability table and the labels used
    predictions_<tag>.csv    one row per image: index columns, true_<class> labels, one probability per class
    submission_<tag>.csv     CheXpert only: study-level, the 5 competition columns, max over the study's views
    <tag>_roc.png, <tag>_pr.png, <tag>_reliability.png, <tag>_confusion.png (multiclass)
    cam_<tag>/*.png          heatmap overlays (--cam / --image)
    subgroups_<tag>.csv, <tag>_subgroups.png   --subgroups: per group and class, per pair; forest plot (docs/subgroups.md)
    model_card.md, model_card.json            the run's own test split: Mitchell et al.'s model card, from recorded facts
    tb_eval/                 the same curves and figures for TensorBoard
--predict_csv writes predictions.csv (Path + one probability per class) and, for a CheXpert model,
submission.csv (Study + the 5 competition columns, max over the study's views).
"""

import csv
import json
import os
import sys
import time

import numpy as np
import torch

import cam as cam_lib  # the module; `cam` is the config knob below
import common
import configurator
import data
import fusion
import metrics
import model_card as card_lib  # the modules; `model_card` and `subgroups` are config knobs below
import readers
import runs
import subgroups as subgroups_lib

# -----------------------------------------------------------------------------
# config: python evaluate.py --key=value (or a config file), see configurator.py
ckpt = ""                 # path to best.pt / ckpt.pt written by train.py, or export.py's pruned.pt / int8.pt (required)
split = "test"            # train | val | test
data_dir = ""             # "" = the data set the checkpoint was trained on; another prepared dir = external test
out_dir = ""              # "" = the checkpoint's folder
weights = "model"         # model (the raw weights train.py selected best.pt on) | ema (the EMA copy, when trained with ema_decay>0)
eval_uncertain = "mask"   # mask (raw labels: uncertain -> unknown, blank per the data's blank policy) | as_policy (training's labels)
batch_size = 64           # inference batch; memory only, results do not depend on it
device = "auto"           # auto | cpu | cuda | cuda:1
n_bootstrap = 1000        # bootstrap resamples of patients for the AUC CI; 0 = no CI. 1000 gives ~+-0.005 on the CI ends
bootstrap_seed = 0        # fixed so the CI is reproducible
threshold = "youden"      # how the operating point is chosen on validation: youden (max sens+spec-1) | sensitivity | f1
target_sensitivity = 0.9  # with threshold="sensitivity": the highest threshold that reaches this sensitivity on val
n_bins = 15               # calibration bins (equal width); 10-15 is the usual choice (Guo et al. 2017)
tta = 0                   # test-time augmentation: average the plain view and this many augmented views (0 = off)
tta_seed = 0              # fixed generator for the TTA views
cam = 0                   # heatmaps for the N most confident true positives and N worst errors per class (0 = off)
image = ""                # one image file (png/jpg): print its probabilities and write its heatmaps
predict_csv = ""          # a CSV with a Path column (the CheXpert challenge input): predictions.csv + submission.csv
root = ""                 # folder the Path column is relative to ("" = the CSV's folder)
subgroups = ""            # index columns to break the metrics down by, e.g. sex,age,view,dataset ("" = off)
age_bins = "40,60,80"     # age edges (years) for --subgroups=age: <40, 40-59, 60-79, >=80 ("" = each age a group)
subgroup_alpha = 0.05     # significance level of the pairwise subgroup gaps, after Holm's correction over all pairs
model_card = True         # write model_card.md + model_card.json beside the checkpoint (the run's own test split only)
figures = True            # PNG curves with matplotlib
tensorboard = True        # curves + figures to <out_dir>/tb_eval
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# ranges beyond configurator.CONVENTIONS, checked before any work starts (an interval per knob; CHECKS: across knobs)
RANGES = dict(n_bootstrap="[0, inf)", n_bins="[1, 10000]")

def split_inputs(net, split):
    """The text / clinical arrays a fusion model reads beside the image ({} for an image-only model)."""
    return fusion.split_inputs(split, net.model_args) if net.model_args.get("model") == "fusion" else {}


def scoring_labels(data_dir, split_name, labels, meta, mode):
    """The labels the split is scored on (metrics.eval_labels) and a sentence saying which ones they are."""
    raw_path = os.path.join(data_dir, f"{split_name}_labels_raw.npy")
    if meta.get("task") != "multilabel" or not os.path.exists(raw_path):
        metrics.eval_labels(labels, None, mode)  # checks the value of mode
        return np.asarray(labels), "the prepared labels (no raw labels file)"
    policy = meta.get("label_policy") or {}
    blank = policy.get("blank", "ignore")
    y = metrics.eval_labels(labels, np.load(raw_path), mode, blank)
    if mode == "mask":
        return y, f"raw labels, uncertain masked, blank -> {blank} ({raw_path})"
    return y, f"the training policy labels (uncertain -> {policy.get('uncertain', '?')}, blank -> {blank})"


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = configurator.load(DEFAULTS, sys.argv[1:] if argv is None else argv)
    if not cfg["ckpt"]:
        raise ValueError("--ckpt is required, e.g. python evaluate.py --ckpt=out/quickstart/best.pt --split=test")
    if cfg["image"] and not os.path.isfile(cfg["image"]):
        raise FileNotFoundError(f"--image={cfg['image']!r} not found: pass the path of a PNG/JPEG/DICOM file")
    dev = common.resolve_device(cfg["device"])
    net, meta_ck, _ = runs.load_run(cfg["ckpt"], dev, cfg["weights"], reader="evaluate.py")
    out_dir = cfg["out_dir"] or os.path.dirname(os.path.abspath(cfg["ckpt"]))
    os.makedirs(out_dir, exist_ok=True)
    if cfg["image"]:
        return _one_image(cfg, net, meta_ck, out_dir, dev)
    if cfg["predict_csv"]:
        return _predict_csv(cfg, net, meta_ck, out_dir, dev)
    return _evaluate_split(cfg, net, meta_ck, out_dir, dev)


def _image_only(net, what):
    if net.model_args.get("model") == "fusion":
        raise ValueError(f"{what} gives images only, and this fusion model also reads "
                         f"{net.model_args['modalities']}: evaluate it on a prepared split (--split=test)")


def _one_image(cfg, net, meta, out_dir, dev):
    _image_only(net, "--image")
    size = net.model_args.get("image_size", 224)
    u8 = cam_lib.load_image(cfg["image"], size)
    probs = runs.predict(net, u8[None], meta, 1, cfg["tta"], cfg["tta_seed"], dev)[0]
    classes = meta["classes"]
    order = np.argsort(-probs)
    print(f"{cfg['image']} ({net.model_args['model']}, {meta['task']}):")
    for c in order:
        print(f"  {classes[c]:<24} {probs[c]:.4f}")
    cam_dir = os.path.join(out_dir, "cam_image")
    os.makedirs(cam_dir, exist_ok=True)
    x = runs.model_input(torch.from_numpy(u8)[None, None].to(dev), meta, net.model_args)
    method, target = cam_lib.find_cam_target(net, x)
    top = order[:min(3, len(classes))]
    maps = cam_lib.heatmaps(net, x.expand(len(top), -1, -1, -1), top.tolist(), method, target)
    stem = os.path.splitext(os.path.basename(cfg["image"]))[0]
    paths = []
    for k, c in enumerate(top):
        p = os.path.join(cam_dir, f"{metrics.safe_name(stem)}_{metrics.safe_name(classes[c])}.png")
        cam_lib.save_cam_png(p, cam_lib.overlay(u8, maps[k], strength=float(probs[c])), method, classes[c], float(probs[c]), os.path.basename(cfg["image"]))
        paths.append(p)
    print(f"heatmaps ({method}) for the top {len(top)} classes: {', '.join(paths)}")
    return {"classes": classes, "probs": probs.tolist(), "method": method, "heatmaps": paths}


def _save_figure(fig, cfg, tb, out_dir, tag, kind):
    """A figure as <tag>_<kind>.png (with --figures) and in TensorBoard as <tag>/<kind> (which closes it); returns
    the files written."""
    written = []
    if cfg["figures"]:
        written.append(os.path.join(out_dir, f"{tag}_{kind}.png"))
        fig.savefig(written[0], dpi=100)
    if tb is not None:
        tb.add_figure(f"{tag}/{kind}", fig, 0)
    return written


def _predict_csv(cfg, net, meta, out_dir, dev):
    """The challenge's input: a CSV with a Path column, images decoded exactly as prepare stores them."""
    _image_only(net, "--predict_csv")
    rows = [r for _, r in readers.read_csv_dicts(cfg["predict_csv"], ["Path"])]  # BOM, encoding, short rows: named
    root = cfg["root"] or os.path.dirname(os.path.abspath(cfg["predict_csv"]))
    size = net.model_args.get("image_size", 224)
    paths = [r["Path"] for r in rows]
    missing = [p for p in paths if not os.path.exists(os.path.join(root, p))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {cfg['predict_csv']} are not under --root={root}, "
                                f"e.g. {missing[0]}: pass the folder the Path column is relative to")
    images = np.stack([data.decode_image(os.path.join(root, p), size) for p in paths]).astype(np.uint8)
    probs = runs.predict(net, images, meta, cfg["batch_size"], cfg["tta"], cfg["tta_seed"], dev)
    classes = list(meta["classes"])
    pred_path = os.path.join(out_dir, "predictions.csv")
    with open(pred_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path"] + classes)
        for p, row in zip(paths, probs):
            w.writerow([p] + [f"{v:.6f}" for v in row])
    written = [pred_path]
    if meta["task"] == "multilabel" and all(c in classes for c in metrics.CHEXPERT_COMPETITION):
        sub = os.path.join(out_dir, "submission.csv")
        n = metrics.write_chexpert_submission(sub, [{"path": p} for p in paths], range(len(paths)), classes, probs)
        written.append(f"{sub} ({n} studies)")
    print(f"{len(paths)} images of {cfg['predict_csv']}: wrote " + ", ".join(written))
    return {"paths": paths, "classes": classes, "probs": probs, "predictions": pred_path}


def _evaluate_split(cfg, net, meta_ck, out_dir, dev):
    task, model_classes = meta_ck["task"], list(meta_ck["classes"])
    own_dir = meta_ck.get("data_dir", "")
    data_dir = cfg["data_dir"] or own_dir
    external = os.path.normpath(data_dir) != os.path.normpath(own_dir)
    meta = data.load_meta(data_dir)
    if meta["task"] != task:
        raise ValueError(f"{data_dir} is {meta['task']} but the model in {cfg['ckpt']} is {task}")
    split = data.PreparedSplit(data_dir, cfg["split"])
    sub_columns = _subgroup_columns(cfg, split)
    tag = f"{metrics.safe_name(os.path.basename(os.path.normpath(data_dir)))}_{cfg['split']}" if external else cfg["split"]
    t0 = time.time()
    probs_all = runs.predict(net, split.images, meta_ck, cfg["batch_size"], cfg["tta"], cfg["tta_seed"], dev,
                        split_inputs(net, split))
    labels_all, labels_used = scoring_labels(data_dir, cfg["split"], split.labels, meta, cfg["eval_uncertain"])
    classes, probs, labels, rows, dropped_m, dropped_d = metrics.align_classes(
        model_classes, list(meta["classes"]), task, probs_all, labels_all)
    model_cols = [model_classes.index(c) for c in classes]
    print(f"{cfg['ckpt']} on {data_dir} {cfg['split']}: {len(rows)} images, {len(classes)} classes, "
          f"{'TTA x' + str(cfg['tta']) if cfg['tta'] else 'no TTA'}, inference {time.time() - t0:.1f} s | "
          f"labels: {labels_used}")
    if dropped_m or dropped_d:
        print(f"classes evaluated: the {len(classes)} shared by model and data | dropped (model only): "
              f"{dropped_m or '-'} | dropped (data only): {dropped_d or '-'}")

    # thresholds on the model's own validation split (the operating point must not be tuned on the test set)
    thresholds, thr_source = None, "argmax" if task == "multiclass" else "none (0.5)"
    if task == "multilabel":
        val_dir = own_dir if os.path.exists(os.path.join(own_dir, "meta.json")) else data_dir
        val_meta = data.load_meta(val_dir)
        if cfg["split"] == "val" and os.path.normpath(val_dir) == os.path.normpath(data_dir):
            vp, vl = probs_all, labels_all
        else:
            vs = data.PreparedSplit(val_dir, "val")
            vp = runs.predict(net, vs.images, meta_ck, cfg["batch_size"], cfg["tta"], cfg["tta_seed"], dev,
                         split_inputs(net, vs))
            vl, _ = scoring_labels(val_dir, "val", vs.labels, val_meta, cfg["eval_uncertain"])
        vclasses = list(val_meta["classes"])
        _, vp, vl, _, _, _ = metrics.align_classes(model_classes, vclasses, task, vp, np.asarray(vl, dtype=np.float32))
        vshared = [c for c in model_classes if c in vclasses]
        thr = metrics.choose_thresholds(vp, vl, cfg["threshold"], cfg["target_sensitivity"])
        thresholds = np.array([thr[vshared.index(c)] if c in vshared else 0.5 for c in classes])
        thr_source = f"{val_dir} val, {cfg['threshold']}" + (
            f" (sensitivity >= {cfg['target_sensitivity']})" if cfg["threshold"] == "sensitivity" else "")

    index = split.index
    groups = metrics.groups_from_index([index[i] for i in rows] if index else [], len(rows))
    rep = metrics.evaluation_report(probs, labels, classes, task, groups, thresholds, cfg["n_bootstrap"],
                                    cfg["bootstrap_seed"], cfg["n_bins"])
    info = net.run_info
    rep.update({"ckpt": cfg["ckpt"], "split": cfg["split"], "data_dir": data_dir, "weights": cfg["weights"],
                "model": net.model_args.get("model"), "iter": info.get("iter", info.get("iter_num")),
                "export": info.get("export"), "tta": cfg["tta"], "threshold_source": thr_source,
                "eval_uncertain": cfg["eval_uncertain"], "labels_used": labels_used, "data_hash": meta.get("data_hash"),
                "dropped_model_classes": dropped_m, "dropped_data_classes": dropped_d})
    print(metrics.format_report(rep))
    print(f"thresholds: {thr_source} | AUC CI: {cfg['n_bootstrap']} bootstrap resamples of "
          f"{rep['n_patients']} patients (seed {cfg['bootstrap_seed']})")

    pred_path = os.path.join(out_dir, f"predictions_{tag}.csv")
    metrics.write_predictions(pred_path, index, rows, classes, probs, labels, task)
    rep["predictions"] = os.path.basename(pred_path)
    written = [pred_path]
    name = f"{meta.get('name', '')} {meta.get('source', '')}".lower()
    if "chexpert" in name and task == "multilabel" and all(c in classes for c in metrics.CHEXPERT_COMPETITION):
        sub = os.path.join(out_dir, f"submission_{tag}.csv")
        n_studies = metrics.write_chexpert_submission(sub, index, rows, classes, probs)
        written.append(f"{sub} ({n_studies} studies)")

    tb = _tb_writer(out_dir) if cfg["tensorboard"] else None
    if cfg["figures"] or tb is not None:
        figs = metrics.make_figures(probs, labels, classes, task, rep)
        for kind, fig in figs.items():
            written += _save_figure(fig, cfg, tb, out_dir, tag, kind)
    if tb is not None:
        onehot = metrics.as_multilabel(labels, len(classes), task)
        for c, cname in enumerate(classes):
            known = ~np.isnan(onehot[:, c])
            if known.any():
                tb.add_pr_curve(f"{tag}/pr/{cname}", onehot[known, c].astype(bool), probs[known, c], 0)
            tb.add_scalar(f"{tag}/auc/{cname}", rep["auc"][cname] if rep["auc"][cname] == rep["auc"][cname] else 0.0, 0)

    if sub_columns:
        written += _subgroups(cfg, rep, probs, labels, groups, thresholds, [index[i] for i in rows] if index else [],
                              sub_columns, meta, out_dir, tag, tb)
    if cfg["cam"] > 0:
        images = split.images[rows] if len(rows) != len(split.images) else split.images
        cam_dir = os.path.join(out_dir, f"cam_{tag}")
        method, n_cam = cam_lib.write_cams(net, meta_ck, images, probs, labels, classes, model_cols, cfg["cam"], cam_dir,
                                       tb, dev)
        rep["cam"] = {"method": method, "dir": cam_dir, "n": n_cam}
        written.append(f"{cam_dir}/ ({n_cam} heatmaps, {method})")
    if tb is not None:
        tb.close()

    json_path = os.path.join(out_dir, f"eval_{tag}.json")
    with open(json_path, "w") as f:
        json.dump(metrics.to_json(rep), f, indent=1)
    if cfg["model_card"]:
        written += _model_card(cfg, net, meta, rep, data_dir, external, out_dir)
    print("wrote " + ", ".join([json_path] + written))
    return rep


# -----------------------------------------------------------------------------
# who the model fails (issue 36): subgroups of the index, and the model card


def _subgroup_columns(cfg, split):
    """The --subgroups columns, checked against the split's index before any inference."""
    if not cfg["subgroups"]:
        return []
    subgroups_lib.parse_age_bins(cfg["age_bins"])
    if not 0 < cfg["subgroup_alpha"] < 1:
        raise ValueError(f"--subgroup_alpha={cfg['subgroup_alpha']} must be between 0 and 1, e.g. 0.05")
    return subgroups_lib.check_columns(cfg["subgroups"], list(split.index[0]) if split.index else [])


def _subgroups(cfg, rep, probs, labels, patients, thresholds, index_rows, columns, meta, out_dir, tag, tb):
    """Per-group metrics, pairwise gaps and the worst group into rep['subgroups']; the CSV and the forest plot."""
    bins = subgroups_lib.parse_age_bins(cfg["age_bins"])
    name = meta.get("name", "")  # the group of every image for --subgroups=dataset when the index has no such column
    values = {c: subgroups_lib.subgroup_values(index_rows, c, bins, name if c == "dataset" else "") for c in columns}
    sub = subgroups_lib.subgroup_analysis(probs, labels, rep["classes"], rep["task"], patients, values, thresholds,
                                      cfg["n_bootstrap"], cfg["bootstrap_seed"], cfg["n_bins"], cfg["subgroup_alpha"],
                                      bins)
    rep["subgroups"] = sub
    print(subgroups_lib.format_subgroups(sub))
    csv_path = os.path.join(out_dir, f"subgroups_{tag}.csv")
    subgroups_lib.write_subgroups_csv(csv_path, sub, rep["classes"])
    written = [csv_path]
    if cfg["figures"] or tb is not None:
        title = f"{rep['model']} | {tag} | {rep['n_images']} images, {rep['n_patients']} patients"
        fig = subgroups_lib.forest_plot(sub, (rep["auc_macro"], *rep["auc_macro_ci"]), title)
        written += _save_figure(fig, cfg, tb, out_dir, tag, "subgroups")
        if tb is not None:
            for column, col in sub["columns"].items():
                for name, g in col["groups"].items():
                    if g["auc_macro"] == g["auc_macro"]:
                        tb.add_scalar(f"{tag}/subgroup_auc/{column}={name}", g["auc_macro"], 0)
    return written


def _model_card(cfg, net, meta, rep, data_dir, external, out_dir):
    """model_card.md + model_card.json in out_dir (beside the checkpoint by default), from the evaluation of the
    run's own test split."""
    if external or cfg["split"] != "test":
        print(f"model card: not written (it reports the run's own test split; this is {rep['split']} of {data_dir})")
        return []
    ck = common.load_checkpoint(cfg["ckpt"])
    card = card_lib.build(cfg["ckpt"], ck, sum(p.numel() for p in net.parameters()), meta, data_dir, rep)
    md_path, json_path = card_lib.write(out_dir, card)
    return [md_path, json_path]


def _tb_writer(out_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed (pip install tensorboard): no TensorBoard curves")
        return None
    return SummaryWriter(os.path.join(out_dir, "tb_eval"))


if __name__ == "__main__":
    configurator.cli(main)
