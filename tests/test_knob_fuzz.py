"""Issue 31: every int and float knob of every command, fed 0, -1, NaN and a huge value, either passes the
configurator's check or ends, before any work starts, in one line `error: ...` that names the knob (exit code 2),
never a traceback. In-process: configurator.cli around the config load each command's main() starts with. Every
recipe in config/ and every knob value the tests give a command pass the check. A few train.py values that pass are
run for 2 iterations on a tiny phantom, to show that they do not fail later instead."""

import ast
import glob
import importlib
import math
import os

import pytest

import configurator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("train", "train_clip", "train_gpt", "evaluate", "sample", "export", "serve", "sweep", "data", "bench",
            "ray_train")
ARGPARSE = {"phantom": [], "text_data": ["--dataset=phantom_reports"], "tokenizer": ["--train=docs.txt"],
            "compare": []}  # the commands on argparse (configurator.parse_args), with their required arguments


class Parsed(Exception):
    """Raised after configurator.parse_args has parsed and checked, so that the command does no work."""


def argparse_main(command, argv, monkeypatch):
    """An argparse command's main(required arguments + argv) up to configurator.parse_args: (parser, args)."""
    parse_args = configurator.parse_args

    def parse_and_stop(parser, argv, *rules):
        raise Parsed(parser, parse_args(parser, argv, *rules))
    with monkeypatch.context() as m:
        m.setattr(configurator, "parse_args", parse_and_stop)
        try:
            importlib.import_module(command).main(ARGPARSE[command] + argv)
        except Parsed as e:
            return e.args
    raise AssertionError(f"{command}.main returned without configurator.parse_args")


def configure(command, argv, capsys, monkeypatch):
    """`python <command>.py argv` up to its first piece of work: (exit code, stderr lines); 0 when the check passes.
    A configurator command loads its DEFAULTS (the first thing its main() does); an argparse one runs main() up to
    configurator.parse_args. Anything but a user error (a traceback) fails the test."""
    capsys.readouterr()
    if command in ARGPARSE:
        main = lambda: argparse_main(command, argv, monkeypatch)  # noqa: E731
    else:
        main = lambda: configurator.load(importlib.import_module(command).DEFAULTS, argv)  # noqa: E731
    try:
        configurator.cli(main)
    except SystemExit as e:
        return e.code, capsys.readouterr().err.strip().splitlines()
    return 0, []


def numeric_knobs(command, monkeypatch):
    """{name: default} of the command's int and float knobs (of an argparse command: its arguments)."""
    if command in ARGPARSE:
        parser, args = argparse_main(command, [], monkeypatch)
        defaults = {k: parser.get_default(k) for k in vars(args)}
    else:
        defaults = importlib.import_module(command).DEFAULTS
    return {k: v for k, v in defaults.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def assert_error(rc, lines, *names):
    assert rc == 2, f"exit code {rc}, stderr {lines}"
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"


def typed(default, value):
    """The text a person types for `value` (0, -1, "nan" or "huge") given to a knob of the type of `default`."""
    if value == "huge":
        return "1e30" if isinstance(default, float) else str(10**12)
    return str(value)


@pytest.mark.parametrize("command", [*COMMANDS, *ARGPARSE])
def test_every_numeric_knob_passes_or_is_a_one_line_error(command, capsys, monkeypatch):
    """0 and a huge value may pass; NaN never does, nor -1 where the knob's range does not go below 0."""
    defaults, ranges = numeric_knobs(command, monkeypatch), getattr(importlib.import_module(command), "RANGES", {})
    assert defaults, command
    for key, default in defaults.items():
        negative_ok = configurator.range_of(key, default, ranges).startswith("[-")
        for value in (0, -1, "nan", "huge"):
            text = typed(default, value)
            rc, lines = configure(command, [f"--{key}={text}"], capsys, monkeypatch)
            assert rc or not (value == "nan" or value == -1 and not negative_ok), f"--{key}={text} passed the check"
            if rc:
                shown = (text, repr(float(text))) if isinstance(default, float) else (text,)
                assert_error(rc, lines, key)
                assert any(s in lines[0] for s in shown), f"value {text} not named in {lines[0]!r}"


@pytest.mark.parametrize("command, argv, names", [
    ("train", ["--eval_interval=0"], ["--eval_interval=0", "[1, inf)"]),
    ("train", ["--log_interval=0"], ["--log_interval=0", "[1, inf)"]),
    ("train", ["--batch_size=0"], ["--batch_size=0", "[1, 65536]"]),
    ("train", ["--eval_batch_size=0"], ["--eval_batch_size=0", "[1, 65536]"]),
    ("train", ["--max_iters=-5"], ["--max_iters=-5", "[0, inf)"]),
    ("train", ["--drop_path=1.5"], ["--drop_path=1.5", "[0, 1)"]),
    ("train", ["--learning_rate=nan"], ["--learning_rate=nan", "[0, 1]"]),
    ("train_clip", ["--min_lr=inf"], ["--min_lr=inf", "[0, 1]"]),
    ("train_gpt", ["--dropout=1e30"], ["--dropout=1e+30", "[0, 1)"]),
    ("train", ["--seed=10000000000"], ["--seed=10000000000", "[0, 9999999]"]),  # overflowed the step generator
    ("train", ["--weight_decay=1e30"], ["--weight_decay=1e+30", "[0, 1]"]),  # a NaN loss at iteration 1
    ("train", ["--batch_size=1000000000000"], ["--batch_size", "[1, 65536]"]),  # a 7 TiB index array
    ("data", ["--val_frac=0.6", "--test_frac=0.6"], ["val_frac + test_frac < 1", "--val_frac=0.6", "--test_frac=0.6"]),
    ("train", ["--min_lr=0.1"], ["min_lr <= learning_rate", "--min_lr=0.1", "learning_rate=0.008"]),
    ("train", ["--lr_backbone_mult=1e30"], ["learning_rate * lr_backbone_mult <= 1", "--lr_backbone_mult=1e+30"]),
    ("train_gpt", ["--batch_size=65536", "--gradient_accumulation_steps=64"],
     ["batch_size * gradient_accumulation_steps <= 1048576", "--gradient_accumulation_steps=64"]),
    ("train", ["--device=gpu"], ["device='gpu'", "cpu, cuda, cuda:N"]),
    ("serve", ["--device=auto"], ["device='auto'", "cpu, cuda, cuda:N"]),  # serve does not resolve auto
    ("text_data", ["--val_frac=0.5", "--test_frac=0.5"], ["val_frac + test_frac < 1", "--test_frac=0.5"]),
    ("tokenizer", ["--vocab_size=0"], ["--vocab_size=0", "[257, 1048576]"]),
    ("phantom", ["--n_images=-1"], ["--n_images=-1", "[1, inf)"]),
    ("compare", ["--alpha=1.5"], ["--alpha=1.5", "(0, 1)"]),
    ("compare", ["--seeds=nan"], ["--seeds", "invalid int value: 'nan'"]),  # argparse's own error, on one line
])
def test_issue_examples_name_the_knob_the_value_and_the_range(command, argv, names, capsys, monkeypatch):
    assert_error(*configure(command, argv, capsys, monkeypatch), *names)


def test_a_default_outside_the_range_keeps_its_meaning(capsys, monkeypatch):
    """A knob whose default is a special value outside its range (0 = the model's size) takes the default, and only
    it, beside the range; the error and --help show both."""
    import train
    monkeypatch.setitem(train.DEFAULTS, "patch_size", 0)  # as a ViT knob that says "0 = the size's"
    assert configure("train", ["--patch_size=0"], capsys, monkeypatch)[0] == 0
    assert_error(*configure("train", ["--patch_size=-1"], capsys, monkeypatch), "patch_size must be in 0 or [1, 65536]")
    usage = configurator.usage(train.DEFAULTS, train).splitlines()
    assert "0 or [1, 65536]" in next(ln for ln in usage if ln.startswith("  --patch_size "))


def test_a_range_error_in_a_config_file_names_the_file(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("eval_interval = 0\n")
    assert_error(*configure("train", [str(recipe)], capsys, monkeypatch), f"{recipe}: eval_interval=0", "[1, inf)")


def test_mps_without_mps_says_so_and_lists_the_devices(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    rc, lines = configure("train", ["--device=mps"], capsys, monkeypatch)
    assert_error(rc, lines, "device='mps'", "no MPS", "cpu, cuda, cuda:N")


def test_cuda_index_past_the_gpus_is_an_error(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert configure("train", ["--device=cuda:1"], capsys, monkeypatch)[0] == 0
    assert_error(*configure("train", ["--device=cuda:2"], capsys, monkeypatch), "device='cuda:2'", "2 CUDA GPU(s)")


def test_ray_train_checks_the_script_s_device_by_its_form_only():
    """The Ray head node may have no GPU while its workers do: --device=cuda passes there, --device=gpu does not."""
    import ray_train
    assert configurator.load(importlib.import_module("train").DEFAULTS, ["--device=cuda:3"], here=False)
    with pytest.raises(configurator.ConfigError, match="device='gpu' is not a device"):
        ray_train.main(["train.py", "--device=gpu", "--num_workers=1"])


def test_help_shows_each_knob_s_range_and_the_rules_across_knobs():
    import data
    import train
    usage = configurator.usage(train.DEFAULTS, train).splitlines()
    lines = {ln.split()[0]: ln for ln in usage if ln.startswith("  --")}
    assert "[1, inf)" in lines["--log_interval"] and "[0, 1]" in lines["--learning_rate"]
    assert "[" not in lines["--model"]  # a string knob has no range
    assert "  val_frac + test_frac < 1  (" in configurator.usage(data.DEFAULTS, data)


def recipe_keys(path):
    ns = {}
    exec(compile(open(path).read(), path, "exec"), ns)
    return {k for k, v in ns.items() if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def test_every_recipe_passes_the_check_of_its_command(capsys, monkeypatch):
    """A recipe belongs to the commands that have all its knobs (config/clip_phantom.py: train_clip.py)."""
    defaults = {c: importlib.import_module(c).DEFAULTS for c in COMMANDS}
    recipes = sorted(glob.glob(os.path.join(ROOT, "config", "*.py")))
    assert len(recipes) >= 20
    for path in recipes:
        keys = recipe_keys(path)
        names = {configurator.ALIASES.get(k, k) for k in keys}
        owners = [c for c in COMMANDS if names <= set(defaults[c])]
        assert owners, f"{path}: no command has all of its knobs"
        for command in owners:
            rc, lines = configure(command, [path], capsys, monkeypatch)
            assert rc == 0, f"{command}.py {path}: {lines}"


def test_values_the_tests_give_the_commands_pass_the_check(capsys, monkeypatch):
    """Each `<command>.main([...])` call in tests/ (outside `pytest.raises`): the check passes its literal --knob=value
    items together (up to compare.py's `--`, after which come train.py's; not --device: a GPU test names cuda on a
    machine without one, and skips)."""
    calls = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "*.py"))):
        tree = ast.parse(open(path).read())
        raising = {id(n) for w in ast.walk(tree) if isinstance(w, ast.With)
                   and any("raises" in ast.unparse(i.context_expr) for i in w.items) for n in ast.walk(w)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or id(node) in raising or not node.args:
                continue
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "main" and isinstance(f.value, ast.Name)
                    and f.value.id in (*COMMANDS, *ARGPARSE) and isinstance(node.args[0], ast.List)):
                items = [e.value if isinstance(e, ast.Constant) else None for e in node.args[0].elts]
                items = items[:items.index("--")] if "--" in items else items
                calls.append((path, node.lineno, f.value.id, [a for a in items if isinstance(a, str) and
                                                              a.startswith("--") and "=" in a and
                                                              not a.startswith("--device=")]))
    assert len(calls) > 50, len(calls)
    for path, line, command, argv in calls:
        rc, lines = configure(command, argv, capsys, monkeypatch)
        assert rc == 0, f"{os.path.basename(path)}:{line} {command}.main({argv}): {lines}"


# -----------------------------------------------------------------------------
# values that pass the check do not fail later: 2 iterations of train.py on a tiny phantom

EDGES = {
    "zeros": ["--warmup_iters=0", "--lr_decay_iters=0", "--min_lr=0", "--grad_clip=0", "--weight_decay=0", "--beta1=0",
              "--beta2=0", "--lr_backbone_mult=0", "--loss=focal", "--focal_gamma=0", "--seed=0", "--dist_timeout=0"],
    "huge": [f"--{k}={10**12}" for k in ("eval_interval", "log_interval", "keep_last", "plateau_iters", "freeze_iters",
                                         "early_stop_patience", "dist_timeout", "lr_decay_iters", "warmup_iters")]
            + ["--eval_batch_size=65536", "--seed=9999999", "--mixup_alpha=1e30", "--loss=bce+focal",  # the bounds
               "--focal_gamma=1e30", "--finetune_mode=two_stage"],
    "high": ["--warmup_iters=0", "--learning_rate=1", "--min_lr=1", "--weight_decay=1", "--grad_clip=1e30",
             "--drop_path=0.99", "--dropout=0.99", "--ema_decay=0.999999", "--beta2=0.999999", "--layer_decay=1e-30",
             "--bce_weight=0", "--focal_alpha=1", "--loss=bce+focal"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", EDGES)
def test_edge_values_that_pass_run_two_iterations(name, tiny_phantom, tmp_path):
    """~3 s each on 2 cores; a non-finite loss would stop the run with FloatingPointError."""
    import train
    final = train.main([f"--data_dir={tiny_phantom}", f"--out_dir={tmp_path}", "--model=convnext_atto",
                        "--image_size=32", "--batch_size=8", "--max_iters=2", "--device=cpu", "--tensorboard=False",
                        *EDGES[name]])
    assert final["iters"] == 2 and math.isfinite(final["best_metric"]), final
