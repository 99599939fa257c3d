"""
A model card (Mitchell et al. 2019, "Model Cards for Model Reporting", FAT* '19) written from what a run already
records: the checkpoint (model, knobs, provenance: git commit, torch, data hash), the run folder (metrics.jsonl: steps
and wall time), the prepared data (meta.json and the index files: sizes, patients, labels) and evaluate.py's report of
the test split (metrics with CIs, calibration, thresholds, subgroups). No field is typed by hand; what a run does not
record is written as "not recorded". evaluate.py writes <run>/model_card.md and model_card.json (the same facts);
serve.py's /v1/models returns the JSON.

    card = model_card.build(ckpt_path, ck, n_params, meta, data_dir, rep)   # ck: the loaded checkpoint dict
    md_path, json_path = model_card.write(out_dir, card)
"""

import csv
import json
import os

import metrics

# the knobs of the training recipe the card lists, when the checkpoint's config has them
RECIPE_KEYS = ("init_from", "pretrained_path", "finetune_mode", "batch_size", "gradient_accumulation_steps",
               "max_iters", "learning_rate", "weight_decay", "warmup_iters", "lr_decay_iters", "min_lr", "loss",
               "pos_weight", "label_smoothing", "augment", "mixup_alpha", "drop_path", "ema_decay", "select_metric",
               "early_stop_patience", "seed", "dtype", "device")
FIXTURE_STEPS = 100  # a run trained fewer steps than this is a smoke test of the code, and the card says so


def _read_final(run_dir):
    """The last `final` record of the run's metrics.jsonl (steps, wall time, best iteration), {} when absent."""
    path = os.path.join(run_dir, "metrics.jsonl")
    final = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line) if line.strip() else {}
                if rec.get("final"):
                    final = rec
    return final


def _patients(data_dir, split):
    path = os.path.join(data_dir, f"{split}_index.csv")
    if not os.path.exists(path):
        return None
    with open(path, newline="", encoding="utf-8") as f:
        return len({r.get("patient_id") or f"_row{i}" for i, r in enumerate(csv.DictReader(f))})


def build(ckpt_path, ck, n_params, meta, data_dir, rep):
    """The card as a dict of plain types. ck: the checkpoint dict; meta: the evaluated data's meta.json; rep:
    evaluate.py's report of the run's own test split (with rep['subgroups'] when --subgroups was given)."""
    cfg = ck.get("config") or {}
    args = ck.get("model_args") or {}
    final = _read_final(os.path.dirname(os.path.abspath(ckpt_path)))
    steps = final.get("iters", cfg.get("max_iters"))
    source = str(meta.get("source", ""))
    flags = []
    if source.startswith("phantom"):
        flags.append(f"a PHANTOM run: trained and tested on generated images ({source}), not on patients")
    if steps is not None and steps < FIXTURE_STEPS:
        flags.append(f"a FIXTURE run: {steps} training steps, a smoke test of the code, not a trained model")
    name = f"{args.get('model', '?')} on {meta.get('name', '?')}"
    card = {
        "title": f"Model card: {name}",
        "first_line": ("This is " + " and ".join(flags) + ". Do not use it for any decision about a person."
                       if flags else f"A research model ({name}); not a medical device."),
        "model": {"architecture": args.get("model"), "model_args": args, "parameters": int(n_params),
                  "script": ck.get("script"), "checkpoint": os.path.abspath(ckpt_path), "weights": rep.get("weights"),
                  "selected_iter": ck.get("iter", ck.get("iter_num")), "select_metric": cfg.get("select_metric"),
                  "best_val_metric": ck.get("best_metric"), "export": ck.get("export"),
                  "initialisation": cfg.get("init_from", "not recorded"),
                  "initialisation_source": cfg.get("pretrained_path") or None},
        "intended_use": {
            "primary": f"research on {meta.get('task', '?')} image classification of {len(rep['classes'])} findings "
                       f"({', '.join(rep['classes'])}) on data like {meta.get('name', '?')}",
            "not_for": ["diagnosis, triage or any other decision about a patient (not a medical device, not "
                        "cleared by any regulator)", "images from other sources, views or populations than the "
                        "training data without an evaluation there"]
            + (["anything but testing nanorad's code: the images are generated"] if flags else [])},
        "training_data": {"dataset": meta.get("name"), "source": source, "task": meta.get("task"),
                          "classes": meta.get("classes"), "label_policy": meta.get("label_policy"),
                          "image_size": meta.get("image_size"), "images": meta.get("splits"),
                          "patients": {s: _patients(data_dir, s) for s in (meta.get("splits") or {})},
                          "positives_train": (meta.get("pos_counts") or {}).get("train"),
                          "data_hash": meta.get("data_hash"), "prepare_config": meta.get("config")},
        "training": {"recipe": {k: cfg[k] for k in RECIPE_KEYS if k in cfg}, "steps": steps,
                     "wall_time_s": final.get("time_s"), "world_size": ck.get("world_size"),
                     "hardware": "not recorded beyond the device knob and the world size",
                     "git_commit": ck.get("git_commit"), "git_dirty": ck.get("git_dirty"),
                     "torch_version": ck.get("torch_version"), "cuda_version": ck.get("cuda_version"),
                     "data_hash": ck.get("data_hash")},
        "evaluation": {"split": rep["split"], "data_dir": rep.get("data_dir"), "data_hash": rep.get("data_hash"),
                       "images": rep["n_images"], "patients": rep["n_patients"], "labels": rep.get("labels_used"),
                       "tta": rep.get("tta"), "n_bootstrap": rep["n_bootstrap"],
                       "bootstrap_seed": rep["bootstrap_seed"]},
        "metrics": {"auc_macro": rep["auc_macro"], "auc_macro_ci": rep["auc_macro_ci"], "ap_macro": rep["ap_macro"],
                    "auc_micro": rep["auc_micro"], "ece": rep["ece"],
                    "per_class": {c: {k: r[k] for k in ("n_pos", "n_neg", "auc", "auc_ci", "ap", "threshold",
                                                        "sensitivity", "specificity")}
                                  for c, r in rep["per_class"].items()}},
        "thresholds": {"source": rep.get("threshold_source"),
                       "values": {c: r["threshold"] for c, r in rep["per_class"].items()}},
        "subgroups": _subgroup_summary(rep.get("subgroups")),
    }
    card["limitations"] = _limitations(card, rep, flags)
    return metrics.to_json(card)


def _subgroup_summary(sub):
    if not sub:
        return None
    rows = [{"column": c, "group": n, "images": g["n_images"], "patients": g["n_patients"],
             "auc_macro": g["auc_macro"], "auc_macro_ci": g["auc_macro_ci"], "ece": g["ece"],
             "sensitivity_macro": g["sensitivity_macro"], "specificity_macro": g["specificity_macro"],
             "note": g.get("reason")}
            for c, col in sub["columns"].items() for n, g in col["groups"].items()]
    worst = {c: col["worst"] for c, col in sub["columns"].items()}
    return {"rows": rows, "worst": worst, "correction": sub["correction"], "n_tests": sub["n_tests"],
            "alpha": sub["alpha"]}


def _limitations(card, rep, flags):
    """What the numbers say the model cannot be trusted for, each from a measured fact."""
    out = list(flags)
    wide = [c for c, r in rep["per_class"].items() if r["auc_ci"][0] == r["auc_ci"][0]
            and r["auc_ci"][1] - r["auc_ci"][0] > 0.1]
    if wide:
        out.append(f"wide AUC confidence intervals (> 0.1) for {', '.join(wide)}: the test set holds too few cases")
    few = [c for c, r in rep["per_class"].items() if r["n_pos"] < 30]
    if few:
        out.append(f"fewer than 30 test positives for {', '.join(few)}")
    if rep["excluded_from_macro"]:
        out.append(f"not scored (one label value in the test split): {', '.join(rep['excluded_from_macro'])}")
    if rep["ece"] == rep["ece"] and rep["ece"] > 0.05:
        out.append(f"probabilities are not calibrated (ECE {rep['ece']:.3f} > 0.05): do not read them as risks")
    sub = card["subgroups"]
    if sub is None:
        out.append("no subgroup analysis (evaluate.py --subgroups=sex,age,view gives one)")
    else:
        for c, w in sub["worst"].items():
            if w and w["gap"]:
                out.append(f"performs worse for {c}={w['group']} (macro AUC {w['auc_macro']:.3f} vs "
                           f"{w['auc_best']:.3f} for {w['best']}, Holm-adjusted p {w['p_holm']:.2g})")
    out.append("tested only on the test split of its own data set (no external validation)")
    if card["training"]["git_dirty"]:
        out.append("trained from a checkout with uncommitted changes: the git commit does not pin the code")
    return out


# -----------------------------------------------------------------------------
# markdown


def _f(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def _ci(ci):
    return "-" if ci is None or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def render(card):
    """The card as markdown, sections in Mitchell et al.'s order."""
    m, t, d, e, mt = card["model"], card["training"], card["training_data"], card["evaluation"], card["metrics"]
    L = [card["first_line"], "", f"# {card['title']}", "",
         "Written by evaluate.py from the checkpoint, the run folder, the prepared data and the test evaluation "
         "(model_card.json holds the same facts); no field is edited by hand.", "",
         "## Model details", "",
         f"- architecture: {m['architecture']} ({m['parameters']:,} parameters), {m['script']}; model_args "
         f"`{json.dumps(m['model_args'])}`",
         f"- initialisation: {m['initialisation']}" + (f" from {m['initialisation_source']}"
                                                     if m["initialisation_source"] else ""),
         f"- checkpoint: {m['checkpoint']} (weights: {m['weights']}, iteration {m['selected_iter']}, selected on "
         f"validation {m['select_metric']} = {_f(m['best_val_metric'], 4)})",
         f"- code: git commit {t['git_commit'] or 'not recorded'}" + (" (with uncommitted changes)"
                                                                     if t["git_dirty"] else "")
         + f"; torch {t['torch_version']}, CUDA {t['cuda_version'] or 'none'}", "",
         "## Intended use", "", f"- for: {card['intended_use']['primary']}"]
    L += [f"- not for: {x}" for x in card["intended_use"]["not_for"]]
    L += ["", "## Factors", ""]
    sub = card["subgroups"]
    L.append(f"- evaluated by: {', '.join(sorted({r['column'] for r in sub['rows']}))} (see the subgroup table)"
             if sub else "- no subgroup was evaluated (evaluate.py --subgroups=sex,age,view)")
    L += ["", "## Training data", "",
          f"- data set: {d['dataset']} ({d['source']}), {d['task']}, {d['image_size']} px",
          f"- classes: {', '.join(d['classes'] or [])}",
          f"- label policy: `{json.dumps(d['label_policy'])}`",
          "- images (patients): " + ", ".join(f"{s} {n} ({d['patients'].get(s) or '?'})"
                                              for s, n in (d["images"] or {}).items()),
          f"- data_hash: {d['data_hash']}", "",
          "## Training", "",
          f"- recipe: `{json.dumps(t['recipe'])}`",
          f"- steps: {t['steps']}; wall time: " + (f"{t['wall_time_s']:.0f} s" if t["wall_time_s"] is not None
                                                   else "not recorded")
          + f"; world size {t['world_size']}; hardware: {t['hardware']}", "",
          "## Evaluation data", "",
          f"- {e['split']} split of {e['data_dir']} (data_hash {e['data_hash']}): {e['images']} images, "
          f"{e['patients']} patients; labels: {e['labels']}; TTA {e['tta']}",
          f"- 95% CIs: {e['n_bootstrap']} patient-level bootstrap resamples (seed {e['bootstrap_seed']})", "",
          "## Metrics", "",
          f"- macro AUC {_f(mt['auc_macro'])} {_ci(mt['auc_macro_ci'])}, micro AUC {_f(mt['auc_micro'])}, "
          f"macro AP {_f(mt['ap_macro'])}",
          f"- calibration: ECE {_f(mt['ece'])}",
          f"- thresholds: chosen on {card['thresholds']['source']}", "",
          "| class | n_pos | n_neg | AUC | 95% CI | AP | threshold | sensitivity | specificity |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c, r in mt["per_class"].items():
        L.append(f"| {c} | {r['n_pos']} | {r['n_neg']} | {_f(r['auc'])} | {_ci(r['auc_ci'])} | {_f(r['ap'])} | "
                 f"{_f(r['threshold'])} | {_f(r['sensitivity'])} | {_f(r['specificity'])} |")
    L += ["", "## Quantitative analyses: subgroups", ""]
    if sub:
        L += ["| subgroup | images | patients | macro AUC | 95% CI | ECE | sensitivity | specificity |",
              "|---|---|---|---|---|---|---|---|"]
        for r in sub["rows"]:
            L.append(f"| {r['column']}={r['group']} | {r['images']} | {r['patients']} | {_f(r['auc_macro'])} | "
                     f"{_ci(r['auc_macro_ci'])} | {_f(r['ece'])} | {_f(r['sensitivity_macro'])} | "
                     f"{_f(r['specificity_macro'])} |" + (f" {r['note']}" if r["note"] else ""))
        L.append("")
        for c, w in sub["worst"].items():
            if w:
                L.append(f"- worst {c}: {w['group']}, difference to {w['best']} {_f(w['diff'])} {_ci(w['diff_ci'])}, "
                         f"Holm-adjusted p {_f(w['p_holm'], 4)}: " + ("a gap is claimed" if w["gap"]
                                                                       else "no gap is claimed"))
        L.append(f"- {sub['correction']}")
    else:
        L.append("not evaluated")
    L += ["", "## Ethical considerations", "",
          "- the model's errors fall on patients; the subgroup table above is the evidence of who it fails, and "
          "groups not listed there were not examined", "",
          "## Caveats and recommendations", ""]
    L += [f"- {x}" for x in card["limitations"]]
    return "\n".join(L) + "\n"


def write(out_dir, card):
    """model_card.md and model_card.json in out_dir; returns their paths."""
    md_path, json_path = os.path.join(out_dir, "model_card.md"), os.path.join(out_dir, "model_card.json")
    with open(json_path, "w") as f:
        json.dump(card, f, indent=1)
    with open(md_path, "w") as f:
        f.write(render(card))
    return md_path, json_path
