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


def _code_lines(text):
    """The shell lines of a page's ``` blocks, continuations joined, `for v in a b; do X; done` unrolled."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in re.sub(r"(\\|; do)\n\s*", lambda m: " " if m[1] == "\\" else "; do ", block).splitlines():
            line = line.split("  #")[0].strip()
            loop = re.match(r"for (\w+) in ([^;]+); do (.*?);? done$", line)
            if loop:
                var, values, body = loop.groups()
                lines += [re.sub(r"\$\{?" + var + r"\}?", v, body) for v in values.split()]
            else:
                lines.append(line)
    return lines


def doc_studies():
    """[(page, arm A's name, its train.py argv, arm B's name, its argv)] for every `compare.py --runs A --vs B` and
    every `compare.py --ablation GLOB --group_by=K --baseline=V` arm in docs/*.md whose runs the same page launches
    (`compare.py --launch --name=X -- <train.py args>`, shell variables of the page expanded)."""
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
            runs = re.search(r"--runs '?out/(\w+)_s\*'? --vs '?out/(\w+)_s\*'?", line)
            if runs and runs[1] in launched and runs[2] in launched:
                pairs.append((os.path.basename(page), runs[1], launched[runs[1]], runs[2], launched[runs[2]]))
            ablation = re.search(r"--ablation '?out/(\w*)\*'?.*--group_by=(\w+) --baseline=(\S+)", line)
            arms = {n: a for n, a in launched.items() if ablation and n.startswith(ablation[1])}
            if arms:  # (a page that only shows the command launches no arms)
                base = [n for n, a in arms.items() if load_arm(train.DEFAULTS, a)[ablation[2]] == ablation[3]]
                assert len(base) == 1, f"{page}: {line!r}: baseline arms {base}"
                pairs += [(os.path.basename(page), base[0], arms[base[0]], n, a) for n, a in arms.items() if n != base[0]]
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
    assert {("studies.md", "scratch", "pretrained"), ("studies.md", "study_scratch", "study_pretrained"),
            ("studies.md", "study_pretrained", "study_ft_lowlr"), ("fusion.md", "f64_vision", "f64_text")} <= found, found
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
