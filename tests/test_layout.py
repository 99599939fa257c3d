"""The layout rules of DESIGN.md, read from the AST of every top-level *.py: imports point one way (no cycle), no
script imports another script, no private name (_x) is used across files, and a project module imported inside a
function says why in a comment (on the import line or the line above)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train", "train_clip", "train_gpt", "evaluate", "compare", "sweep", "sample", "export", "bench", "serve",
           "ray_train"}
FILES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and not f.startswith("."))
PROJECT = set(FILES)


def _parse(name):
    path = os.path.join(ROOT, name + ".py")
    with open(path, encoding="utf-8") as f:
        src = f.read()
    return ast.parse(src, path), src.splitlines()


def _imports(tree):
    """[(module, node, local, aliases {name bound in this file -> module}, from-imported names)] of project modules."""
    out = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    top = a.name.split(".")[0]
                    if top in PROJECT:
                        out.append((top, child, local, {a.asname or top: top}, []))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                top = child.module.split(".")[0]
                if top in PROJECT:
                    out.append((top, child, local, {}, [a.name for a in child.names]))
            visit(child, inner)

    visit(tree, False)
    return out


def _graph():
    return {name: {m for m, *_ in _imports(_parse(name)[0]) if m != name} for name in FILES}


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
    found = _imports(tree)
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


def test_no_script_imports_a_script():
    bad = sorted(f"{name} imports {m}" for name, deps in _graph().items() for m in deps if m in SCRIPTS)
    assert bad == [], "a command is not a library: move what two commands share into a library file\n" + "\n".join(bad)


def test_no_private_name_across_files():
    bad = []
    for name in FILES:
        tree, _ = _parse(name)
        bad += [f"{name}.py uses {u}" for u in _private_uses(tree, _imports(tree))]
    assert bad == [], "make the shared name public in its file\n" + "\n".join(bad)


def test_function_local_project_imports_say_why():
    bad = []
    for name in FILES:
        tree, lines = _parse(name)
        for m, node, local, _, _ in _imports(tree):
            if not local:
                continue
            here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if "#" not in here and not above.startswith("#"):
                bad.append(f"{name}.py:{node.lineno} imports {m} inside a function without a comment saying why")
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize("name", sorted(SCRIPTS & PROJECT))
def test_scripts_have_a_main(name):
    tree, _ = _parse(name)
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{name}.py has no main()"
