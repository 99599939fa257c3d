"""The layout rules of DESIGN.md, read from the AST of every top-level *.py: each file has a layer (LAYERS, the table
docs/architecture.md shows), imports point down or sideways within a layer (no command imports a command), no cycle,
no private name (_x) is used across files, and a project module imported inside a function says why in a comment (on
the import line or the line above)."""

import ast
import functools
import os
import re
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ("leaves", "plumbing", "data", "models", "runs", "commands")  # bottom to top: imports at or below one's own

# file -> (layer, why it is also a command: "" for a library, or for a command, which is one anyway). The library files
# with a main() make a data set or a tokenizer from the shell without a second file; nothing imports a command.
LAYERS = {
    "train.py": ("commands", ""),
    "train_clip.py": ("commands", ""),
    "train_gpt.py": ("commands", ""),
    "evaluate.py": ("commands", ""),
    "compare.py": ("commands", ""),
    "sweep.py": ("commands", ""),
    "sample.py": ("commands", ""),
    "export.py": ("commands", ""),
    "bench.py": ("commands", ""),
    "serve.py": ("commands", ""),
    "ray_train.py": ("commands", ""),
    "runs.py": ("runs", ""),
    "cam.py": ("runs", ""),
    "model.py": ("models", ""),
    "model_clip.py": ("models", ""),
    "model_gpt.py": ("models", ""),
    "model_bert.py": ("models", ""),
    "fusion.py": ("models", ""),
    "losses.py": ("models", ""),
    "data.py": ("data", "`python data.py --dataset=X` prepares a data set, the step every run needs first; "
                        "the commands import its loader"),
    "readers.py": ("data", ""),
    "phantom.py": ("data", "`python phantom.py` times the generator and saves a grid of examples; data.py, readers.py "
                           "and text_data.py import the generator"),
    "text_data.py": ("data", "`python text_data.py --dataset=X` prepares a text data set for train_gpt.py; "
                             "train_gpt.py and sample.py import its sampler and metrics"),
    "common.py": ("plumbing", ""),
    "tracking.py": ("plumbing", ""),
    "configurator.py": ("leaves", ""),
    "metrics.py": ("leaves", ""),
    "subgroups.py": ("leaves", ""),
    "model_card.py": ("leaves", ""),
    "tokenizer.py": ("leaves", "`python tokenizer.py --train / --compare` trains a BPE or compares tokens per caption; "
                               "fusion.py, text_data.py and the CLIP / GPT commands import the tokenizers"),
    "labeler.py": ("leaves", ""),
}
ARCHITECTURE = os.path.join(ROOT, "docs", "architecture.md")


def _files(root):
    return sorted(f[:-3] for f in os.listdir(root) if f.endswith(".py") and not f.startswith("."))


def _parse(name, root=ROOT):
    return _parse_root(name) if root == ROOT else _read(name, root)


@functools.lru_cache(maxsize=None)  # every check reads the same files of the real tree
def _parse_root(name):
    return _read(name, ROOT)


def _read(name, root):
    path = os.path.join(root, name + ".py")
    with open(path, encoding="utf-8") as f:
        src = f.read()
    return ast.parse(src, path), src.splitlines()


def _imports(tree, project):
    """[(module, node, local, aliases {name bound in this file -> module}, from-imported names)] of project modules."""
    out = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    top = a.name.split(".")[0]
                    if top in project:
                        out.append((top, child, local, {a.asname or top: top}, []))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                top = child.module.split(".")[0]
                if top in project:
                    out.append((top, child, local, {}, [a.name for a in child.names]))
            visit(child, inner)

    visit(tree, False)
    return out


def _graph(root=ROOT):
    files = _files(root)
    return {name: {m for m, *_ in _imports(_parse(name, root)[0], set(files)) if m != name} for name in files}


def unlayered(root, layers):
    """The top-level .py files of root without a row in layers."""
    return [f"{name}.py has no layer: add it to LAYERS (tests/test_layout.py) and to docs/architecture.md"
            for name in _files(root) if name + ".py" not in layers]


def layer_violations(root, layers):
    """Every import in root's top-level .py files that points up the layers, or from a command to a command."""
    rank = {f[:-3]: ORDER.index(layer) for f, (layer, _) in layers.items()}
    bad = []
    for name, deps in sorted(_graph(root).items()):
        for m in sorted(deps):
            if name not in rank or m not in rank:
                continue  # unlayered() reports the file
            here, there = layers[name + ".py"][0], layers[m + ".py"][0]
            if rank[m] > rank[name]:
                bad.append(f"{name}.py ({here}) imports {m} ({there}), a layer above it")
            elif here == there == "commands":
                bad.append(f"{name}.py imports {m}: a command is not a library; move what two commands share into "
                           f"a library file below them")
    return bad


def architecture_table(text):
    """{file: (layer, why also a command)} from the rows of the layer table in docs/architecture.md."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+\.py`", cells[0]) and cells[1] in ORDER:
            rows[cells[0].strip("`")] = (cells[1], cells[3])
    return rows


def test_every_file_has_a_layer():
    assert unlayered(ROOT, LAYERS) == []
    gone = sorted(set(LAYERS) - {f + ".py" for f in _files(ROOT)})
    assert gone == [], f"LAYERS names files that are not there: {gone}"


def test_imports_point_down_or_sideways():
    assert layer_violations(ROOT, LAYERS) == [], "\n".join(layer_violations(ROOT, LAYERS))


def test_architecture_page_shows_layers():
    with open(ARCHITECTURE, encoding="utf-8") as f:
        page = architecture_table(f.read())
    assert page == LAYERS, ("docs/architecture.md's layer table and LAYERS (tests/test_layout.py) differ: "
                            f"{sorted(set(page.items()) ^ set(LAYERS.items()))}")


def test_the_layer_checks_fail_on_a_bad_tree(tmp_path):
    """A copy of the tree with an upward import (data.py imports model) and a command imported by a library, and a new
    file with no layer: the checkers name each, so a pass on the real tree means something."""
    for f in _files(ROOT):
        shutil.copy(os.path.join(ROOT, f + ".py"), tmp_path / (f + ".py"))
    before = set(layer_violations(str(tmp_path), LAYERS))  # the real tree's own, reported by the tests above
    with open(tmp_path / "data.py", "a") as f:
        f.write("\nimport model\n")
    with open(tmp_path / "tracking.py", "a") as f:
        f.write("\nimport train\n")
    with open(tmp_path / "evaluate.py", "a") as f:
        f.write("\nimport sample\n")
    (tmp_path / "new_thing.py").write_text("import common\n")
    assert sorted(set(layer_violations(str(tmp_path), LAYERS)) - before) == [
        "data.py (data) imports model (models), a layer above it",
        "evaluate.py imports sample: a command is not a library; move what two commands share into a library file "
        "below them",
        "tracking.py (plumbing) imports train (commands), a layer above it"]
    new = "new_thing.py has no layer: add it to LAYERS (tests/test_layout.py) and to docs/architecture.md"
    assert new in unlayered(str(tmp_path), LAYERS)
    table = "| `x.py` | models | a model | |\n| `y.py` | nowhere | ? | |\n"
    assert architecture_table(table) == {"x.py": ("models", "")}


def _cycles(graph):
    """Every strongly connected component with more than one file (Tarjan), sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def test_the_checks_catch_what_they_look_for():
    """The rules on hand-made graphs and sources, so that a pass below means something."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("import model as models\ndef f():\n    import data\n    return models._init_weights\n")
    found = _imports(tree, {"model", "data"})
    assert [(m, local) for m, _, local, _, _ in found] == [("model", False), ("data", True)]
    assert _private_uses(tree, found) == ["model._init_weights"]


def _private_uses(tree, found):
    aliases = {k: v for _, _, _, a, _ in found for k, v in a.items()}
    uses = [f"{m}.{n}" for m, *_, names in found for n in names if n.startswith("_") and not n.startswith("__")]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            uses.append(f"{aliases[node.value.id]}.{node.attr}")
    return sorted(set(uses))


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_no_private_name_across_files():
    bad = []
    project = set(_files(ROOT))
    for name in _files(ROOT):
        tree, _ = _parse(name)
        bad += [f"{name}.py uses {u}" for u in _private_uses(tree, _imports(tree, project))]
    assert bad == [], "make the shared name public in its file\n" + "\n".join(bad)


def test_function_local_project_imports_say_why():
    bad = []
    project = set(_files(ROOT))
    for name in _files(ROOT):
        tree, lines = _parse(name)
        for m, node, local, _, _ in _imports(tree, project):
            if not local:
                continue
            here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if "#" not in here and not above.startswith("#"):
                bad.append(f"{name}.py:{node.lineno} imports {m} inside a function without a comment saying why")
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_commands_have_a_main_and_libraries_say_why_they_do(name):
    """A command has main(); a library with a main() is both, and its LAYERS row says why."""
    tree, _ = _parse(name[:-3])
    has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    layer, why = LAYERS[name]
    if layer == "commands":
        assert has_main, f"{name} is in the commands layer but has no main()"
    else:
        assert has_main == bool(why), (f"{name} has a main() but its LAYERS row does not say why it is both a library "
                                       f"and a command" if has_main else
                                       f"{name} has no main() but its LAYERS row says it is also a command")
