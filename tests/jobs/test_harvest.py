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
from ne.rundir.store import RunDir

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


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


def naive_harvest(model, contexts, layers, k, frac, before, after, direction="max", capture=None):
    """Plain loops: one context at a time, one neuron at a time. `capture(tokens)` gives {layer: (act, h)}
    of one context by other means than `model.run` (forward hooks on the Hugging Face model itself).
    `min`: the first k contexts whose lowest activation is at or below frac × the neuron's minimum."""
    acts, hs = {}, {}
    for ctx_id, tokens in contexts:
        t = torch.tensor([tokens])
        if capture is None:
            out = model.run(t, torch.ones_like(t), layers)
            got = {layer: (out[layer].act[0], out[layer].h[0]) for layer in layers}
        else:
            got = capture(t)
        for layer in layers:
            acts[layer, ctx_id] = got[layer][0].float().numpy()
            hs[layer, ctx_id] = got[layer][1].float().numpy()
    first = 1 if model.bos_token_id is not None else 0
    pick, better = (np.argmax, np.greater_equal) if direction == "max" else (np.argmin, np.less_equal)
    rows = []
    for layer in layers:
        for n in range(model.d_mlp):
            if direction == "max":
                extreme = max(acts[layer, c][first:, n].max() for c, _ in contexts)
                fires = extreme > 0
            else:
                extreme = min(acts[layer, c][first:, n].min() for c, _ in contexts)
                fires = extreme < 0
            kept = 0
            for ctx_id, tokens in contexts:
                if kept == k or not fires:
                    break
                a = acts[layer, ctx_id][:, n]
                pos = first + int(pick(a[first:]))
                if better(a[pos], frac * extreme):
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
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
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
    subprocess.run([*cmd[:-1], str(ref_cfg)], cwd=REPO, env=env_ref, check=True, timeout=300, capture_output=True)
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


# --- gated MLPs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.conftest import write_gated_hf

    return write_gated_hf(tmp_path_factory.mktemp("llama"), "llama")


def hf_hook_capture(hf_dir, layers):
    """{layer: (act, h)} of one context from the Hugging Face model itself: act is what down_proj receives;
    h is the MLP's input with the RMSNorm weight divided out (the norm's weight is folded into W_gate, W_up)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()

    def capture(tokens):
        seen = {}
        hooks = []
        for layer in layers:
            block = hf.model.layers[layer]
            hooks.append(
                block.mlp.down_proj.register_forward_pre_hook(
                    lambda m, a, layer=layer: seen.__setitem__(("act", layer), a[0][0])
                )
            )
            hooks.append(
                block.mlp.register_forward_pre_hook(
                    lambda m, a, layer=layer, w=block.post_attention_layernorm.weight: seen.__setitem__(
                        ("h", layer), a[0][0] / w
                    )
                )
            )
        try:
            with torch.no_grad():
                hf(input_ids=tokens)
        finally:
            for hook in hooks:
                hook.remove()
        return {layer: (seen["act", layer], seen["h", layer]) for layer in layers}

    return capture


@pytest.mark.parametrize("direction", ["max", "min"])
def test_gated_ray_harvest_equals_naive_loop_on_hook_activations(tmp_path, llama_dir, corpus, local_ray, direction):
    """A random 2-layer Llama (HF directory), real text, 2 Ray workers: same rows, order and values as a naive
    loop over activations read as the input of down_proj by a forward hook."""
    from ne.config import ModelConfig
    from ne.rundir.weights import read_layer_weights

    model_cfg = ModelConfig(backend="hf", name=str(llama_dir), device="cpu")
    cfg = make_cfg(tmp_path / "run", model_cfg, corpus, direction=direction)
    summary = run_harvest(cfg)
    run = RunDir(cfg.run_dir)
    model = load_model(model_cfg)
    ctx = run.read_parquet("contexts").to_pandas().sort_values("ctx_id")
    contexts = list(zip(ctx.ctx_id.tolist(), ctx.tokens.map(list).tolist()))
    expected = naive_harvest(
        model,
        contexts,
        [0, 1],
        k=5,
        frac=0.5,
        before=3,
        after=2,
        direction=direction,
        capture=hf_hook_capture(llama_dir, [0, 1]),
    )
    got = read_examples(cfg.run_dir, [0, 1])
    assert_same_rows(got, expected)
    assert sum(summary.examples.values()) == len(expected)
    signs = np.sign([r[5] for r in got])
    assert (signs > 0).all() if direction == "max" else (signs < 0).all()
    extreme = run.read_parquet("maxima.parquet").to_pandas()
    assert list(extreme.columns) == ["layer", "neuron", "min_act" if direction == "min" else "max_act"]
    # The weights file carries both input maps; each stored h gives back its stored activation through them.
    weights = read_layer_weights(run, 1)
    assert weights.gated and weights.d_mlp == model.d_mlp
    row = next(r for r in got if r[0] == 1)
    h = torch.tensor(np.asarray(row[7], np.float32))
    gate, up = torch.from_numpy(weights.gate[row[1]]), torch.from_numpy(weights.up[row[1]])
    assert abs(float(model.act_fn(h @ gate) * (h @ up)) - row[5]) < 1e-5


def test_direction_min_on_relu_model_is_refused(tmp_path, corpus):
    from tests.conftest import TINY_ARCH, write_tiny_model

    relu = write_tiny_model(tmp_path, {**TINY_ARCH, "act_fn": "relu"})
    cfg = make_cfg(tmp_path / "run", relu, corpus, direction="min", num_workers=0)
    with pytest.raises(
        ConfigError,
        match=r"harvest.direction is 'min' but the activations of tiny-gpt2 \(relu\) "
        r"are never negative; use harvest.direction: max",
    ):
        run_harvest(cfg)


def test_gpus_per_worker_above_the_clusters_gpus_per_node(tmp_path, tiny_model_cfg, corpus, local_ray):
    from jobs.ray_utils import check_gpus_per_node

    cfg = make_cfg(tmp_path / "run", tiny_model_cfg, corpus, gpus_per_worker=2)
    with pytest.raises(
        ConfigError,
        match=r"harvest.gpus_per_worker is 2 but the Ray cluster's nodes have at most 0 "
        r"GPUs \(per node: 0\)",
    ):
        run_harvest(cfg)
    with pytest.raises(ConfigError, match=r"is 8 but .* at most 4 GPUs \(per node: 4, 4\).* at most 4"):
        check_gpus_per_node(8, [4.0, 4.0])
    check_gpus_per_node(8, [8.0, 4.0])  # an 8-GPU node takes it
    with pytest.raises(ConfigError, match="harvest.gpus_per_worker is 2 but harvest.use_gpu is false"):
        HarvestConfig(gpus_per_worker=2, use_gpu=False)
