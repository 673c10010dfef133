"""The layers run one way: ruff's banned imports (ne/, jobs/ and index/ each have a ruff.toml) enforce it."""

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("path, source, banned", [
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
])
def test_imports_against_the_layers_are_lint_errors(path, source, banned):
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--stdin-filename", path, "-"], input=source,
                            text=True, capture_output=True, cwd=REPO)
    assert result.returncode == 1 and f"TID251 `{banned}` is banned" in result.stdout


@pytest.mark.parametrize("path, source", [
    ("ne/cli.py", "import jobs.harvest\nimport index.query\n"),
    ("ne/viewer/new_page.py", "from index.query import SimilarFeatures\n"),
    ("jobs/new_module.py", "import ray\nfrom ne.rundir.stages import Stage\n"),
    ("ne/compute/new_module.py", "import pyarrow as pa\nfrom ne import schema\nfrom ne.compute import embed\n"),
    ("ne/rundir/new_module.py", "import fsspec\nfrom ne.compute.embed import unit_rows\n"),
])
def test_imports_down_the_layers_are_fine(path, source):
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--stdin-filename", path, "-", "--select",
                             "TID251"], input=source, text=True, capture_output=True, cwd=REPO)
    assert result.returncode == 0, result.stdout
