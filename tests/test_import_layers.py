"""Import layers: a module of unigrad imports only from its own layer or lower ones, and the modules of
unigrad.train import each other without a cycle. Imports inside functions count: a deferred import still ties a
lower layer to a higher one.

The layers, lowest first (unigrad/__init__.py's docstring draws them):

    objective, user_code, sandbox   the estimator's maths; loading a user's code; the code jail
    tools, data                     tool calls; the task samplers
    tasks                           single-turn tasks and their verifiers; the task catalogue
    environments                    multi-turn tasks, built on tasks and tools (registered into the catalogue)
    models                          model loading, the embedded tiny model
    rollout                         engines that sample, episodes
    serve                           the OpenAI-compatible HTTP server over the rollout engines
    agents                          agent programs as tasks: their episodes through the server
    diagnostics                     measurements of a step
    config                          the run configuration
    eval                            held-out evaluation of a model
    train, integrations             the trainer; adapters to other trainers
    report, preset_table            pages and tables about runs and presets
    cli                             the command line
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unigrad"

LAYERS = [
    {"objective", "user_code", "sandbox"},
    {"tools", "data"},
    {"tasks"},
    {"environments"},
    {"models"},
    {"rollout"},
    {"serve"},
    {"agents"},
    {"diagnostics"},
    {"config"},
    {"eval"},
    {"train", "integrations"},
    {"report", "preset_table"},
    {"cli"},
]

# Imports from a lower layer into a higher one that remain, each with why: "importer -> imported". The list may
# only shrink; an import that is gone fails the test until it is taken off the list.
ALLOWED: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, importer: str, known: set[str], package: bool = False) -> set[str]:
    """The unigrad modules `source` imports anywhere (functions included); `from unigrad.x import y` counts as
    unigrad.x.y when that is a module, else as unigrad.x. Relative imports are resolved against `importer` (a
    package's __init__ when `package`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = importer.split(".")
                parent = parts[: len(parts) - node.level + package]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name == "unigrad" or name.startswith("unigrad.")}


def layer_of(module: str) -> int | None:
    """The layer index of a unigrad module (None: the package itself, which may re-export anything)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} is in no layer: add {parts[1]!r} to LAYERS (and to the docstring)")


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = sorted(root.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p.read_text(), module_name(p), known, p.name == "__init__.py")
            for p in paths}


def upward_imports(graph: dict[str, set[str]]) -> set[str]:
    """Every "importer -> imported" where the imported module's layer is above the importer's."""
    found = set()
    for importer, imported in graph.items():
        low = layer_of(importer)
        for name in imported:
            high = layer_of(name)
            if low is not None and high is not None and high > low:
                found.add(f"{importer} -> {name}")
    return found


def cycles(graph: dict[str, set[str]], prefix: str) -> list[list[str]]:
    """Import cycles among the modules whose names start with `prefix` (each as the modules around it)."""
    nodes = {m for m in graph if m.startswith(prefix)}
    edges = {m: sorted(n for n in graph[m] if n in nodes and n != m) for m in nodes}
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(nodes):
        if node not in state:
            visit(node)
    return found


def test_no_module_imports_from_a_higher_layer():
    found = upward_imports(import_graph())
    new = sorted(found - set(ALLOWED))
    gone = sorted(set(ALLOWED) - found)
    assert not new, "imports from a higher layer (move the shared piece down, or the importer up): " + "; ".join(new)
    assert not gone, f"listed imports that are gone (take them off ALLOWED): {gone}"


def test_the_train_modules_import_each_other_without_a_cycle():
    found = cycles(import_graph(), "unigrad.train.")
    assert not found, "import cycles in unigrad.train: " + "; ".join(" -> ".join(c) for c in found)


def test_the_scan_sees_imports_inside_functions_and_relative_ones():
    source = ("import os\nfrom unigrad.train import step\n\ndef f():\n    from unigrad.eval import evaluate\n"
              "    from . import base\n")
    known = {"unigrad.train.step", "unigrad.tasks.base"}
    assert imported_modules(source, "unigrad.tasks.registry", known) == {"unigrad.train.step", "unigrad.eval",
                                                                          "unigrad.tasks.base"}
    assert imported_modules("from .base import Task\n", "unigrad.tasks", known, package=True) == {
        "unigrad.tasks.base"}


def test_an_upward_import_and_a_cycle_are_found():
    graph = {"unigrad.tasks.x": {"unigrad.train.lifecycle.run"}, "unigrad.train.a": {"unigrad.train.b"},
             "unigrad.train.b": {"unigrad.train.c"}, "unigrad.train.c": {"unigrad.train.a", "unigrad.objective"},
             "unigrad.train.lifecycle.run": set()}
    assert upward_imports(graph) == {"unigrad.tasks.x -> unigrad.train.lifecycle.run"}
    assert cycles(graph, "unigrad.train.") == [["unigrad.train.a", "unigrad.train.b", "unigrad.train.c",
                                                "unigrad.train.a"]]


def test_a_module_outside_every_layer_is_named():
    with pytest.raises(AssertionError, match="'newthing' to LAYERS"):
        layer_of("unigrad.newthing.x")
