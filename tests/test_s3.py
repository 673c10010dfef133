"""Run directories on object storage, for real: an S3-protocol server on loopback (moto's), reached through s3fs
exactly as a user reaches S3 or MinIO, the credentials and endpoint given by environment variables.

`ne run` writes the same run to a local folder and to s3://; then `ne status`, `ne similar`, `ne explain` and
the viewer's reads must give the same answers from both. A write that fails half-way leaves nothing half
written and a rerun completes. The run's lock is a conditional put.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile

import pytest
import yaml

from ne.cli import main
from ne.config import to_dict
from ne.errors import DataError
from ne.rundir.reader import RunData
from ne.rundir.store import LOCK, RunDir
from tests.conftest import REPO
from tests.run_outputs import run_outputs, table_digest

s3fs = pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "ne-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
TEXT = "The for statement is used to iterate over a sequence. Names refer to objects."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    """moto's S3 server on 127.0.0.1 with an empty bucket; its URL."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server logs every request
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    # s3fs's mkdir sends a location constraint that moto refuses; boto3 in us-east-1 sends none.
    boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    ).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@contextlib.contextmanager
def pointed_at(endpoint: str):
    """This process reaches the server as a user's would: credentials from the environment, the endpoint
    from fsspec's config (FSSPEC_S3_ENDPOINT_URL is read when fsspec is imported, too early here)."""
    import fsspec.config

    mp = pytest.MonkeyPatch()
    for key, value in CREDENTIALS.items():
        mp.setenv(key, value)
    mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        mp.undo()
        s3fs.S3FileSystem.clear_instance_cache()


def cli(*args: str) -> tuple[int, str]:
    """`ne ARGS` in this process: (exit code, stdout and stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_cfg, endpoint, local_ray):
    """The same small run made locally (here) and on S3 (`ne run` in a process of its own, configured only by
    environment variables): (config path, local run, S3 URL, each `ne run`'s output)."""
    tmp = tmp_path_factory.mktemp("s3")
    config = tmp / "small.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": to_dict(tiny_model_cfg),
                "data": {"source": "pydoc", "n_ctx": 64, "max_contexts": 120, "contexts_per_part": 40},
                "harvest": {"layers": [0], "k": 20, "frac": 0.75, "batch_size": 16, "num_workers": 1},
            }
        )
    )
    local, remote = str(tmp / "local"), f"s3://{BUCKET}/runs/small"
    code, local_out = cli("run", "--config", str(config), "--set", f"run_dir={local}")
    assert code == 0, local_out[-3000:]
    ray_tmp = tempfile.mkdtemp(prefix="ray")  # Ray's socket paths must stay short
    env = dict(
        os.environ,
        **CREDENTIALS,
        FSSPEC_S3_ENDPOINT_URL=endpoint,
        RAY_TMPDIR=ray_tmp,
        NE_RAY_NUM_CPUS="2",
        RAY_AUTH_MODE="disabled",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ne.cli", "run", "--config", str(config), "--set", f"run_dir={remote}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, local, remote, {local: local_out, remote: proc.stdout}


def same_text(text: str, url: str) -> str:
    """Output with the run's own name and the times of day taken out."""
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", "TIME", text.replace(url, "RUN"))


def viewer_reads(url: str) -> str:
    """What the viewer reads of a run (`ne.rundir.reader.RunData`), as text: status, layers, and a spread of neurons
    with their examples, clusters, dendrograms, metrics and centroids."""
    data = RunData(url)
    status = data.status()
    out: dict = {"status": [status.kind, status.errors, status.warnings], "layers": data.layers()}
    neurons = data.neurons(0)
    out["neurons"] = neurons.tolist()
    out["metrics"] = table_digest(data.metrics_table())
    for n in map(int, neurons[:: max(1, len(neurons) // 12)]):
        nd = data.neuron(0, n)
        ids, sizes, vectors = data.centroids(0, n)
        out[str(n)] = {
            "examples": [
                [
                    e.rank,
                    e.ctx_id,
                    e.pos,
                    e.act,
                    e.window_start,
                    e.window.tolist(),
                    e.tokens.tolist(),
                    e.cluster,
                    e.is_central,
                    e.outlier,
                ]
                for e in nd.examples
            ],
            "max_act": nd.max_act,
            "threshold": nd.threshold,
            "metrics": nd.metrics,
            "linkage": None if nd.linkage is None else nd.linkage.tolist(),
            "centroids": [ids.tolist(), sizes.tolist(), vectors.tolist()],
            "central": [
                None if e is None else [e.rank, e.ctx_id] for e in (data.central_example(0, n, int(c)) for c in ids)
            ],
        }
    return same_text(json.dumps(out, sort_keys=True, default=str), url)


@pytest.mark.ray
def test_run_on_s3_answers_as_the_local_run(runs, endpoint):
    config, local, remote, printed = runs
    with pointed_at(endpoint):
        got = run_outputs(remote)
        assert len(got) > 10 and got == run_outputs(local)  # every Parquet file row for row, every other file
        tail = "The 10 most polysemantic neurons"
        assert tail in printed[remote]
        assert same_text(printed[remote][printed[remote].index(tail) :], remote) == same_text(
            printed[local][printed[local].index(tail) :], local
        )

        metrics = RunData(local).metrics_table().to_pandas()
        neuron = int(metrics[metrics.n_clusters >= 2].neuron.iloc[0])
        for args in (
            ["status"],
            ["similar", "--layer", "0", "--neuron", str(neuron), "-k", "8"],
            ["explain", "--text", TEXT, "--top", "3"],
        ):
            answers = []
            for url in (local, remote):
                code, out = cli(args[0], url, *args[1:])
                assert code == 0, out
                answers.append(same_text(out, url))
            assert answers[0] == answers[1], args
        assert viewer_reads(remote) == viewer_reads(local)


@pytest.mark.ray
def test_a_write_failing_half_way_leaves_nothing_half_written(runs, endpoint, monkeypatch):
    config, local, remote, _ = runs
    real_write = s3fs.core.S3File.write

    def write_half_then_fail(self, data):
        if "faiss.index" in self.path:
            real_write(self, memoryview(data)[: len(data) // 2])
            raise ConnectionResetError("connection reset by peer (injected after half of faiss.index)")
        return real_write(self, data)

    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint, key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    )
    root = remote.removeprefix("s3://")
    with pointed_at(endpoint):
        before = run_outputs(remote)
        monkeypatch.setattr(s3fs.core.S3File, "write", write_half_then_fail)
        with pytest.raises(ConnectionResetError, match="injected"):
            cli("index", "--config", str(config), "--set", f"run_dir={remote}", "--force", "index")
        monkeypatch.undo()
        fs.invalidate_cache()
        # Nothing half written: no object at the final name nor at a temporary one (ids.parquet, written whole
        # before the index, stays); the manifest says the stage is running, so no reader trusts it.
        assert fs.find(f"{root}/index") == [f"{root}/index/ids.parquet"]
        assert [key for key in fs.find(root) if ".tmp-" in key] == []
        assert RunDir(remote).manifest()["stages"]["index"]["status"] == "running"
        # Similar features by behaviour need no index; by vector, the half-written index is never read.
        code, out = cli("similar", remote, "--layer", "0", "--neuron", "0", "--by", "vector")
        assert code == 2 and "stage 'index'" in out and "running" in out and len(out.strip().splitlines()) == 1
        code, out = cli("similar", remote, "--layer", "0", "--neuron", "0")
        assert code == 0 and "answered by behaviour" in out, out
        code, out = cli("status", remote)
        assert re.search(r"index\s+running", out) and re.search(r"cluster\s+done", out)

        code, out = cli("index", "--config", str(config), "--set", f"run_dir={remote}")
        assert code == 0, out
        assert run_outputs(remote) == before == run_outputs(local)


def test_the_lock_on_s3_is_a_conditional_put(endpoint, monkeypatch):
    remote = f"s3://{BUCKET}/runs/locked"
    with pointed_at(endpoint):
        run, other = RunDir(remote), RunDir(remote)
        with run.lock("ne test"):
            # Another writer that checked for the lock before it existed still cannot take it: S3 refuses the
            # put (If-None-Match: *), where check-then-write would have let both writers in.
            monkeypatch.setattr(RunDir, "exists", lambda self, *parts: False)
            assert other._create_lock(b"{}") is False
            monkeypatch.undo()
            assert json.loads(run.fs.cat(run.path(LOCK)))["command"] == "ne test"
            with pytest.raises(DataError, match="is in use by PID"):
                other._acquire("ne other")
        assert not run.exists(LOCK)
