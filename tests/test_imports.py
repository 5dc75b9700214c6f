"""The project's import graph has no circles (cosmos_fast, cosmos_fast.kernels = kernels/, benchmarks).

Every module is parsed with :mod:`ast`, never imported, so the test is fast and cannot be fooled by
import order. An edge A → B is an intra-project ``import`` / ``from ... import`` in A: relative
imports are resolved, and ``from pkg import name`` is an edge to ``pkg.name`` when that is a module,
else to ``pkg``. A parent package's ``__init__`` is not added as an implicit edge (Python runs it
first, but it only re-exports, and counting it would make every sibling import look circular).

- Module-level imports (module body, including ``if`` / ``try`` blocks and class bodies) must form
  no circle.
- Adding the imports made inside functions must not close a circle either: such a circle only
  works because one side imports late (the "circle held together by an import inside a function").

Imports of names given as strings (``importlib.import_module``, as in cli.py's sub-command table and
the package's PEP 562 ``__getattr__``) are not seen.

- Every import made inside a function is on :data:`LATE_IMPORTS` with its reason: an optional heavy
  dependency (triton, numba, DALI) behind the module, or start-up speed (``cosmos-fast --help`` and
  ``cosmos-fast train --help`` must not import torch; tests/test_cli.py). Any other one belongs at
  the module's top.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package name → folder (setup.py package_dir ships kernels/ as cosmos_fast.kernels)
ROOTS = {"cosmos_fast": REPO / "cosmos_fast", "cosmos_fast.kernels": REPO / "kernels",
         "benchmarks": REPO / "benchmarks"}


def project_modules() -> dict[str, Path]:
    """Dotted name → file of every module of the project (packages by their ``__init__``)."""
    mods = {}
    for pkg, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if any(p.startswith(".") or p == "__pycache__" for p in rel):
                continue
            if rel[-1] == "__init__":
                rel = rel[:-1]
            mods[".".join((pkg, *rel))] = path
    return mods


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool, mods: dict[str, Path]) -> list[str]:
    """The project modules one import statement of ``module`` imports."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".") if is_pkg else module.split(".")[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for name in names:
        while name and name not in mods:            # `import cosmos_fast.model.layers.x` style tails
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


def _imports(tree: ast.Module, in_function: bool):
    """Import statements at module level (``in_function=False``) or inside any function."""
    def walk(node, inside):
        for child in ast.iter_child_nodes(node):
            fn = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and inside == in_function:
                yield child
            yield from walk(child, inside or fn)
    yield from walk(tree, False)


def import_graph(in_function: bool = False) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}``; module-level imports, or only those inside functions."""
    mods = project_modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = {}
        for node in _imports(tree, in_function):
            for target in _targets(node, name, path.name == "__init__.py", mods):
                edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def function_level_imports() -> list[str]:
    """``module:line -> module`` for every intra-project import made inside a function."""
    return [f"{m}:{line} -> {t}" for m, edges in import_graph(in_function=True).items()
            for t, line in sorted(edges.items(), key=lambda e: e[1])]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _describe(comps: list[list[str]], graph: dict[str, dict[str, int]], top: dict[str, dict[str, int]]) -> str:
    lines = []
    for comp in comps:
        lines.append("circle: " + " ↔ ".join(comp))
        for m in comp:
            for t, line in sorted(graph[m].items()):
                if t in comp:
                    where = "module level" if t in top[m] else "inside a function"
                    lines.append(f"    {m}:{line} imports {t} ({where})")
    return "\n".join(lines)


def test_walker_sees_the_project():
    """The walker finds the three roots and resolves relative, ``from pkg import module`` and
    function-level imports (guards against a test that passes because it sees nothing)."""
    mods = project_modules()
    assert {"cosmos_fast", "cosmos_fast.kernels", "benchmarks", "cosmos_fast.data.transforms",
            "cosmos_fast.kernels.contrastive", "benchmarks.scaling"} <= set(mods)
    top, late = import_graph(), import_graph(in_function=True)
    assert "cosmos_fast.model.layers" in top["cosmos_fast.model.pooler"]          # from .layers import ...
    assert "cosmos_fast.data.recipe" in top["cosmos_fast.data.transforms"]        # from . import recipe
    assert "cosmos_fast.model.attention" in top["cosmos_fast.model"]              # package __init__, relative
    assert "cosmos_fast.kernels.multicrop" in late["cosmos_fast.ops.multicrop"]   # inside kernels()
    assert "cosmos_fast.kernels.contrastive" in late["cosmos_fast.ops.contrastive"]   # from ..kernels import contrastive


# (importing module, imported module) → why the import sits inside a function
LATE_IMPORTS = {
    **{("cosmos_fast.cli", m): "CLI start-up: each sub-command imports its module (and torch) when run"
       for m in ("cosmos_fast.demo", "cosmos_fast.data.synthetic", "cosmos_fast.export",
                 "cosmos_fast.model.checkpoint", "cosmos_fast.train")},
    **{("cosmos_fast.train", m): "train --help builds its parser without importing torch"
       for m in ("cosmos_fast.checkpointing", "cosmos_fast.model.checkpoint", "cosmos_fast.trainer")},
    ("cosmos_fast.ops.contrastive", "cosmos_fast.kernels.contrastive"): "the kernel module imports triton (optional)",
    ("cosmos_fast.ops.cross_pool", "cosmos_fast.kernels.cross_pool"): "the kernel module imports triton (optional)",
    ("cosmos_fast.ops.multicrop", "cosmos_fast.kernels.multicrop"): "the kernel module imports numba (optional)",
    ("benchmarks.bench_contrastive", "cosmos_fast.kernels.contrastive"): "the kernel module imports triton "
                                                                           "(optional; only the ablation providers)",
    ("benchmarks.bench_contrastive", "cosmos_fast.kernels.contrastive_v1"): "the previous kernels import triton "
                                                                              "(optional; the fused_v1 ablation)",
    ("benchmarks.bench_cross_pool", "cosmos_fast.kernels.cross_pool"): "the kernel module imports triton "
                                                                        "(optional; CPU runs have no fused rows)",
    ("benchmarks.bench_train", "cosmos_fast.data.backends"): "the DALI backend is optional: fallback on ImportError",
    ("benchmarks.bench_train", "cosmos_fast.data.torchvision_loader"): "the fallback of that ImportError",
}


def test_function_level_imports_each_have_a_reason():
    late = {(m, t) for m, edges in import_graph(in_function=True).items() for t in edges}
    unexplained = sorted(late - set(LATE_IMPORTS))
    assert not unexplained, ("intra-project imports inside functions with no reason on LATE_IMPORTS "
                             "(move them to the module's top):\n" +
                             "\n".join(f"{m} -> {t}" for m, t in unexplained))
    stale = sorted(set(LATE_IMPORTS) - late)
    assert not stale, f"LATE_IMPORTS lists imports that are gone: {stale}"


def test_no_circle_among_module_level_imports():
    top = import_graph()
    comps = cycles(top)
    assert not comps, "module-level import circles:\n" + _describe(comps, top, top)


def test_no_circle_held_together_by_a_function_level_import():
    top, late = import_graph(), import_graph(in_function=True)
    both = {m: {**late[m], **top[m]} for m in top}
    comps = cycles(both)
    assert not comps, ("import circles once the imports inside functions are counted (move the shared "
                       "piece to a module both sides can import):\n" + _describe(comps, both, top))
