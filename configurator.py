"""
nanoGPT's command line, as an importable function.

    python train.py config/convnext_chexpert.py --batch_size=32 --compile=False

`load(defaults, argv)` applies, in order: each config file (a plain Python file, run in its own
namespace; its module-level names become overrides), then each `--key=value`. Every key must
already exist in `defaults` and keep its type (an int may become a float; bools take
True/False/true/false/1/0). A mistake is an error that names the key and the closest valid ones.
`--help` (or -h) prints the command's docstring and every knob with its default and source comment.
Then, before any work starts, every numeric knob is checked against its range (`check`: the command's RANGES and
CHECKS beside its knobs, else CONVENTIONS below) and the `device` knob against the devices this machine has: a value
out of range is an error that names the knob, the value and the range, never a traceback later in the run.

Scripts call it as `cfg = configurator.load(defaults, argv)` where `defaults` is the dict of their
module-level knobs, then read everything from `cfg`. The scripts on argparse call `parse_args(parser, argv, ...)`.

One vocabulary for the three train scripts: `tensorboard`, `init_from` = scratch | pretrained | resume and
`pretrained_path`. The older names still load, with a one-line deprecation message (ALIASES, VALUE_ALIASES).
"""

import ast
import difflib
import fnmatch
import os
import re
import sys
import types


class ConfigError(ValueError):
    pass


# old knob name -> its name now; (knob, old value) -> its value now
ALIASES = {"tensorboard_log": "tensorboard", "init_path": "pretrained_path"}
VALUE_ALIASES = {("init_from", "finetune"): "pretrained", ("init_from", "gpt2"): "pretrained"}


def _alias(key, cfg, source):
    """The current name of a knob given by its old name (with a deprecation line); other keys unchanged."""
    if key not in cfg and ALIASES.get(key) in cfg:
        print(f"{source}: {key!r} is deprecated, use {ALIASES[key]!r}")
        return ALIASES[key]
    return key


def _closest(key, valid):
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(near)}?" if near else ""


def _coerce(key, value, default, source):
    """Return `value` converted to the type of `default`, or raise naming the key."""
    if default is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(value, type(default)):
        return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    raise ConfigError(f"{source}: {key} expects {type(default).__name__} (default {default!r}), "
                      f"got {type(value).__name__} {value!r}")


def _parse_literal(text, default):
    if isinstance(default, bool) and text.lower() in ("true", "false", "1", "0"):
        return text.lower() in ("true", "1")
    if isinstance(default, float):
        try:  # nan and inf too, which literal_eval does not read: check() then names their knob and its range
            return float(text)
        except ValueError:
            pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string; _coerce reports a mismatch with the key's name
    return text if isinstance(default, str) and not isinstance(value, str) else value


def _knob_comments(paths, names):
    """{knob: the comment on its line} for `names`, from Python sources in order until each is found: top-level
    `name = value  # comment`, and the `name=value,  # comment` keywords of top-level calls (KNOBS = dict(...))."""
    import io
    import tokenize
    found = {}
    for path in paths:
        if all(n in found for n in names):
            break
        with open(path) as f:
            src = f.read()
        comments = {t.start[0]: t.string.lstrip("#").strip()
                    for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
        for node in ast.parse(src).body:
            if isinstance(node, ast.Assign):
                named = [(t.id, node.end_lineno) for t in node.targets if isinstance(t, ast.Name)]
                if isinstance(node.value, ast.Call):
                    named += [(k.arg, k.value.end_lineno) for k in node.value.keywords if k.arg]
                for name, line in named:
                    if name in names:
                        found.setdefault(name, comments.get(line, ""))
    return found


def usage(defaults, module):
    """`--help`: the command's docstring, then every knob with its default and the comment beside it in the source
    (the command's own file first, then the project files it imported, e.g. tracking.py for the tracker knobs)."""
    comments = {}
    own = os.path.abspath(getattr(module, "__file__", None) or "")
    if os.path.isfile(own):  # not for an interactive session
        def project_files(objects):  # (torch's _classes module names a file here that is not there)
            files = (os.path.abspath(getattr(o, "__file__", None) or "")
                     for o in objects if isinstance(o, types.ModuleType))
            return sorted(f for f in files if os.path.dirname(f) == os.path.dirname(own) and f.endswith(".py")
                          and os.path.isfile(f))
        paths = [own, *project_files(vars(module).values()), *project_files(list(sys.modules.values()))]
        comments = _knob_comments(dict.fromkeys(paths), set(defaults))  # the command, its imports, the rest
    ranges = {k: range_of(k, v, getattr(module, "RANGES", {})) for k, v in defaults.items()}
    ranges = {k: _shown(r, defaults[k]) if r else "" for k, r in ranges.items()}
    width, rwidth = max(len(k) for k in defaults), max(len(r) for r in ranges.values())
    rows = [f"  --{k:<{width}} = {defaults[k]!r:<12}  {ranges[k]:<{rwidth}}  {comments.get(k, '')}".rstrip()
            for k in defaults]
    checks = [f"  {expr}  ({why})" for expr, why in getattr(module, "CHECKS", {}).items()]
    return "\n".join([(module.__doc__ or "").strip(), "", "knobs, set in config files and as --knob=value (later ones "
                      "win); default, range (numbers: checked before the run starts), meaning:", *rows,
                      *(["", "and across knobs:", *checks] if checks else [])])


def _owner(defaults):
    """The command (module) whose DEFAULTS these are: its RANGES and CHECKS, its docstring for --help."""
    owner = [m for m in list(sys.modules.values()) if getattr(m, "__dict__", {}).get("DEFAULTS") is defaults]
    return owner[0] if owner else sys.modules["__main__"]


def load(defaults, argv=None, here=True):
    """Return a new dict: `defaults` updated by config files and --key=value arguments in argv, checked (`check`;
    here=False: a device is checked for its form, not for being on this machine, e.g. a Ray head node without GPUs).
    `--help` (or -h) prints the usage of the command whose DEFAULTS these are (its docstring and knobs) and exits."""
    if any(a in ("--help", "-h") for a in (argv or [])):
        print(usage(defaults, _owner(defaults)))
        raise SystemExit(0)
    cfg = dict(defaults)
    origin = {}  # knob -> the config file that set it, or "--" for the command line: named by check()
    valid = sorted(cfg)
    for arg in (argv or []):
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found (config files live in config/, e.g. config/quickstart.py)")
            ns = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), ns)
            for key, value in ns.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                key = _alias(key, cfg, arg)
                if key not in cfg:
                    raise ConfigError(f"{arg}: unknown config key {key!r}.{_closest(key, valid)}")
                cfg[key] = _coerce(key, value, defaults[key], arg)
                origin[key] = arg
            continue
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} must look like --key=value")
        key, text = arg[2:].split("=", 1)
        key = _alias(key, cfg, f"--{key}")
        if key not in cfg:
            raise ConfigError(f"unknown config key {key!r}.{_closest(key, valid)} "
                              f"Valid keys: {', '.join(valid)}")
        cfg[key] = _coerce(key, _parse_literal(text, defaults[key]), defaults[key], f"--{key}")
        origin[key] = "--"
    for (key, old), new in VALUE_ALIASES.items():
        if cfg.get(key) == old:
            print(f"{key}={old!r} is deprecated, use {key}={new!r}")
            cfg[key] = new
    owner = _owner(defaults)
    check(cfg, defaults, getattr(owner, "RANGES", {}), getattr(owner, "CHECKS", {}), origin, here)
    return cfg


# -----------------------------------------------------------------------------
# Ranges: every int and float knob of every command is checked before any work starts. A range is an interval
# ("[1, inf)": 1 or more; "(0, 1]": above 0, at most 1); NaN is in none, inf only where a bound says "inf]". A knob
# takes the range its command declares beside its knobs (RANGES = dict(knob="[lo, hi]")), else the first of these
# conventions its name matches, else "[0, inf)". A knob's default is valid too, so that a default outside the range
# keeps its documented meaning (train.py n_layer = 0: "0 = the named size's"; --help shows "0 or [1, 65536]").
# Cross-knob rules: the command's CHECKS = {"expression": "why"}.
CONVENTIONS = [
    # the train loops mix seed, iteration and rank into one signed 64-bit generator seed (seed * ~1.3e11 + ...)
    ("seed", "[0, 9999999]"), ("*_seed", "[0, 9999999]"),
    ("*_interval", "[1, inf)"), ("*_batches", "[1, inf)"),
    # a micro-batch's (and a global batch's) indices are drawn at once: more than 65536 per process fits no memory
    ("*batch_size", "[1, 65536]"), ("gradient_accumulation_steps", "[1, 65536]"),
    # one size of a model or an image (a side, a width, layers, heads, tokens): past 65536 nothing fits in memory
    ("n_layer", "[1, 65536]"), ("n_head", "[1, 65536]"), ("n_embd", "[1, 65536]"), ("n_prefix", "[1, 65536]"),
    ("*_layers", "[1, 65536]"), ("*_heads", "[1, 65536]"), ("*_width", "[1, 65536]"), ("*_dim", "[1, 65536]"),
    ("*vocab_size", "[1, 1048576]"), ("*_size", "[1, 65536]"), ("*_length", "[1, 65536]"),
    ("*_context", "[1, 65536]"), ("in_chans", "[1, 3]"),  # 1 for X-rays, 3 for RGB-pretrained weights
    ("n_*", "[1, inf)"), ("num_workers", "[0, 1024]"), ("*_workers", "[0, 1024]"), ("threads", "[0, 1024]"),
    ("num_*", "[1, inf)"),
    ("*dropout*", "[0, 1)"), ("drop_path", "[0, 1)"), ("*_frac", "[0, 1)"), ("label_smoothing", "[0, 1)"),
    ("beta1", "[0, 1)"), ("beta2", "[0, 1)"), ("ema_decay", "[0, 1)"), ("layer_decay*", "(0, 1]"),
    # AdamW: a step of more than 1 per weight, or a decay of more than all of it (lr * weight_decay > 1), diverges
    ("learning_rate", "[0, 1]"), ("*_lr", "[0, 1]"), ("weight_decay", "[0, 1]"),  # LR 0: a frozen run (tests)
    ("bce_weight", "[0, 1]"), ("focal_alpha", "[0, 1]"), ("distill_alpha", "[0, 1]"),
    ("distill_temperature", "(0, 100]"),  # the distillation term is scaled by T^2; Hinton et al. use 1-20
    ("temperature", "(0, inf)"), ("top_p", "(0, 1]"), ("target_sensitivity", "(0, 1]"),
    ("port", "[0, 65535]"),
]


def _interval(rule):
    """"[lo, hi)" -> a test of a value, from the interval's brackets and bounds."""
    m = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", rule)
    assert m, f"range {rule!r} is not an interval like [0, 1)"
    lo, hi = float(m[2]), float(m[3])
    return lambda v: (lo <= v if m[1] == "[" else lo < v) and (v <= hi if m[4] == "]" else v < hi)


def range_of(key, default, ranges):
    """The range a numeric knob is checked against (see CONVENTIONS); None for a knob of another type."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return None
    if key in ranges:
        return ranges[key]
    return next((rule for pattern, rule in CONVENTIONS if fnmatch.fnmatchcase(key, pattern)), "[0, inf)")


def _shown(rule, default):
    """The range as --help and the errors show it: with the default in front when the range leaves it out."""
    return rule if _interval(rule)(default) else f"{default!r} or {rule}"


def _device_error(value, default, here=True):
    """The sentence for a device that is not one or that this machine does not have (None when it has it): auto where
    the command resolves it (its default is auto), cpu, cuda, cuda:N for a GPU torch sees, mps on a Mac with Metal.
    here=False: any device of those forms passes (the run goes to other machines)."""
    import torch  # a command with a device knob has imported torch already
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    auto = ["auto"] * (default == "auto")
    has = [*auto, "cpu", *["cuda", f"cuda:0 to cuda:{n - 1}"] * (n > 0), *["mps"] * mps]
    valid = f"valid devices: {', '.join([*auto, 'cpu', 'cuda', 'cuda:N (N = the GPU index)', 'mps'])}; " \
            f"this machine has {', '.join(has)}"
    m = re.fullmatch(r"cuda(?::(\d+))?", value)
    if (value == "cpu" or value == "auto" and default == "auto" or value == "mps" and mps
            or (value == "mps" or m) and not here):
        return None
    if value == "mps":
        return f"device='mps' but this machine has no MPS (Apple GPU) backend; {valid}"
    if not m:
        return f"device={value!r} is not a device{' this command takes' * (value == 'auto')}; {valid}"
    if n == 0:
        return (f"device={value!r} but torch sees no CUDA GPU: use --device=cpu"
                f"{' (or auto)' if default == 'auto' else ''}, or install a CUDA build of torch")
    if m[1] is not None and int(m[1]) >= n:
        return f"device={value!r} but torch sees {n} CUDA GPU(s); {valid}"
    return None


def check(cfg, defaults, ranges=None, checks=None, origin=None, here=True):
    """Raise ConfigError naming the knob, its value and its range for the first numeric knob outside its range,
    the first cross-knob rule (checks: {"val_frac + test_frac < 1": "why"}) that fails, or a device this machine does
    not have. `origin` (knob -> "--" or the config file that set it) makes the sentence name where it was set."""
    ranges, checks, origin = ranges or {}, checks or {}, origin or {}

    def said(key):  # as it was set: --eval_interval=0, config/x.py: eval_interval=0 (or eval_interval=0, a default)
        where = origin.get(key, "")
        return f"--{key}={cfg[key]!r}" if where == "--" else f"{where}{': ' * bool(where)}{key}={cfg[key]!r}"
    unknown = set(ranges) - set(defaults)
    assert not unknown, f"RANGES names knobs that are not knobs: {sorted(unknown)}"
    for key, default in defaults.items():
        rule, value = range_of(key, default, ranges), cfg[key]
        if rule is not None and value != default and not _interval(rule)(value):
            raise ConfigError(f"{said(key)} is out of range: {key} must be in {_shown(rule, default)}")
    for expr, why in checks.items():
        code = compile(expr, "CHECKS", "eval")
        if not eval(code, {"__builtins__": {}}, dict(cfg)):
            values = ", ".join(said(n) for n in code.co_names)
            raise ConfigError(f"{expr} is required ({why}), got {values}")
    if isinstance(defaults.get("device"), str):
        error = _device_error(cfg["device"], defaults["device"], here)
        if error:  # the sentence names device='...' itself
            where = origin.get("device", "--")
            raise ConfigError(error if where == "--" else f"{where}: {error}")


def parse_args(parser, argv=None, ranges=None, checks=None):
    """argparse for the commands that use it (phantom.py, text_data.py, tokenizer.py, compare.py), with the knobs'
    rules: a parser error is a ConfigError (one line, exit code 2 under cli) and the numeric arguments are checked by
    `check` (CONVENTIONS, then `ranges` and `checks` as a command's RANGES and CHECKS) before any work starts."""
    def error(message):
        raise ConfigError(f"{parser.prog}: {message} (--help lists the arguments)")
    parser.error = error
    args = parser.parse_args(argv)
    cfg = vars(args)
    defaults = {k: parser.get_default(k) for k in cfg}
    check(cfg, defaults, ranges, checks, {k: "--" for k in cfg if cfg[k] != defaults[k]})
    return args


def format_config(cfg, defaults=None):
    """One `key = value` line per knob; with defaults, only the knobs that differ from them."""
    items = [(k, v) for k, v in cfg.items() if defaults is None or defaults.get(k, object()) != v]
    if not items:
        return "  (all defaults)"
    width = max(len(k) for k, _ in items)
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in items)


# -----------------------------------------------------------------------------
# The scripts' entry point: `if __name__ == "__main__": configurator.cli(main)`

# A user's mistake (a config key or value, a missing data folder or file, a checkpoint of another kind, a device that
# is not there, a missing optional package) is raised as one of these with a sentence that names the thing and the
# fix; on the command line that sentence is all the user needs, not the traceback under it.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError)


def cli(main):
    """Run main() (which reads sys.argv) as a command: a user error prints `error: <sentence>` on stderr and exits
    with code 2 (the code argparse uses for a usage error). NANORAD_TRACEBACK=1 re-raises it with the traceback."""
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("NANORAD_TRACEBACK", "0") not in ("", "0"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) adds quotes around the sentence
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)  # one line, whatever the sentence's newlines
        sys.exit(2)
