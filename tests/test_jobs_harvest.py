"""jobs/harvest.py: the Ray harvest equals a naive single-process loop, and resumes after a kill."""

import os
import pydoc_data.topics
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from jobs.harvest import run_harvest
from ne.config import DataConfig, HarvestConfig, RunConfig, to_dict
from ne.errors import ConfigError, DataError
from ne.models import load_model
from ne.store import RunDir

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("corpus")
    topics = pydoc_data.topics.topics
    paths = []
    for i, key in enumerate(sorted(topics)[:6]):
        path = folder / f"doc{i}.txt"
        path.write_text(topics[key])
        paths.append(str(path))
    return paths


def make_cfg(run_dir, model_cfg, corpus, **harvest_kwargs) -> RunConfig:
    harvest = dict(k=5, frac=0.5, batch_size=4, num_workers=2, window_before=3, window_after=2)
    harvest.update(harvest_kwargs)
    return RunConfig(
        run_dir=str(run_dir),
        model=model_cfg,
        data=DataConfig(source="files", paths=corpus, n_ctx=24, max_contexts=40, contexts_per_part=6),
        harvest=HarvestConfig(**harvest),
    )


def naive_harvest(model, contexts, layers, k, frac, before, after):
    """Plain loops: one context at a time, one neuron at a time."""
    acts, hs = {}, {}
    for ctx_id, tokens in contexts:
        t = torch.tensor([tokens])
        out = model.run(t, torch.ones_like(t), layers)
        for layer in layers:
            acts[layer, ctx_id] = out[layer].act[0].float().numpy()
            hs[layer, ctx_id] = out[layer].h[0].float().numpy()
    first = 1 if model.bos_token_id is not None else 0
    rows = []
    for layer in layers:
        for n in range(model.d_mlp):
            maximum = max(acts[layer, c][first:, n].max() for c, _ in contexts)
            kept = 0
            for ctx_id, tokens in contexts:
                if kept == k or maximum <= 0:
                    break
                a = acts[layer, ctx_id][:, n]
                pos = first + int(np.argmax(a[first:]))
                if a[pos] >= frac * maximum:
                    lo, hi = max(pos - before, 0), min(pos + after + 1, len(tokens))
                    rows.append((layer, n, kept, ctx_id, pos, a[pos], a[lo:hi], hs[layer, ctx_id][pos]))
                    kept += 1
    return rows


def read_examples(run_dir, layers):
    run = RunDir(run_dir)
    out = []
    for layer in layers:
        ex = run.read_parquet(f"examples/layer={layer}").to_pandas()
        h = run.read_parquet(f"h/layer={layer}").to_pandas().set_index("h_id")
        assert h.index.is_unique
        for r in ex.itertuples():
            out.append((layer, r.neuron, r.rank, r.ctx_id, r.pos, r.act, np.asarray(r.window), h.loc[r.h_id, "h"]))
    return out


def assert_same_rows(got, expected):
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert g[:5] == tuple(int(x) for x in e[:5]), (g[:5], e[:5])
        assert abs(g[5] - e[5]) < 1e-5
        np.testing.assert_allclose(g[6], e[6], atol=1e-5)
        np.testing.assert_allclose(np.asarray(g[7], np.float32), e[7], atol=1e-5)


def test_ray_harvest_with_two_workers_equals_naive_loop(tmp_path, tiny_model_cfg, corpus, local_ray):
    cfg = make_cfg(tmp_path / "run", tiny_model_cfg, corpus)
    summary = run_harvest(cfg)
    model = load_model(tiny_model_cfg)
    run = RunDir(cfg.run_dir)
    ctx = run.read_parquet("contexts").to_pandas().sort_values("ctx_id")
    contexts = list(zip(ctx.ctx_id.tolist(), ctx.tokens.map(list).tolist()))
    assert len(contexts) == 40 and len(run.ls("contexts")) == 7
    expected = naive_harvest(model, contexts, [0, 1], k=5, frac=0.5, before=3, after=2)
    assert_same_rows(read_examples(cfg.run_dir, [0, 1]), expected)
    assert summary.examples == {0: sum(r[0] == 0 for r in expected), 1: sum(r[0] == 1 for r in expected)}
    assert "neurons with examples" in summary.describe()

    # A rerun skips every finished stage and leaves the outputs as they were.
    before = run.manifest()["stages"]
    run_harvest(cfg)
    assert run.manifest()["stages"]["examples"]["finished"] == before["examples"]["finished"]


def test_bad_inputs_name_the_value(tmp_path, tiny_model_cfg, corpus):
    with pytest.raises(ConfigError, match="layer 7"):
        run_harvest(make_cfg(tmp_path / "a", tiny_model_cfg, corpus, layers=[0, 7]))
    cfg = make_cfg(tmp_path / "b", tiny_model_cfg, corpus)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="no contexts"):
        run_harvest(replace(cfg, data=replace(cfg.data, paths=[str(empty)])))
    with pytest.raises(DataError, match="nowhere.txt"):
        run_harvest(replace(cfg, data=replace(cfg.data, paths=[str(tmp_path / "nowhere.txt")])))
    missing = str(tmp_path / "maxima.parquet")
    with pytest.raises(DataError, match="maxima.parquet"):
        run_harvest(make_cfg(tmp_path / "c", tiny_model_cfg, corpus, maxima_file=missing))


def _kill_tree(proc: subprocess.Popen, marker: str) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in psutil.process_iter(["cmdline"]):  # Ray daemons started by the killed driver
        if marker in " ".join(p.info["cmdline"] or []):
            p.kill()


def test_killed_job_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_cfg, corpus):
    reference = make_cfg(tmp_path / "reference", tiny_model_cfg, corpus)
    cfg = make_cfg(tmp_path / "run", tiny_model_cfg, corpus, num_workers=1, batch_size=1)
    cfg.data.contexts_per_part = 2
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray"))  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), NE_RAY_NUM_CPUS="1", RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "ne.cli", "harvest", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / "run" / "_work" / "examples"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("*.done"))) < 3:
        time.sleep(0.01)
    done_at_kill = len(list(work.glob("*.done")))
    _kill_tree(proc, str(ray_tmp))
    assert 3 <= done_at_kill < 20, "the kill must land in the middle of pass 2"

    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    env_ref = dict(env, RAY_TMPDIR=tempfile.mkdtemp(prefix="ray"), NE_RAY_NUM_CPUS="2")
    ref_cfg = tmp_path / "ref.yaml"
    ref_cfg.write_text(yaml.safe_dump(to_dict(reference)))
    subprocess.run([*cmd[:-1], str(ref_cfg)], cwd=REPO, env=env_ref, check=True, timeout=300,
                   capture_output=True)
    for folder in (ray_tmp, env_ref["RAY_TMPDIR"]):
        shutil.rmtree(folder, ignore_errors=True)
    got, expected = read_examples(cfg.run_dir, [0, 1]), read_examples(reference.run_dir, [0, 1])
    assert_same_rows(got, expected)
    assert not (tmp_path / "run" / "_work").exists()


def test_killed_worker_is_restarted_and_nothing_is_lost(tmp_path, tiny_model_cfg, corpus, local_ray):
    cfg = make_cfg(tmp_path / "run", tiny_model_cfg, corpus, batch_size=1)
    cfg.data.contexts_per_part = 2
    result = {}
    job = threading.Thread(target=lambda: result.setdefault("summary", run_harvest(cfg)))
    job.start()
    work = tmp_path / "run" / "_work" / "examples"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("*.done"))) < 3:
        time.sleep(0.01)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "PartProcessor" in " ".join(p.info["cmdline"] or [])]
    done_at_kill = len(list(work.glob("*.done")))
    workers[0].kill()
    job.join(timeout=300)
    assert 3 <= done_at_kill < 20 and workers, "a worker must die in the middle of pass 2"
    assert "summary" in result, "the job must finish despite the killed worker"
    run_harvest(reference := make_cfg(tmp_path / "reference", tiny_model_cfg, corpus))
    assert_same_rows(read_examples(cfg.run_dir, [0, 1]), read_examples(reference.run_dir, [0, 1]))
