"""The house's import graph (DESIGN.md): every module imports in any order, arrows point one way.

Two kinds of check:
- dynamic: every module of ``seqvis`` is imported in a fresh interpreter, in several orders
  (a cycle between module-level imports fails in some order; a side effect at import, such as
  selecting a matplotlib backend, shows in the interpreter's state afterwards);
- static: the package's own import statements, read with ``ast`` (those inside functions
  too: a deferred import is still an arrow), must form no cycle, never point upward, never
  reach a private name of another module, and stay at module top unless commented.

Layers, bottom to top: ``errors`` <- ``utils`` (standard library only) <- ``models`` <- ``data`` <-
``evaluation`` <- ``train`` (the trainer's machinery) <- ``interop`` <- ``tasks`` <- ``trainer`` (the loop) <-
``analysis`` <- ``cli``; nothing in ``seqvis`` imports ``experiments`` or ``configs``.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import NamedTuple

import pytest

import childproc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "seqvis")

# Bottom to top; a module may import its own layer and the layers below it.
LAYERS = ("seqvis.errors", "seqvis.utils", "seqvis.models", "seqvis.data", "seqvis.evaluation", "seqvis.train",
          "seqvis.interop", "seqvis.tasks", "seqvis.trainer", "seqvis.analysis", "seqvis.cli")
# Plotting stays off the hot path: these layers never import it.
NO_PLOTTING = ("seqvis.errors", "seqvis.utils", "seqvis.models", "seqvis.data", "seqvis.evaluation", "seqvis.train",
               "seqvis.interop", "seqvis.tasks", "seqvis.trainer", "seqvis.cli")
PLOTTING = ("matplotlib",)

# Known debts in files other people are editing, keyed (importing module, imported module or
# 'module._name'). The test fails when one is paid (remove it here) as well as on any new one.
PENDING_NESTED: set = set()
PENDING_PRIVATE: set = set()


class Import(NamedTuple):
    importer: str
    target: str  # a seqvis module, or the top-level name of another package
    names: tuple[str, ...]  # names taken from the target (from-imports)
    line: int
    nested: bool  # inside a function or class
    commented: bool  # a comment on the line or on the line above says why


def _module_files(pkg: str = PKG) -> dict[str, str]:
    out = {}
    for d, dirs, files in os.walk(pkg):
        dirs[:] = sorted(x for x in dirs if not x.startswith((".", "__pycache__")))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


MODULES = _module_files()
# The studies and benchmarks: held to the same rules for circles and private names (not to the layers).
EXPERIMENTS = _module_files(os.path.join(ROOT, "experiments"))
TREE = {**MODULES, **EXPERIMENTS}
OURS = ("seqvis", "experiments")


def _commented(lines: list[str], i: int) -> bool:
    """A comment on line ``i``, or on the line above the block of import lines that holds it."""
    if "#" in lines[i]:
        return True
    while i > 0 and lines[i - 1].strip().startswith(("import ", "from ")):
        i -= 1
        if "#" in lines[i]:
            return True
    return i > 0 and lines[i - 1].strip().startswith("#")


def _imports(module: str, path: str) -> list[Import]:
    with open(path) as f:
        src = f.read()
    lines = src.splitlines()
    tree = ast.parse(src)
    top = {id(n) for n in tree.body}
    is_pkg = path.endswith("__init__.py")
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        nested = id(node) not in top
        commented = _commented(lines, node.lineno - 1)
        if isinstance(node, ast.Import):
            for a in node.names:
                target = a.name if a.name.split(".")[0] in OURS else a.name.split(".")[0]
                out.append(Import(module, target, (), node.lineno, nested, commented))
            continue
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            parts = parts if is_pkg else parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        if base.split(".")[0] not in OURS:
            out.append(Import(module, base.split(".")[0], (), node.lineno, nested, commented))
            continue
        names = tuple(a.name for a in node.names)
        submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in TREE]
        for sub in submodules:  # `from seqvis.models import vit`: an arrow to seqvis.models.vit
            out.append(Import(module, sub, (), node.lineno, nested, commented))
        rest = tuple(n for n in names if f"{base}.{n}" not in TREE)
        if rest or not submodules:
            out.append(Import(module, base, rest, node.lineno, nested, commented))
    return out


ALL_TREE = [imp for m, p in TREE.items() for imp in _imports(m, p)]
ALL = [imp for imp in ALL_TREE if imp.importer in MODULES]  # the library's own imports


def _parse_all() -> dict[str, ast.AST]:
    trees = {}
    for module, path in TREE.items():
        with open(path) as f:
            trees[module] = ast.parse(f.read())
    return trees


# Parsed at collection, before any test of this worker has started an input pipeline: CPython 3.11.7 keeps
# one AST-construction depth counter per interpreter, and a tf.data thread formatting an exception
# (traceback's caret anchors call ast.parse) while this thread parses makes ast.parse raise
# "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905).
TREES = _parse_all()


def _layer(module: str) -> int | None:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


# ============================================================================ static graph


def test_the_scan_sees_the_package():
    # A guard for the checks below: they are only as good as the walk and the parser.
    assert {"seqvis.models.vit", "seqvis.trainer", "seqvis.data.builders.idx", "seqvis.errors"} <= set(MODULES)
    edges = {(i.importer, i.target) for i in ALL}
    assert ("seqvis.tasks.captioning_eval", "seqvis.evaluation.grounding") in edges
    assert ("seqvis.models.transformer", "seqvis.models.attention") in edges


def test_no_upward_import():
    bad = []
    for i in ALL:
        if i.target.split(".")[0] in ("experiments", "configs"):
            bad.append(f"{i.importer}:{i.line} imports {i.target} (seqvis never imports experiments or configs)")
            continue
        lo, hi = _layer(i.importer), _layer(i.target)
        if lo is not None and hi is not None and hi > lo:
            bad.append(f"{i.importer}:{i.line} imports {i.target}, a layer above it ({LAYERS[lo]} < {LAYERS[hi]})")
        if i.target in PLOTTING and any(i.importer == p or i.importer.startswith(p + ".") for p in NO_PLOTTING):
            bad.append(f"{i.importer}:{i.line} imports {i.target}; plotting stays in seqvis.analysis")
    assert not bad, "\n".join(bad)


def test_every_module_is_in_a_layer():
    assert not [m for m in MODULES if m != "seqvis" and _layer(m) is None]


def test_utils_needs_only_the_standard_library():
    """``seqvis.utils`` is what the data layer (no jax/flax at import) and the models can share."""
    outside = [i for i in ALL if i.importer.startswith("seqvis.utils") and i.target not in sys.stdlib_module_names
               and i.target != "__future__"]
    assert not outside, outside



def test_the_data_layer_imports_no_jax_or_flax_at_import_time():
    """tf.data workers and the input benchmarks never initialise a jax backend by importing seqvis.data."""
    found = [i for i in ALL if i.importer.startswith("seqvis.data") and i.target in ("jax", "flax") and not i.nested]
    assert not found, found

def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-loop), Tarjan's algorithm."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    """In the whole tree: the library and the studies (a deferred import inside a function counts)."""
    edges: dict[str, set[str]] = {}
    for i in ALL_TREE:
        if i.target in TREE and i.target != i.importer:
            edges.setdefault(i.importer, set()).add(i.target)
    assert _cycles(edges) == []


def test_no_private_name_of_another_module():
    """In the whole tree: the library and the studies."""
    found = set()
    for i in ALL_TREE:
        if i.target in TREE and i.target != i.importer:
            found |= {(i.importer, f"{i.target}.{n}") for n in i.names if n.startswith("_") and not n.startswith("__")}
    # `import seqvis.x as y` / `from seqvis import x as y`, then `y._name`
    for module, tree in TREES.items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in TREE})
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in TREE})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != module):
                found.add((module, f"{aliases[node.value.id]}.{node.attr}"))
    assert found - PENDING_PRIVATE == set(), "private names used across modules (make them public)"
    assert PENDING_PRIVATE - found == set(), "paid: remove these from PENDING_PRIVATE"


def test_imports_inside_functions_are_deferred_on_purpose():
    """An import inside a function hides an arrow; one of a seqvis module needs a comment saying why."""
    found = {(i.importer, i.target) for i in ALL if i.nested and i.target in MODULES and not i.commented}
    assert found - PENDING_NESTED == set(), "move these imports to the module top (or say why on the line)"
    assert PENDING_NESTED - found == set(), "paid: remove these from PENDING_NESTED"


# ============================================================================ fresh interpreters


# Two orders (each a fresh interpreter, ~13 s of imports on the CI machine; "reversed" and a seeded shuffle
# were dropped for CI time): the package's alphabetical order, and the top layer first.
_ORDERS = {
    "sorted": sorted(m for m in MODULES if m != "seqvis.cli.train"),
    # Top of the house first: each layer pulls in the ones below it on its own.
    "top_down": sorted((m for m in MODULES if m != "seqvis.cli.train"), key=lambda m: (-(_layer(m) or 0), m)),
}

_PROBE = r"""
import importlib, json, sys
order = json.loads(sys.argv[1])
for m in order:
    importlib.import_module(m)
import matplotlib
print(json.dumps({"backend": matplotlib.get_backend().lower(), "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("order", sorted(_ORDERS))
def test_every_module_imports_in_a_fresh_interpreter(order):
    import json

    env = dict(os.environ, MPLBACKEND="pdf", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    proc = childproc.run([sys.executable, "-c", _PROBE, json.dumps(_ORDERS[order])], cwd=ROOT, env=env,
                         timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(_ORDERS[order]) <= set(state["modules"])
    # Importing seqvis selects no matplotlib backend: the caller's MPLBACKEND stands. (Whether
    # matplotlib is loaded at all is not seqvis' to decide: TensorFlow's bundled Keras imports it
    # when it is installed. That seqvis' own hot path does not is the static test above.)
    assert state["backend"] == "pdf", state["backend"]


def _unused_seqvis_imports(tree: ast.AST) -> list[str]:
    """Names a module takes from a seqvis module (module-level ``from seqvis... import``) and never uses."""
    imported = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("seqvis"):
            for a in node.names:
                imported[a.asname or a.name] = f"{node.module}.{a.name}"
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    exported = set()
    for node in tree.body:  # __all__ = [...] states an export on purpose
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            exported |= {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
    return sorted(full for name, full in imported.items() if name not in used and name not in exported)


def test_no_module_re_exports_another_modules_names():
    """Every name has one home: no library module imports a name only to make it importable from there (an
    "old home"), so tests and users import from the real one. Package ``__init__`` files may export on purpose."""
    found = {m: names for m, tree in TREES.items() if m in MODULES and not MODULES[m].endswith("__init__.py")
             for names in [_unused_seqvis_imports(tree)] if names}
    assert not found, found


def test_the_re_export_check_sees_one():
    tree = ast.parse("from seqvis.errors import ConfigError, DataError\n\ndef f():\n    raise DataError('x')\n")
    assert _unused_seqvis_imports(tree) == ["seqvis.errors.ConfigError"]
