"""The import graph of the installed ``sftkit`` namespace: no cycles, layers respected, a light CLI start.

The repository's folders install as one namespace (pyproject ``package-dir``): ``sftkit/`` -> ``sftkit``,
``registry/`` -> ``sftkit.registry``, ``cli/`` -> ``sftkit.cli``. Every ``.py`` file is parsed with ``ast``
(nothing is imported) and each import of a first-party module becomes an edge to the module it names.

What counts as an edge:

* Every ``import`` / ``from ... import`` statement, wherever it is: module level, inside functions, under
  ``if TYPE_CHECKING:`` or ``try:``. A deferred import is still a dependency; it only hides a cycle.
  ``from sftkit.x import name`` is an edge to ``sftkit.x.name`` when that is a module, else to ``sftkit.x``.
  Relative imports are resolved against the *installed* name (``from .core import X`` in ``registry/``
  is ``sftkit.registry.core``). A package's ``__init__`` is its own node; importing ``sftkit.a.b`` is an
  edge to ``sftkit.a.b`` only (the implicit run of ``sftkit/a/__init__`` is not an edge).
* Lazy imports only when their target is a literal: ``importlib.import_module("sftkit.x")`` /
  ``import_module("sftkit.x")`` / ``__import__("sftkit.x")`` with an absolute string constant, and the string
  values of a ``_LAZY = {...}`` dict. Computed names (``import_module(name)`` in ``cli/main.py``'s loop over
  ``COMMAND_MODULES``) are invisible to this test.
* Lazy edges count for the layering rules (they are real runtime dependencies) and for cycles, except a
  package ``__init__``'s lazy edge to one of its own submodules: that re-export pattern (``sftkit.registry.Registry``
  via ``__getattr__``) is fine and is left out of the cycle graph.
* A module importing itself is not a cycle.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import subprocess
import sys
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed package name -> repository folder (pyproject.toml [tool.setuptools] package-dir).
PACKAGE_DIRS = (("sftkit", "sftkit"), ("sftkit.registry", "registry"), ("sftkit.cli", "cli"))
FIRST_PARTY = "sftkit"
# The folders' pre-namespace names: nothing installs them any more, so importing them fails once installed.
LEGACY_TOP_LEVEL = {"registry", "cli"}
CLI = "sftkit.cli"
REGISTRY = "sftkit.registry"
# Leaf modules: they may import no first-party module but these.
LEAVES = {"sftkit.errors": {"sftkit.errors"}, "sftkit.params": {"sftkit.errors"}}
# What ``sftkit --help`` must start without.
HEAVY = ("torch", "transformers", "sqlalchemy", "fsspec", "s3fs", "botocore")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # file:line, relative to the repository
    lazy: bool = False

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where}{', lazy' if self.lazy else ''})"


@dataclass
class Graph:
    modules: dict[str, Path]  # installed module name -> file
    edges: list[Edge]
    problems: list[str]  # first-party imports that name no module, imports of the legacy top-level names


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def is_first_party(module: str) -> bool:
    return under(module, FIRST_PARTY)


def discover(root: Path, package_dirs: tuple[tuple[str, str], ...]) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, folder_name in package_dirs:
        folder = root / folder_name
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve_relative(module: str, path: Path, level: int, name: str | None) -> str:
    base = _package_of(module, path).split(".")
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join([*base, name] if name else base)


def _literal_lazy_targets(node: ast.AST) -> list[tuple[str, ast.AST]]:
    """String-literal targets of ``import_module("x")`` / ``__import__("x")`` calls and ``_LAZY = {...}`` dicts."""
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        first = node.args[0]
        if name in {"import_module", "__import__"} and isinstance(first, ast.Constant) and isinstance(first.value, str):
            return [] if first.value.startswith(".") else [(first.value, node)]
    if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Dict):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if any(isinstance(target, ast.Name) and target.id == "_LAZY" for target in targets):
            values = node.value.values
            return [(v.value, v) for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return []


def _imported_names(module: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, ast.AST, bool, str]]:
    """(absolute module name, node, lazy, how it is written) for every import in one file."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node, False, f"`import {alias.name}`"
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, path, node.level, node.module) if node.level else node.module or ""
            written = f"`from {'.' * node.level}{node.module or ''} import"
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    yield submodule, node, False, f"{written} {alias.name}`"
                else:
                    yield base, node, False, f"{written} ...`"
        else:
            for target, where in _literal_lazy_targets(node):
                yield target, where, True, f"lazy import of {target!r}"


@cache
def build_graph(root: Path = ROOT, package_dirs: tuple[tuple[str, str], ...] = PACKAGE_DIRS) -> Graph:
    modules = discover(root, package_dirs)
    edges: list[Edge] = []
    problems: list[str] = []
    for module, path in modules.items():
        relative = path.relative_to(root).as_posix()
        for target, node, lazy, written in _imported_names(module, path, modules):
            where = f"{relative}:{node.lineno}"
            if target.split(".")[0] in LEGACY_TOP_LEVEL:
                problems.append(f"{where}: {written} names the folder, not the installed `sftkit.{target}`")
            elif not is_first_party(target):
                continue
            elif target not in modules:
                problems.append(f"{where}: {written} names no module of the sftkit namespace")
            else:
                edges.append(Edge(module, target, where, lazy))
    return Graph(modules, edges, list(dict.fromkeys(problems)))  # one line per statement


def cycle_graph(graph: Graph) -> dict[str, dict[str, Edge]]:
    """source -> target -> one edge (the first seen), without self-imports and ``__init__`` lazy re-exports."""
    adjacency: dict[str, dict[str, Edge]] = defaultdict(dict)
    for edge in graph.edges:
        if edge.source == edge.target:
            continue
        own_package = graph.modules[edge.source].name == "__init__.py" and under(edge.target, edge.source)
        if edge.lazy and own_package:
            continue
        adjacency[edge.source].setdefault(edge.target, edge)
    return adjacency


def strongly_connected(nodes: list[str], adjacency: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in a deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(adjacency.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(adjacency.get(successor, {})))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return sorted(components)


def shortest_cycle_through(start: str, members: set[str], adjacency: dict[str, dict[str, Edge]]) -> list[str]:
    """Breadth-first within one strongly connected component: start -> ... -> start."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(adjacency.get(node, {})):
            if successor not in members:
                continue
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if successor not in parent:
                parent[successor] = node
                queue.append(successor)
    raise AssertionError(f"{start} is on no cycle")  # pragma: no cover - members come from one component


def find_cycles(graph: Graph) -> list[str]:
    """One report per strongly connected component: shortest cycles through its modules until all are covered."""
    adjacency = cycle_graph(graph)
    reports: list[str] = []
    for component in strongly_connected(sorted(graph.modules), adjacency):
        if len(component) < 2:
            continue
        lines: list[str] = []
        covered: set[str] = set()
        count = 0
        for start in component:
            if start in covered:
                continue
            ring = shortest_cycle_through(start, set(component), adjacency)[:-1]
            turn = ring.index(min(ring))
            cycle = [*ring[turn:], *ring[:turn], ring[turn]]
            covered.update(ring)
            count += 1
            lines.append(" -> ".join(cycle))
            lines.extend(f"      {adjacency[a][b]}" for a, b in itertools.pairwise(cycle))
        if count > 1:  # name the whole tangle too
            lines.insert(0, f"{len(component)} modules import each other: {', '.join(component)}")
        reports.append("\n  ".join(lines))
    return reports


def layering_violations(graph: Graph) -> list[str]:
    violations = []
    for edge in graph.edges:
        source, target = edge.source, edge.target
        if source == target or under(source, CLI):
            continue  # the command line may import anything
        if source in LEAVES and target not in LEAVES[source]:
            allowed = ", ".join(sorted(LEAVES[source])) or "nothing"
            violations.append(f"{edge}: {source} may import no first-party module but {allowed}")
        elif under(target, CLI):
            violations.append(f"{edge}: only sftkit.cli may import sftkit.cli")
        elif under(target, REGISTRY) and not under(source, REGISTRY):
            violations.append(f"{edge}: the core library must not import sftkit.registry")
    return violations


# ---------------------------------------------------------------------------------------------- tests


def test_every_folder_maps_to_modules():
    modules = build_graph().modules
    for package, folder in PACKAGE_DIRS:
        assert (ROOT / folder / "__init__.py").is_file(), f"{folder}/ is the package {package}: no __init__.py"
        assert package in modules
    for expected in ("sftkit.errors", "sftkit.params", "sftkit.registry.core", "sftkit.cli.main"):
        assert expected in modules, sorted(modules)


def test_first_party_imports_name_real_modules():
    """Every first-party import (lazy literals included) names a module that exists under its installed name."""
    problems = build_graph().problems
    if problems:
        pytest.fail("imports that fail once installed:\n  " + "\n  ".join(problems), pytrace=False)


def test_no_import_cycles():
    cycles = find_cycles(build_graph())
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s) among sftkit modules:\n  " + "\n  ".join(cycles), pytrace=False)


def test_layering():
    """cli -> anything; registry -> core (not cli); core -> core only; errors and params are leaves."""
    violations = layering_violations(build_graph())
    if violations:
        pytest.fail("layering violations:\n  " + "\n  ".join(violations), pytrace=False)


# The library's layers (docs/architecture.md), lowest first; a module imports only its own layer or lower.
LIBRARY_LAYERS: tuple[tuple[str, ...], ...] = (
    (  # vocabulary
        "sftkit",
        "sftkit.errors",
        "sftkit.params",
        "sftkit.artifact",
        "sftkit.metadata",
        "sftkit.safetensors_header",
        "sftkit.atomic",
    ),
    (  # the SFT, θ0 and the method
        "sftkit.sft",
        "sftkit.card",
        "sftkit.composition_plan",
        "sftkit.merging",
        "sftkit.base_model",
        "sftkit.fingerprint",
        "sftkit.safetensors_io",
        "sftkit.deftx",
    ),
    (  # jobs
        "sftkit.compose",
        "sftkit.streaming",
        "sftkit.tuning",
        "sftkit.training",
        "sftkit.interop",
        "sftkit.hub",
        "sftkit.overlap",
        "sftkit.plots",
        "sftkit.density",
        "sftkit.toy",
    ),
)
# Jobs that must not lean on each other: training and composition each load θ0 through sftkit.base_model.
SEPARATE_JOBS = (
    ("sftkit.compose", "sftkit.streaming", "sftkit.tuning"),
    ("sftkit.training",),
    ("sftkit.interop", "sftkit.hub"),
)


def layer_of(module: str) -> int | None:
    for depth, members in enumerate(LIBRARY_LAYERS):
        if any(module == member or (member != FIRST_PARTY and under(module, member)) for member in members):
            return depth
    return None


def library_layering_violations(graph: Graph) -> list[str]:
    violations = []
    for edge in graph.edges:
        source, target = edge.source, edge.target
        if under(source, CLI) or under(source, REGISTRY) or source == target:
            continue
        if edge.lazy and source in graph.modules and graph.modules[source].name == "__init__.py":
            continue  # a package re-exporting its own submodules lazily
        if under(target, source) and graph.modules[source].name == "__init__.py":
            continue
        low, high = layer_of(target), layer_of(source)
        if high is None:
            violations.append(f"{edge}: {source} is in no layer of LIBRARY_LAYERS (add it, see docs/architecture.md)")
        elif low is not None and low > high:
            violations.append(f"{edge}: layer {high} imports layer {low}")
        jobs = [i for i, group in enumerate(SEPARATE_JOBS) if any(under(m, g) for g in group for m in (source,))]
        theirs = [i for i, group in enumerate(SEPARATE_JOBS) if any(under(target, g) for g in group)]
        if jobs and theirs and jobs != theirs:
            violations.append(f"{edge}: one job imports another")
    return violations


def test_library_layers():
    """Vocabulary <- the SFT and θ0 <- jobs, and training / composition / interop stay apart."""
    violations = library_layering_violations(build_graph())
    if violations:
        pytest.fail("library layering violations:\n  " + "\n  ".join(violations), pytrace=False)


def test_cli_startup_does_not_import_heavy_libraries(tmp_path):
    """In a fresh interpreter neither ``import sftkit.cli.main`` nor ``sftkit --help`` loads a HEAVY library."""
    result = tmp_path / "loaded.json"
    code = f"""
import json, sys
heavy = {HEAVY!r}
loaded = lambda: sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))
import sftkit.cli.main
after_import = loaded()
sys.argv = ["sftkit", "--help"]
try:
    sftkit.cli.main.main()
except SystemExit as stop:
    code = stop.code
else:
    code = 0
with open({str(result)!r}, "w") as out:
    json.dump({{"after_import": after_import, "after_help": loaded(), "help_exit": code}}, out)
"""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and result.exists(), done.stderr[-3000:]
    loaded = json.loads(result.read_text())
    assert loaded["help_exit"] in (0, None), done.stderr[-3000:]
    assert loaded["after_import"] == [], f"`import sftkit.cli.main` loaded {loaded['after_import']}"
    assert loaded["after_help"] == [], f"`sftkit --help` loaded {loaded['after_help']}"


# ---------------------------------------------------------------------------------- the checker itself


def _graph_of(tmp_path: Path, files: dict[str, str]) -> Graph:
    """Run the checker over a throwaway tree laid out like the repository."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return build_graph(tmp_path, PACKAGE_DIRS)


def test_checker_finds_hidden_cycles_and_violations(tmp_path):
    graph = _graph_of(
        tmp_path,
        {
            "sftkit/__init__.py": '_LAZY = {\n    "A": "sftkit.a",\n    "Gone": "sftkit.gone",\n}\n',
            "sftkit/errors.py": "",
            "sftkit/params.py": "from sftkit import errors\nfrom typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from sftkit.a import A\n",
            "sftkit/a.py": "import sftkit\ndef f():\n    from . import b\n",
            "sftkit/b.py": 'import importlib\nB = importlib.import_module("sftkit.a")\nimport registry.core\n',
            "sftkit/c.py": "import sftkit.d\n",
            "sftkit/d.py": "from sftkit.e import E\n",
            "sftkit/e.py": "from sftkit import c\n",
            "registry/__init__.py": 'def __getattr__(n):\n    return __import__("sftkit.registry.core")\n',
            "registry/core.py": "from .. import errors\nfrom sftkit.registry import x\nfrom sftkit.cli import main\n",
            "cli/__init__.py": "",
            "cli/main.py": "from sftkit.registry import core\nfrom sftkit.nowhere import y\nimport sftkit.b\n",
        },
    )
    edges = {(edge.source, edge.target) for edge in graph.edges}
    assert ("sftkit.registry.core", "sftkit.errors") in edges  # `from .. import errors` inside registry/
    assert ("sftkit.cli.main", "sftkit.registry.core") in edges  # `from package import submodule`
    assert ("sftkit.registry.core", "sftkit.registry") in edges  # `from package import name`
    assert sorted(problem.split(": ", 1)[0] for problem in graph.problems) == [
        "cli/main.py:2",  # no such module
        "sftkit/__init__.py:3",  # stale _LAZY entry
        "sftkit/b.py:3",  # the folder's name, not the installed one
    ]
    # a -> b is function-level and b -> a a literal import_module: a cycle. sftkit -> a and
    # sftkit.registry -> sftkit.registry.core are an __init__'s lazy re-exports: no cycle with a.py / core.py.
    assert [cycle.splitlines()[0] for cycle in find_cycles(graph)] == [
        "sftkit.a -> sftkit.b -> sftkit.a",
        "sftkit.c -> sftkit.d -> sftkit.e -> sftkit.c",
        "sftkit.cli.main -> sftkit.registry.core -> sftkit.cli.main",  # the layering breach closes a loop
    ]
    violations = "\n".join(layering_violations(graph))
    assert "sftkit.params -> sftkit.a" in violations  # TYPE_CHECKING imports count
    assert "sftkit.params -> sftkit.errors" not in violations
    assert "sftkit.registry.core -> sftkit.cli.main" in violations
    assert "sftkit.registry.core -> sftkit.errors" not in violations
    assert "sftkit.cli.main ->" not in violations  # the command line may import anything
    assert len(layering_violations(graph)) == 2


def test_library_layer_checker_finds_upward_and_cross_job_imports(tmp_path):
    graph = _graph_of(
        tmp_path,
        {
            "sftkit/__init__.py": '_LAZY = {"compose": "sftkit.compose"}\n',
            "sftkit/errors.py": "",
            "sftkit/artifact.py": "from sftkit.errors import E\n",
            "sftkit/sft.py": "from sftkit.artifact import NAME\n",
            "sftkit/base_model.py": "def load():\n    from sftkit.compose import compose\n",
            "sftkit/compose.py": "from sftkit.sft import S\nfrom sftkit.base_model import load\n",
            "sftkit/training/__init__.py": "",
            "sftkit/training/trainer.py": "from sftkit.compose import load_base\nfrom sftkit.sft import S\n",
            "sftkit/newcomer.py": "from sftkit.errors import E\n",
        },
    )
    violations = sorted(violation.split(" (", 1)[0] for violation in library_layering_violations(graph))
    assert violations == [
        "sftkit.base_model -> sftkit.compose",  # layer 1 importing a job, even inside a function
        "sftkit.newcomer -> sftkit.errors",  # a module in no layer must be placed first
        "sftkit.training.trainer -> sftkit.compose",  # one job leaning on another
    ]
