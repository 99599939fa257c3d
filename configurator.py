"""
nanoGPT's command line, as an importable function.

    python train.py config/convnext_chexpert.py --batch_size=32 --compile=False

`load(defaults, argv)` applies, in order: each config file (a plain Python file, run in its own
namespace; its module-level names become overrides), then each `--key=value`. Every key must
already exist in `defaults` and keep its type (an int may become a float; bools take
True/False/true/false/1/0). A mistake is an error that names the key and the closest valid ones.
`--help` (or -h) prints the command's docstring and every knob with its default and source comment.

Scripts call it as `cfg = configurator.load(defaults, argv)` where `defaults` is the dict of their
module-level knobs, then read everything from `cfg`.

One vocabulary for the three train scripts: `tensorboard`, `init_from` = scratch | pretrained | resume and
`pretrained_path`. The older names still load, with a one-line deprecation message (ALIASES, VALUE_ALIASES).
"""

import ast
import difflib
import os
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
    width = max(len(k) for k in defaults)
    rows = [f"  --{k:<{width}} = {defaults[k]!r:<12}  {comments.get(k, '')}".rstrip() for k in defaults]
    return "\n".join([(module.__doc__ or "").strip(), "",
                      "knobs, set in config files and as --knob=value (later ones win); default, then meaning:", *rows])


def load(defaults, argv=None):
    """Return a new dict: `defaults` updated by config files and --key=value arguments in argv. `--help` (or -h)
    prints the usage of the command whose DEFAULTS these are (its docstring and knobs) and exits."""
    if any(a in ("--help", "-h") for a in (argv or [])):
        modules = list(sys.modules.values())
        owner = [m for m in modules if getattr(m, "__dict__", {}).get("DEFAULTS") is defaults]
        print(usage(defaults, owner[0] if owner else sys.modules["__main__"]))
        raise SystemExit(0)
    cfg = dict(defaults)
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
            continue
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} must look like --key=value")
        key, text = arg[2:].split("=", 1)
        key = _alias(key, cfg, f"--{key}")
        if key not in cfg:
            raise ConfigError(f"unknown config key {key!r}.{_closest(key, valid)} "
                              f"Valid keys: {', '.join(valid)}")
        cfg[key] = _coerce(key, _parse_literal(text, defaults[key]), defaults[key], f"--{key}")
    for (key, old), new in VALUE_ALIASES.items():
        if cfg.get(key) == old:
            print(f"{key}={old!r} is deprecated, use {key}={new!r}")
            cfg[key] = new
    return cfg


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
