"""The package's layout (issue 26): layer folders whose imports only go down, no cycle, no file over 400 lines, and
the module paths from before the folders still importing.

Imports are read with ``ast``, at module level and inside functions alike (a function-level import is still a
dependency). The old module paths are answered by ``lightning_custom._moved``, a table of strings rather than
re-export modules, so they add no edge to the graph and need no exclusion from it.
"""

from __future__ import annotations

import ast
import collections
import importlib
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_custom"
MAX_LINES = 400

# The top-level units, lowest first. A unit may import units of lower layers only: not a higher layer (an upward
# import) and not another unit of its own layer. A new top-level module or folder must be placed here.
LAYERS: list[set[str]] = [
    {"errors", "_moved"},  # the one exception type family; the table of old module paths
    {"runtime"},           # atomic io, precision, strategies, signals, value ranges, a quiet terminal
    {"objectives"},        # pure training math: diffusion, flow matching, SDXL conditioning
    {"synthetic"},         # offline tokenizers, random-weight architectures, tiny models, the micro world's images
    {"families"},          # one file per model family, its interface (a Protocol for the module), model loading
    {"runs"},              # run folder, provenance, gather, summary.json, what a failed run keeps
    {"dvar"},              # when to stop: the fixed evaluation batch, the rule, the callback, replay, calibrate
    {"data"},              # concept images, templates, class images, the loaders
    {"methods"},           # one LightningModule per method on a small base
    {"inference"},         # pipeline loading, sampling, evaluation metrics
    {"callbacks"},         # the other training callbacks: summary, progress, live samples, checkpoints, CLIP stop
    {"world"},             # the micro world's model, probe and quickstart grid
    {"commands"},          # the non-training commands
    {"cli"},               # LightningCLI
    {"__main__", "__init__"},
]


def unit_of(module: str) -> str:
    """``lightning_custom.dvar.rule`` -> ``dvar``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Unit -> the units it imports (at module level or inside functions)."""
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for path in package.rglob("*.py"):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        source = unit_of(module)
        edges[source]  # a unit that imports nothing is still a unit
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "lightning_custom":
                names = [f"lightning_custom.{alias.name}" for alias in node.names]  # from lightning_custom import x
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                names = []
            for name in names:
                if name.startswith("lightning_custom.") and unit_of(name) != source:
                    edges[source].add(unit_of(name))
    return edges


def layer_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    """Every unit not placed in :data:`LAYERS`, and every import that does not go down a layer."""
    placed = set().union(*LAYERS)
    found = [f"{unit}: not in LAYERS" for unit in sorted(set(edges) | set().union(*edges.values())) if unit not in
             placed]
    for source in sorted(set(edges) & placed):
        for target in sorted(edges[source] & placed):
            if layer_of(target) >= layer_of(source):
                found.append(f"{source} -> {target}: imports from layer {layer_of(target)} into layer "
                             f"{layer_of(source)}")
    return found


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(group)

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_top_level_units():
    assert cycles(import_graph()) == []


def test_imports_only_go_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []
    assert layer_violations({"dvar": {"runs"}, "runs": {"dvar"}}) == [
        "runs -> dvar: imports from layer 6 into layer 5"]
    assert layer_violations({"methods": {"data"}, "objectives": {"synthetic"}, "new_unit": set()}) == [
        "new_unit: not in LAYERS", "objectives -> synthetic: imports from layer 3 into layer 2"]


def test_a_module_added_with_an_upward_import_is_flagged(tmp_path):
    """The checks bite on real files: a copy of the package with one upward, function-level import added."""
    copy = tmp_path / "lightning_custom"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    assert layer_violations(import_graph(copy)) == []
    (copy / "objectives" / "upward.py").write_text(
        "def f():\n    from lightning_custom.dvar.calibrate import calibrate\n    return calibrate\n")
    assert layer_violations(import_graph(copy)) == ["objectives -> dvar: imports from layer 6 into layer 2"]
    assert {"objectives", "dvar"} <= next(g for g in cycles(import_graph(copy)) if "objectives" in g)


def test_no_package_file_is_over_400_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("old", sorted(importlib.import_module("lightning_custom._moved").MOVED))
def test_old_module_paths_still_import(old):
    """Configs, saved runs and users name modules by the paths they had before issue 26's folders."""
    from lightning_custom._moved import MOVED

    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_names_that_left_a_module_still_import_from_it():
    """methods/tokens.py's token-file names moved to token_files.py; a user's old import still finds them."""
    from lightning_custom.methods import token_files, tokens

    for name in tokens._MOVED_TO_TOKEN_FILES:
        assert getattr(tokens, name) is getattr(token_files, name)
    with pytest.raises(AttributeError):
        tokens.no_such_name  # noqa: B018
