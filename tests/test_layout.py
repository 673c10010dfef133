"""The layers run one way: ruff's banned imports (ne/, jobs/ and index/ each have a ruff.toml) enforce it."""

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize(
    "path, source, banned",
    [
        ("ne/new_module.py", "import jobs.harvest\n", "jobs"),
        ("ne/new_module.py", "from index.query import SimilarFeatures\n", "index"),
        ("ne/new_module.py", "import ray\n", "ray"),
        ("jobs/new_module.py", "from index.build import run_index\n", "index"),
        ("index/new_module.py", "from jobs.cluster import run_cluster\n", "jobs"),
        ("ne/compute/new_module.py", "from ne.rundir.store import RunDir\n", "ne.rundir"),
        ("ne/compute/new_module.py", "from ne.rundir import stages\n", "ne.rundir"),
        ("ne/compute/new_module.py", "import fsspec\n", "fsspec"),
        ("ne/compute/new_module.py", "import pyarrow.parquet as pq\n", "pyarrow.parquet"),
        ("ne/compute/new_module.py", "import ray\n", "ray"),
    ],
)
def test_imports_against_the_layers_are_lint_errors(path, source, banned):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--stdin-filename", path, "-"],
        input=source,
        text=True,
        capture_output=True,
        cwd=REPO,
    )
    assert result.returncode == 1 and f"TID251 `{banned}` is banned" in result.stdout


@pytest.mark.parametrize(
    "path, source",
    [
        ("ne/cli.py", "import jobs.harvest\nimport index.query\n"),
        ("ne/viewer/new_page.py", "from index.query import SimilarFeatures\n"),
        ("jobs/new_module.py", "import ray\nfrom ne.rundir.stages import Stage\n"),
        ("ne/compute/new_module.py", "import pyarrow as pa\nfrom ne import schema\nfrom ne.compute import embed\n"),
        ("ne/rundir/new_module.py", "import fsspec\nfrom ne.compute.embed import unit_rows\n"),
    ],
)
def test_imports_down_the_layers_are_fine(path, source):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--stdin-filename", path, "-", "--select", "TID251"],
        input=source,
        text=True,
        capture_output=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout


def _imports(path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (a lazy import is an edge too)."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_import_cycles_lazy_imports_included():
    """Tarjan's strongly connected components over the project's modules: every one must be a single module."""
    modules = {}
    for package in ("ne", "jobs", "index"):
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)  # importing a submodule runs its (empty or not) parents: not an edge back
        graph[name] = targets
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_stage_input_files_are_named_by_the_graph():
    from ne.rundir.graph import GRAPH
    from ne.rundir.stages import INPUT_FILES

    named = {spec.inputs for spec in GRAPH.values() if spec.inputs}
    assert named == set(INPUT_FILES)
