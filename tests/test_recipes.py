"""The recipes as the docs present them (issue 35): the arms of every study differ only in what the study varies, the
classifier's recipe knobs (optimizer, label smoothing, drop path, the min-LR tail, early stopping) do what they say,
vit_cxr's shape knobs rebuild the seed's 3,136-token model, and metrics.jsonl carries the per-group LRs, the loss
components and the training-subset metric. All fast: configs are loaded in-process, runs are 2-4 steps at 32 px."""

import glob
import json
import os
import re
import shlex

import pytest

import configurator
import train
import train_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# studies: the arms differ only in the treatment

# What a run's name or bookkeeping may change between arms (compare.py --launch sets out_dir and seed per run).
BOOKKEEPING = {"out_dir", "seed", "mlflow_experiment", "wandb_project"}
# Each study varies one thing and what must follow from it. Initialisation: the weights, their input normalization
# and the LR (a fine-tune runs at a fraction of the from-scratch peak; min_lr follows the peak).
TREATMENTS = {
    "initialisation": {"init_from", "pretrained_path", "norm", "learning_rate", "min_lr"},
    # an arm without the image (text, clinical) has no vision encoder to initialise: init_from follows
    "modalities": {"modalities", "init_from"},
    "teacher": {"teacher_ckpt"},
}


def _unroll(var, value, body):
    """body with $var, ${var} and bash's ${var/pattern/replacement} replaced by value."""
    body = re.sub(r"\$\{" + var + r"/([^/}]*)/([^}]*)\}", lambda m: value.replace(m[1], m[2], 1), body)
    return re.sub(r"\$\{?" + var + r"\b\}?", value, body)


def _code_lines(text):
    """The shell lines of a page's ``` blocks, continuations joined, `for v in a b; do X; done` unrolled."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in re.sub(r"(\\|; do)\n\s*", lambda m: " " if m[1] == "\\" else "; do ", block).splitlines():
            line = line.split("  #")[0].strip()
            loop = re.match(r"for (\w+) in ([^;]+); do (.*?);? done$", line)
            if loop:
                var, values, body = loop.groups()
                lines += [_unroll(var, v, body) for v in values.split()]
            else:
                lines.append(line)
    return lines


def doc_studies():
    """[(page, arm A's name, its train.py argv, arm B's name, its argv)] for every `compare.py --runs A --vs B` and
    every `compare.py --ablation GLOB --group_by=K --baseline=V` arm in docs/*.md whose runs the same page launches
    (`compare.py --launch --name=X -- <train.py args>`, or `train.py <args> --out_dir=out/X` for an ablation; shell
    variables and loops of the page expanded)."""
    pairs = []
    for page in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        variables, launched = {}, {}
        for line in _code_lines(open(page).read()):
            assign = re.match(r'^(\w+)="(.*)"$', line)
            if assign:
                variables[assign[1]] = assign[2]
                continue
            line = re.sub(r"\$(\w+)", lambda m: variables.get(m[1], m[0]), line)
            if "compare.py --launch" in line and " -- " in line:
                name = re.search(r"--name=(\S+)", line)[1]
                launched[name] = shlex.split(line.split(" -- ", 1)[1])
            elif re.search(r"\btrain\.py .*--out_dir=out/\S+", line):
                args = shlex.split(line.split("train.py", 1)[1])
                launched[next(a for a in args if a.startswith("--out_dir=out/"))[len("--out_dir=out/"):]] = args
            runs = re.search(r"--runs '?out/(\w+)_s\*'? --vs '?out/(\w+)_s\*'?", line)
            if runs and runs[1] in launched and runs[2] in launched:
                pairs.append((os.path.basename(page), runs[1], launched[runs[1]], runs[2], launched[runs[2]]))
            ablation = re.search(r"--ablation '?out/(\w*)\*'?.*--group_by=(\w+) --baseline=(\S+)", line)
            arms = {n: a for n, a in launched.items() if ablation and n.startswith(ablation[1])}
            if arms:  # (a page that only shows the command launches no arms)
                base = [n for n, a in arms.items() if load_arm(train.DEFAULTS, a)[ablation[2]] == ablation[3]]
                assert len(base) == 1, f"{page}: {line!r}: baseline arms {base}"
                pairs += [(os.path.basename(page), base[0], arms[base[0]], n, a)
                          for n, a in arms.items() if n != base[0]]
    return pairs


def load_arm(defaults, argv):
    """The config a command's arguments give, config files read from the repository whatever the cwd."""
    return configurator.load(defaults, [a if a.startswith("--") else os.path.join(ROOT, a) for a in argv])


def arm_difference(defaults, argv_a, argv_b):
    a, b = load_arm(defaults, argv_a), load_arm(defaults, argv_b)
    return {k for k in defaults if a[k] != b[k]} - BOOKKEEPING


def assert_one_treatment(study, diff):
    assert any(diff <= keys for keys in TREATMENTS.values()), \
        f"{study}: the arms differ in {sorted(diff)}, more than one study's treatment ({TREATMENTS})"


def test_doc_studies_arms_differ_only_in_their_treatment():
    pairs = doc_studies()
    found = {(page, a, b) for page, a, _, b, _ in pairs}
    # the parser must find the studies the docs present (a parser that finds nothing cannot fail)
    expected = {("studies.md", "scratch", "pretrained"), ("studies.md", "study_scratch", "study_pretrained"),
                ("studies.md", "study_pretrained", "study_ft_lowlr"), ("fusion.md", "f64_vision", "f64_text"),
                ("fusion.md", "fusion_vision_s1337", "fusion_vision+text_s1337")}
    assert expected <= found, found
    for page, a, argv_a, b, argv_b in pairs:
        assert_one_treatment(f"docs/{page}: {a} vs {b}", arm_difference(train.DEFAULTS, argv_a, argv_b))


@pytest.mark.parametrize("defaults,arm_a,arm_b", [
    # docs/studies.md, the CheXpert study (also found by the docs' parser above; named here with its rule)
    (train.DEFAULTS, ["config/convnext_chexpert_scratch.py"], ["config/convnext_chexpert.py"]),
    # config/distill_chexpert_atto.py's header: the student taught vs trained alone
    (train.DEFAULTS, ["config/distill_chexpert_atto.py"], ["config/distill_chexpert_atto.py", "--teacher_ckpt="]),
    # docs/clip.md, CLIP distillation: the student taught vs alone
    (train_clip.DEFAULTS, ["config/distill_clip_phantom.py"],
     ["config/distill_clip_phantom.py", "--teacher_ckpt=", "--out_dir=out/clip_student_alone"]),
], ids=["chexpert_pretraining", "distill_chexpert_atto", "distill_clip_phantom"])
def test_recipe_pairs_differ_only_in_their_treatment(defaults, arm_a, arm_b):
    diff = arm_difference(defaults, arm_a, arm_b)
    assert diff, f"{arm_a} vs {arm_b}: no difference at all"
    assert_one_treatment(f"{arm_a} vs {arm_b}", diff)


def test_chexpert_pretraining_arms_allowed_keys_only():
    """The seed's question, ImageNet or not, on the two config files exactly: init, normalization, LR."""
    diff = arm_difference(train.DEFAULTS, ["config/convnext_chexpert_scratch.py"], ["config/convnext_chexpert.py"])
    assert diff == {"init_from", "pretrained_path", "norm", "learning_rate", "min_lr"}, sorted(diff)


# -----------------------------------------------------------------------------
# vit_cxr's shape: the seed's 3,136 tokens at 224 px, knobs that rebuild from model_args


def test_vit_cxr_seed_variant_has_3136_tokens_at_224px():
    import torch
    import model as models
    seed = models.build_model("vit_cxr", 9, 1, 224, patch_size=4)  # 10 x 3 x 192, tokens at H/4 x W/4
    assert seed.pos_embed.shape == (1, 1 + 56 * 56, 192) and len(seed.blocks) == 10
    rebuilt = models.build_model(**seed.model_args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in seed.state_dict().items()}
    # one forward at 224 px, with one block of the same shape (the attention over 3,137 tokens is the cost: ~1 s)
    net = models.build_model("vit_cxr", 9, 1, 224, patch_size=4, n_layer=1).eval()
    tokens = []
    net.blocks[0].register_forward_hook(lambda m, i, o: tokens.append(o.shape[1]))
    with torch.no_grad():
        assert net(torch.randn(1, 1, 224, 224)).shape == (1, 9)
    assert tokens == [1 + 3136]  # [CLS] + 56 x 56


def test_vit_shape_knobs_leave_the_defaults_alone_and_refuse_other_models():
    import model as models
    old_args = dict(model="vit_cxr", num_classes=3, in_chans=1, image_size=64, drop_path=0.0, dropout=0.0,
                    grad_checkpoint=False)
    default = models.build_model("vit_cxr", 3, 1, 64)
    assert default.model_args == old_args  # the checkpoints written before the knobs rebuild the same model
    same = models.build_model("vit_cxr", 3, 1, 64, n_layer=0, n_head=0, n_embd=0, mlp_ratio=0.0, patch_size=0)
    assert same.model_args == old_args and len(same.blocks) == 10 and same.blocks[0].mlp.c_fc.out_features == 768
    small = models.build_model("vit_tiny", 3, 1, 32, n_layer=2, n_head=2, n_embd=64, mlp_ratio=2.0, patch_size=8)
    assert len(small.blocks) == 2 and small.blocks[0].mlp.c_fc.out_features == 128 and small.grid == 4
    with pytest.raises(ValueError, match="n_layer=2 shape a ViT"):
        models.build_model("convnext_atto", 3, 1, 32, n_layer=2)
    with pytest.raises(ValueError, match="multiple of n_head"):
        models.build_model("vit_cxr", 3, 1, 32, n_embd=50, n_head=3)
    with pytest.raises(ValueError, match="multiple of 4"):
        models.build_model("vit_cxr", 3, 1, 32, patch_size=6)


def test_vit_cxr_lung9_is_the_seeds_recipe():
    """patch_size 4 (3,136 tokens at 224 px) and a prepare command that splits train : val : test 5 : 2 : 1."""
    cfg = load_arm(train.DEFAULTS, ["config/vit_cxr_lung9.py"])
    assert (cfg["model"], cfg["image_size"], cfg["patch_size"]) == ("vit_cxr", 224, 4)
    header = open(os.path.join(ROOT, "config/vit_cxr_lung9.py")).read()
    val, test = (float(re.search(rf"--{k}=([0-9.]+)", header)[1]) for k in ("val_frac", "test_frac"))
    assert (1 - val - test) / test == pytest.approx(5) and val / test == pytest.approx(2)


# -----------------------------------------------------------------------------
# the recipe knobs: optimizer, label smoothing, drop path of torchvision models, the min-LR tail


def test_sgd_optimizer_knob_and_the_linear_probe_recipe():
    import torch
    import common
    import model as models
    net = models.build_model("convnext_atto", 3, 1, 32)
    groups = models.param_groups(net, 0.0)
    opt = common.make_optimizer(groups, 0.1, (0.9, 0.999), "cpu", "sgd", 0.9, True)
    assert isinstance(opt, torch.optim.SGD) and all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    adamw = common.make_optimizer(models.param_groups(net, 0.0), 1e-3, (0.9, 0.999), "cpu")
    assert isinstance(adamw, torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer must be adamw or sgd"):
        common.make_optimizer(models.param_groups(net, 0.0), 0.1, (0.9, 0.999), "cpu", "adam")
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        common.make_optimizer(models.param_groups(net, 0.0), 0.1, (0.9, 0.999), "cpu", "sgd", 0.0, True)
    cfg = load_arm(train.DEFAULTS, ["config/linear_probe_nih.py"])
    assert (cfg["optimizer"], cfg["learning_rate"], cfg["finetune_mode"]) == ("sgd", 0.1, "linear_probe")


def test_label_smoothing_applies_to_bce_and_focal():
    import torch
    import torch.nn.functional as F
    import losses
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]])
    y = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0]])
    cfg = dict(losses.LOSS_DEFAULTS, loss="bce", label_smoothing=0.2)
    known = ~torch.isnan(y)
    ref = F.binary_cross_entropy_with_logits(logits[known], y[known] * 0.8 + 0.1)  # 1 -> 0.9, 0 -> 0.1
    torch.testing.assert_close(losses.make_loss_fn(cfg, "multilabel", None)(logits, y), ref)
    plain = losses.make_loss_fn(dict(cfg, label_smoothing=0.0), "multilabel", None)(logits, y)
    assert not torch.isclose(plain, ref)
    focal = losses.make_loss_fn(dict(cfg, loss="focal", focal_gamma=0.0, focal_alpha=-1), "multilabel", None)
    torch.testing.assert_close(focal(logits, y), ref)  # gamma 0, no alpha: the focal loss is the BCE
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        losses.make_loss_fn(dict(cfg, label_smoothing=1.0), "multilabel", None)


def test_drop_path_reaches_torchvision_stochastic_depth_or_is_refused():
    from torchvision.ops import StochasticDepth
    import model as models
    net = models.build_model("tv:efficientnet_b0", 3, 1, 32, drop_path=0.3)
    rates = [m.p for m in net.modules() if isinstance(m, StochasticDepth)]
    assert len(rates) == 16 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    off = models.build_model("tv:efficientnet_b0", 3, 1, 32, drop_path=0.0)  # torchvision's own default (0.2) is off
    assert all(m.p == 0.0 for m in off.modules() if isinstance(m, StochasticDepth))
    with pytest.raises(ValueError, match="tv:resnet18 has no stochastic depth"):
        models.build_model("tv:resnet18", 3, 1, 32, drop_path=0.1)
    models.build_model("tv:resnet18", 3, 1, 32, drop_path=0.0)


def test_min_lr_tail_after_the_cosine():
    import common
    lrs = [common.get_lr(it, 1e-3, 2, 1, 10, 1e-5) for it in range(20)]
    assert lrs[2] == lrs[3] == 1e-3  # warmup 2, plateau 1
    assert all(a > b for a, b in zip(lrs[3:10], lrs[4:10])) and lrs[9] > 1e-5  # the cosine decays to ...
    assert lrs[10:] == [1e-5] * 10  # ... min_lr at lr_decay_iters, and stays there


# -----------------------------------------------------------------------------
# train.py runs: early stopping, the step and eval records (2-4 steps at 32 px on the tiny phantom)

TINY = ["--model=convnext_atto", "--image_size=32", "--batch_size=8", "--eval_batch_size=64", "--log_interval=1",
        "--tensorboard=False", "--warmup_iters=1"]


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_phantom):
    """LR 0: every eval scores the same, none improves on the first, so patience 2 stops at the second eval after it."""
    out = str(tmp_path_factory.mktemp("recipes") / "stopped")
    final = train.main([f"--data_dir={tiny_phantom}", f"--out_dir={out}", *TINY, "--learning_rate=0", "--min_lr=0",
                        "--max_iters=10", "--eval_interval=1", "--early_stop_patience=2"])
    return out, final


def test_early_stop_at_the_right_eval_keeps_the_best(stopped_run):
    import common
    out, final = stopped_run
    assert (final["iters"], final["best_iter"]) == (2, 0)
    assert [r["iter"] for r in _records(out) if r.get("split") == "val" and not r.get("final")] == [0, 1, 2]
    assert common.load_checkpoint(os.path.join(out, "best.pt"))["iter"] == 0
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["iter"] == 2


def test_resume_refuses_another_optimizer(tmp_path, tiny_phantom, stopped_run):
    import shutil
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(os.path.join(stopped_run[0], "ckpt.pt"), out / "ckpt.pt")
    with pytest.raises(ValueError, match="trained with optimizer='adamw', this run asks for 'sgd'"):
        train.main([f"--data_dir={tiny_phantom}", f"--out_dir={out}", *TINY, "--init_from=resume", "--optimizer=sgd",
                    "--max_iters=12"])


def test_step_records_carry_lr_per_group_and_loss_terms(tmp_path, tiny_phantom, stopped_run):
    """bce + focal + distillation from a teacher (the stopped run's best.pt), layer decay (one LR group per layer),
    the min-LR tail, the train-subset metric, and fixed subsets of train and val."""
    out = str(tmp_path / "run")
    train.main([f"--data_dir={tiny_phantom}", f"--out_dir={out}", *TINY, "--loss=bce+focal", "--layer_decay=0.8",
                f"--teacher_ckpt={stopped_run[0]}/best.pt", "--distill_alpha=0.4", "--max_iters=3",
                "--lr_decay_iters=2", "--learning_rate=1e-3", "--min_lr=1e-4", "--eval_interval=3",
                "--max_train_images=64", "--max_eval_images=40", "--train_subset_images=32"])
    recs = _records(out)
    steps = [r for r in recs if r.get("split") == "train"]
    assert [r["iter"] for r in steps] == [1, 2, 3]
    for r in steps:
        terms = {k: v for k, v in r.items() if k.startswith("loss/")}
        assert set(terms) == {"loss/bce", "loss/focal", "loss/distill"}
        assert sum(terms.values()) == pytest.approx(r["loss"], rel=1e-5)
        lrs = {k: v for k, v in r.items() if k.startswith("lr/")}
        assert {"lr/head_decay", "lr/head_no_decay", "lr/layer0_decay"} <= set(lrs) and len(lrs) > 4
        assert lrs["lr/head_decay"] == pytest.approx(r["lr"]) and lrs["lr/layer0_decay"] < r["lr"]
    assert steps[-1]["lr"] == 1e-4  # the step at iter 2 >= lr_decay_iters ran at min_lr
    evals = [r for r in recs if r.get("split") == "val" and not r.get("final")]
    assert all(0 <= r["train_subset_auc_macro"] <= 1 for r in evals)
    log = open(os.path.join(out, "train.log")).read()
    assert "train 64 | val 40 |" in log and "max_train_images=64: a fixed subset of the" in log
