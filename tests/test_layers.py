"""The package's layers hold: no module imports a layer above its own.

The layers, bottom to top (README "Layout" says what each holds):

    errors
    types, config, registry, specs, io, hf_files, model_card, plots
    nn
    memory
    models
    generation, data
    eval
    train
    experiments, inspect, testing
    hf, cli, convert, the package itself (memlm/__init__.py), __main__, _transformers_hook

A module may import its own layer and any layer below it, never one above, and imports
written inside functions count (a lazy import is still a dependency). The check reads
every file with `ast`, so it needs no import of memlm and sees code that never runs in
the tests. Sibling packages of one layer must not import each other in a cycle either.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "memlm"

LAYERS: list[set[str]] = [
    {"errors"},
    {"types", "config", "registry", "specs", "io", "hf_files", "model_card", "plots"},
    {"nn"},
    {"memory"},
    {"models"},
    {"generation", "data"},
    {"eval"},
    {"train"},
    {"experiments", "inspect", "testing"},
    {"hf", "cli", "convert", "memlm", "__main__", "_transformers_hook"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}

#: names read from the package itself that are safe from any layer: `__version__` is a
#: constant bound on the first line of memlm/__init__.py, before anything else is imported
PACKAGE_CONSTANTS = {"__version__"}

#: known upward edges tolerated while a move is in progress, as (file, imported module); empty
#: now. An entry that no longer occurs fails below, so the list cannot outlive its move.
PENDING: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path) -> str:
    """memlm/eval/recall.py -> memlm.eval.recall; memlm/eval/__init__.py -> memlm.eval."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The layer unit of a module: its first component below `memlm` (the package is "memlm")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "memlm"


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, memlm module) for every import in the file, function bodies included."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == root.name:  # `from memlm import x`: x is a submodule or a name
                for alias in node.names:
                    if alias.name in PACKAGE_CONSTANTS:
                        continue
                    sub = root / alias.name
                    is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                    found.append((node.lineno, f"{target}.{alias.name}" if is_module else target))
            else:
                found.append((node.lineno, target))
    return [(line, m) for line, m in found if m == root.name or m.startswith(root.name + ".")]


def layer_violations(root: Path = ROOT) -> tuple[list[str], set[tuple[str, str]]]:
    """(messages for imports against the layer order, pending edges that were seen)."""
    problems, seen_pending = [], set()
    for path in sorted(root.rglob("*.py")):
        source = unit_of(module_name(path, root))
        rel = path.relative_to(root.parent).as_posix()
        if source not in RANK:
            problems.append(f"{rel}: module {source!r} is in no layer; add it to LAYERS")
            continue
        for line, target in imported_modules(path, root):
            dest = unit_of(target)
            if dest not in RANK:
                problems.append(f"{rel}:{line} imports {target}, which is in no layer")
            elif RANK[dest] > RANK[source]:
                if (rel, target) in PENDING:
                    seen_pending.add((rel, target))
                    continue
                problems.append(f"{rel}:{line} imports {target}: layer {source!r} may not "
                                f"import {dest!r}, which sits above it")
    return problems, seen_pending


def unit_cycles(root: Path = ROOT) -> list[list[str]]:
    """Import cycles between sibling packages of one layer (e.g. inspect <-> testing).

    Edges across layers are the order check's business; the top layer (the entry points:
    the package front, cli, hf and its import hook) may use each other freely.
    """
    top = len(LAYERS) - 1
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        source = unit_of(module_name(path, root))
        for _, target in imported_modules(path, root):
            dest = unit_of(target)
            if dest != source and RANK.get(source) == RANK.get(dest) != top:
                graph.setdefault(source, set()).add(dest)
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_module_imports_a_layer_above_its_own():
    problems, _ = layer_violations()
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_no_package_level_import_cycles():
    cycles = unit_cycles()
    assert not cycles, "import cycles between packages: " + "; ".join(" -> ".join(c)
                                                                     for c in cycles)


def test_pending_edges_still_exist():
    """An allowed-for-now edge that is gone must leave PENDING, so the list only shrinks."""
    _, seen = layer_violations()
    assert seen == PENDING, f"no longer imported, remove from PENDING: {sorted(PENDING - seen)}"


def test_cli_commands_stay_thin():
    """Each `cmd_*` parses nothing itself and calls the library: 15 lines at most."""
    tree = ast.parse((ROOT / "cli.py").read_text(encoding="utf-8"))
    long = [f"memlm/cli.py:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} "
            "lines; move its logic into the library" for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_")
            and node.end_lineno - node.lineno + 1 > 15]
    assert not long, "\n".join(long)


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "memlm"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("source, bad", [
    ("from memlm.train.checkpoint import save_weights\n", "memlm.train.checkpoint"),
    ("def f():\n    from memlm.eval import perplexity\n", "memlm.eval"),  # lazy import
    ("import memlm.experiments.compare\n", "memlm.experiments.compare"),
    ("from memlm import inspect\n", "memlm.inspect"),
    ("from ..train import run\n", "memlm.train"),  # relative import
])
def test_checker_catches_a_planted_upward_import(tmp_path, source, bad):
    root = _plant(tmp_path, {
        "__init__.py": "", "models/__init__.py": "", "models/bad.py": source,
        "train/__init__.py": "", "train/checkpoint.py": "", "train/run.py": "",
        "eval/__init__.py": "", "eval/perplexity.py": "", "experiments/__init__.py": "",
        "experiments/compare.py": "", "inspect/__init__.py": "",
    })
    problems, _ = layer_violations(root)
    assert problems == [f"memlm/models/bad.py:{source.count(chr(10))} imports {bad}: "
                        f"layer 'models' may not import '{bad.split('.')[1]}', which sits "
                        f"above it"]


def test_checker_allows_downward_imports_and_the_version(tmp_path):
    root = _plant(tmp_path, {
        "__init__.py": "__version__ = '0'\n",
        "models/__init__.py": "from memlm.types import IGNORE_INDEX\nfrom memlm import errors\n",
        "types.py": "from memlm import __version__\n", "errors.py": "",
        "train/__init__.py": "from memlm.models import x\nfrom . import helpers\n",
        "train/helpers.py": "",
    })
    assert layer_violations(root)[0] == []


def test_checker_finds_a_cycle_and_an_unplaced_module(tmp_path):
    root = _plant(tmp_path, {
        "__init__.py": "", "inspect/__init__.py": "from memlm.testing import probes\n",
        "testing/__init__.py": "", "testing/probes.py": "from memlm.inspect import x\n",
        "newthing.py": "",
    })
    assert unit_cycles(root) == [["inspect", "testing", "inspect"]]
    assert layer_violations(root)[0] == [
        "memlm/newthing.py: module 'newthing' is in no layer; add it to LAYERS"]


if __name__ == "__main__":  # `python tests/test_layers.py` prints every violation
    problems, _ = layer_violations()
    print("\n".join(problems) or "layers hold")
    sys.exit(1 if problems else 0)
