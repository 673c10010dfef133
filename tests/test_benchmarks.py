"""The GPU benchmark runs end to end on the CPU with small sizes (its figures are read by people, not asserted)."""

import subprocess
import sys

from tests.conftest import REPO


def test_gpu_benchmark_runs_on_cpu(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu.py",
            "--device",
            "cpu",
            "--contexts",
            "8",
            "--n-ctx",
            "16",
            "--layers",
            "1",
            "--batch-size",
            "8",
            "--skip-run",
            "--work",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("forward (hooks on every layer)", "harvest, both passes", "cluster stage, in process", "index build"):
        assert line in result.stdout
