"""The docs name real things: every `python <file>.py ...` and `torchrun ... <file>.py ...` command in README.md and
docs/*.md names a file that exists and only knobs that file accepts, every `config/<name>.py` exists and sets only
knobs of the command it is given to, and the README stays a front door (<= 20,000 bytes, CI's test command as written,
its links resolve). Nothing is run: a command's knobs are its module's DEFAULTS (what configurator.load checks) or, for
the argparse commands, the options its add_argument calls declare.

Commands are read from fenced code blocks, from lines that start with a command (indented code), and from inline
`code` in prose. A fenced block marked `text` is a transcript (output, or a mistake shown on purpose) and is skipped."""

import ast
import difflib
import functools
import glob
import importlib
import os
import re
import shlex
import sys

import configurator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
CI_TEST_COMMAND = "pip install -r requirements.txt && python -m pytest"  # .ci/run runs the README's line as written
COMMAND_START = re.compile(r"^\s*(?:[A-Z_]+=\S+\s+)*(?:(?:/usr/bin/)?time\s+(?:-v\s+)?)?(?:python3?|torchrun)\s")


# -----------------------------------------------------------------------------
# the commands of a markdown text


def _code_lines(text):
    """[(line number, shell line)]: fenced code (not `text` blocks), command lines outside fences, inline code spans.
    Backslash continuations are joined; comments are dropped."""
    out, fence, info, pending = [], False, "", None
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fence, info = not fence, line.strip()[3:].strip() if not fence else ""
            continue
        if (fence and info != "text") or (not fence and COMMAND_START.match(line)):
            code = re.sub(r"(^|\s)#.*", "", line).rstrip()
            if pending is not None:
                code, n = pending[1] + " " + code.strip(), pending[0]
            if code.endswith("\\"):
                pending = (n, code[:-1].rstrip())
                continue
            pending = None
            out.append((n, code.strip()))
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for m in re.finditer(r"`([^`]+)`", prose):
        if COMMAND_START.match(m.group(1)):
            out.append((prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())))
    return out


def commands(text):
    """[(line number, script, [args])] of every python / torchrun command; shell variables set in a code block
    (NAME="...") are expanded where they are used."""
    found, variables = [], {}
    for n, line in _code_lines(text):
        for segment in re.split(r"&&|;|\|", line):
            assign = re.fullmatch(r"\s*(\w+)=\"(.*)\"\s*", segment)
            if assign:
                variables[assign.group(1)] = assign.group(2)
                continue
            for name, value in variables.items():
                segment = re.sub(r"\$\{?" + name + r"\b\}?", lambda _: value, segment)
            try:
                tokens = shlex.split(segment)
            except ValueError:
                tokens = segment.split()
            for i, tok in enumerate(tokens):
                if tok in ("python", "python3") and i + 1 < len(tokens) and tokens[i + 1].endswith(".py"):
                    found.append((n, tokens[i + 1], tokens[i + 2:]))
                    break
                if tok == "torchrun":
                    rest = [t for t in tokens[i + 1:]]
                    scripts = [j for j, t in enumerate(rest) if not t.startswith("-") and t.endswith(".py")]
                    if scripts:
                        found.append((n, rest[scripts[0]], rest[scripts[0] + 1:]))
                    break
    return found


# -----------------------------------------------------------------------------
# what a command accepts


@functools.lru_cache(maxsize=None)
def knobs(script):
    """(the knob names `script` accepts, its DEFAULTS or None for an argparse command)."""
    name = os.path.basename(script)[:-3]
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    defines_defaults = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "DEFAULTS" for t in n.targets)
                           for n in tree.body)
    if defines_defaults:
        defaults = importlib.import_module(name).DEFAULTS
        return frozenset(defaults) | {"help", "h"}, defaults
    options = {a.value[2:] for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") ==
               "add_argument" for a in n.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return frozenset(options) | {"help", "h"}, None


def _placeholder(token):
    return any(c in token for c in "<>$*") or token in ("...", "…")


def _check_config(path, script, defaults):
    """A config file's module-level names, read the way configurator.load reads them, must be knobs of `script`."""
    ns = {}
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), ns)
    keys = [k for k, v in ns.items() if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"]
    return [f"{os.path.relpath(path, ROOT)} sets {k!r}, which {script} does not accept" for k in keys
            if k not in defaults]


def check_command(script, args, extra=frozenset()):
    """The problems of one documented command: a file that is not there, a knob the file does not accept (or an
    old name configurator.ALIASES still maps), a config file that is not there or sets such a knob. `extra`: knobs a
    launcher takes beside the script's (ray_train.py's own)."""
    if _placeholder(script):
        return []
    if not os.path.isfile(os.path.join(ROOT, script)):
        return [f"{script} does not exist"]
    if os.path.basename(script) == "compare.py" and "--" in args:  # --launch ... -- <train.py arguments>
        cut = args.index("--")
        evaluate = [a for a in args if a.startswith("--eval_args=")]
        return (check_command(script, args[:cut]) + check_command("train.py", args[cut + 1:])
                + check_command("evaluate.py", evaluate[0].split("=", 1)[1].split() if evaluate else []))
    if os.path.basename(script) == "ray_train.py" and args and args[0].endswith(".py"):
        return check_command(args[0], args[1:], extra=knobs("ray_train.py")[0])
    valid, defaults = knobs(script)
    valid = valid | extra
    problems = []
    for arg in args:
        if arg.startswith("--") and len(arg) > 2:
            key = arg[2:].split("=", 1)[0]
            if key in configurator.ALIASES:
                problems.append(f"{script} --{key}: an old name, use --{configurator.ALIASES[key]}")
            elif key not in valid and not _placeholder(key):
                near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
                problems.append(f"{script} has no knob --{key}{hint}")
        elif defaults is not None and arg.endswith(".py") and not _placeholder(arg):
            path = os.path.join(ROOT, arg)
            problems += _check_config(path, script, defaults) if os.path.isfile(path) else [f"{arg} does not exist"]
    return problems


def problems(text):
    """Every stale name in a markdown text: 'line N: <problem>'."""
    out = [f"line {n}: {p}" for n, script, args in commands(text) for p in check_command(script, args)]
    for m in re.finditer(r"(?<![\w/.])config/[\w.-]+\.py", text):
        if not os.path.isfile(os.path.join(ROOT, m.group(0))):
            out.append(f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)} does not exist")
    return sorted(set(out), key=lambda p: (int(p.split(":")[0][5:]), p))


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# -----------------------------------------------------------------------------
# the docs as they are


def test_every_documented_command_names_real_files_and_knobs():
    bad = [f"{os.path.relpath(p, ROOT)} {q}" for p in PAGES for q in problems(_read(p))]
    assert bad == [], "stale commands in the docs (fix the doc, or the knob's name):\n" + "\n".join(bad)


def test_the_docs_have_commands_to_check():
    """The parser finds the commands it should, so that a pass above means something."""
    found = {(script, tuple(args)) for p in PAGES for _, script, args in commands(_read(p))}
    assert ("train.py", ()) in found
    assert ("evaluate.py", ("--ckpt=out/quickstart/best.pt", "--split=test")) in found
    assert sum(1 for p in PAGES for _ in commands(_read(p))) > 100


def test_readme_is_a_front_door():
    assert os.path.getsize(README) <= 20_000, f"README.md is {os.path.getsize(README)} bytes: move a section to docs/"
    readme, ci = _read(README), _read(os.path.join(ROOT, ".ci", "run"))
    assert CI_TEST_COMMAND in ci.splitlines(), ".ci/run no longer runs the README's test command as written"
    assert any(line.split("#")[0].strip() == CI_TEST_COMMAND for line in readme.splitlines()), (
        f"README.md must keep the line CI runs: {CI_TEST_COMMAND}")


def test_links_between_pages_resolve():
    bad = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", _read(page)):
            if not os.path.isfile(os.path.join(os.path.dirname(page), target)):
                bad.append(f"{os.path.relpath(page, ROOT)} links to {target}, which does not exist")
    assert bad == [], "\n".join(bad)


# -----------------------------------------------------------------------------
# the checks on made-up markdown: each kind of stale name is caught


def test_a_knob_that_does_not_exist_fails():
    md = "Train:\n\n```\npython train.py --learning_rat=1e-3   # a typo\n```\n"
    assert problems(md) == ["line 4: train.py has no knob --learning_rat (did you mean learning_rate?)"]


def test_files_configs_and_knobs_in_every_form_are_checked(tmp_path):
    bad_config = tmp_path / "bad.py"
    bad_config.write_text("max_iters = 10\nlearnig_rate = 1e-3\n")
    md = "\n".join([
        "Run `python evaluate.py --ckpt=x.pt --splitt=test` in prose,",  # 1: inline code
        "```",
        "python nosuch.py --x=1",  # 3
        "torchrun --standalone --nproc_per_node=4 train.py config/nosuch_recipe.py \\",  # 4: continued
        "    --batch_size=8 --tensorboard_log=True",
        f"python train.py {bad_config}",  # 6: a config file with a bad key
        'C="config/quickstart.py --max_iter=5"',
        "python compare.py --launch --seeds=2 --eval_args=\"--figures=False --figurs=1\" -- $C",  # 8
        "python ray_train.py train.py --num_workers=2 --num_wrkers=3",  # 9
        "python text_data.py --dataset=iu_xray --vocab=1024",  # 10: an argparse command
        "```",
        "```text",
        "$ python train.py --learning_rat=1e-3     # a transcript: not checked",
        "```",
        "    python sample.py --out_dir=out/x --temprature=0",  # 15: indented code
    ])
    assert problems(md) == [
        "line 1: evaluate.py has no knob --splitt (did you mean split?)",
        "line 3: nosuch.py does not exist",
        "line 4: config/nosuch_recipe.py does not exist",
        "line 4: train.py --tensorboard_log: an old name, use --tensorboard",
        f"line 6: {os.path.relpath(str(bad_config), ROOT)} sets 'learnig_rate', which train.py does not accept",
        "line 8: evaluate.py has no knob --figurs (did you mean figures?)",
        "line 8: train.py has no knob --max_iter (did you mean max_iters, warmup_iters, plateau_iters?)",
        "line 9: train.py has no knob --num_wrkers (did you mean num_workers, cpus_per_worker, trackers?)",
        "line 10: text_data.py has no knob --vocab (did you mean vocab_size?)",
        "line 15: sample.py has no knob --temprature (did you mean temperature?)",
    ]


def test_a_readme_without_the_ci_command_or_over_size_is_caught(tmp_path, monkeypatch):
    small = tmp_path / "README.md"
    small.write_text("# x\n\n```\npython -m pytest\n```\n")
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text(CI_TEST_COMMAND + "\n")
    monkeypatch.setattr(sys.modules[__name__], "README", str(small))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    try:
        test_readme_is_a_front_door()
    except AssertionError as e:
        assert "must keep the line CI runs" in str(e)
    else:
        raise AssertionError("a README without CI's test command passed")
    small.write_text(CI_TEST_COMMAND + "\n" + "x" * 20_001)
    try:
        test_readme_is_a_front_door()
    except AssertionError as e:
        assert "move a section to docs/" in str(e)
    else:
        raise AssertionError("a README over 20,000 bytes passed")
