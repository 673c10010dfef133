"""A whole Ray node lost during the harvest, the cluster stage and MNIST training: each job finishes, the work
the dead node held is redone elsewhere, and the outputs equal an uninterrupted run's row for row.

The multi-node cluster runs in its own process (tests/jobs/node_loss_run.py), apart from the session's `local_ray`;
the uninterrupted reference runs here, without Ray (in-process harvest and cluster stage, the library's own
training loop), one torch thread like the Ray workers, so that equal means equal.
"""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch

from jobs.ray_utils import ITEM_ATTEMPTS, run_on_actors
from ne.config import ClusterConfig, DataConfig, HarvestConfig, RunConfig, load_config, to_dict
from ne.errors import NeError
from ne.mnist.config import MnistRunConfig
from ne.rundir import store
from tests.conftest import REPO, require_shared, shared_data_dir
from tests.run_outputs import run_outputs

pytestmark = pytest.mark.ray


def lm_config(run_dir, model_cfg, corpus_dir) -> RunConfig:
    corpus_dir.mkdir()
    paths = []
    for i, key in enumerate(sorted(pydoc_data.topics.topics)[:6]):
        path = corpus_dir / f"doc{i}.txt"
        path.write_text(pydoc_data.topics.topics[key])
        paths.append(str(path))
    return RunConfig(
        run_dir=str(run_dir),
        model=model_cfg,
        data=DataConfig(source="files", paths=paths, n_ctx=24, max_contexts=40, contexts_per_part=6),
        harvest=HarvestConfig(k=5, frac=0.5, batch_size=4, num_workers=2, window_before=3, window_after=2),
        cluster=ClusterConfig(neurons_per_task=64),
    )


@ray.remote(num_cpus=0, max_task_retries=0)
class Flaky:
    """Works on items; dies (its process exits, as on a lost node) on an item named in `deadly` while `lives`
    files remain for it."""

    def __init__(self, folder: str):
        self.folder = folder

    def work(self, item: int, deadly: tuple[int, ...]) -> int:
        Path(self.folder, f"ran-{item}-{os.getpid()}-{time.time_ns()}").touch()
        lives = sorted(Path(self.folder).glob(f"life-{item}-*"))
        if item in deadly and lives:
            lives[0].unlink()
            os._exit(1)
        return item * 10


def flaky_actors(n: int, folder, restarts: int) -> list:
    return [Flaky.options(max_restarts=restarts).remote(str(folder)) for _ in range(n)]


def test_an_item_whose_actor_dies_goes_to_another_actor(tmp_path, local_ray):
    (tmp_path / "life-3-0").touch()  # item 3 kills the first actor that takes it
    workers = flaky_actors(2, tmp_path, restarts=0)  # a dead actor never comes back: no room for it
    results = []
    alive = run_on_actors(workers, "work", list(range(8)), (3,), on_done=results.append)
    assert sorted(results) == [i * 10 for i in range(8)]  # every item done, and reported once
    assert len(list(tmp_path.glob("ran-3-*"))) == 2 and len(list(tmp_path.glob("ran-*"))) == 9
    assert len(alive) == 1

    # A restarted actor rejoins: with restarts, both actors are still there at the end.
    (tmp_path / "life-5-0").touch()
    results = []
    alive = run_on_actors(flaky_actors(2, tmp_path, restarts=1), "work", list(range(8)), (5,), on_done=results.append)
    assert sorted(results) == [i * 10 for i in range(8)] and len(alive) == 2


def test_losing_every_actor_or_an_item_that_kills_them_is_an_error(tmp_path, local_ray):
    for i in range(2):
        (tmp_path / f"life-0-{i}").touch()
        (tmp_path / f"life-1-{i}").touch()
    with pytest.raises(NeError, match=r"every Ray worker died .*items are not done. Rerun the command"):
        run_on_actors(flaky_actors(2, tmp_path, restarts=0), "work", [0, 1, 2], (0, 1))
    for i in range(5):
        (tmp_path / f"life-7-{i}").touch()
    with pytest.raises(NeError, match=f"item 7 of `work` lost its Ray worker {ITEM_ATTEMPTS} times"):
        run_on_actors(flaky_actors(2, tmp_path, restarts=5), "work", [7, 8], (7,))


def marked(result: dict, stage: str, event: str, node: str) -> set[str]:
    """What `node` started or ended in `stage` (the hooks' marks: STAGE-EVENT-WHAT-NODE)."""
    prefix = f"{stage}-{event}-"
    return {m[len(prefix) : -len(node) - 1] for m in result["marks"] if m.startswith(prefix) and m.endswith(node)}


@pytest.fixture(scope="module")
def node_loss(tmp_path_factory, tiny_model_cfg) -> tuple:
    """(result, LM config, MNIST config or None): the jobs run once on a 3-node cluster that loses nodes."""
    tmp = tmp_path_factory.mktemp("node_loss")
    lm = lm_config(tmp / "run", tiny_model_cfg, tmp / "corpus")
    conf = {"lm": to_dict(lm)}
    mnist = None
    if (shared_data_dir() / "mnist").exists():
        mnist = load_config(
            REPO / "configs" / "mnist-sae.yaml",
            [
                f"run_dir={tmp / 'mnist'}",
                f"data.dir={shared_data_dir() / 'mnist'}",
                "data.train_subset=640",
                "data.test_subset=300",
                "mlp.epochs=2",
                "sae.batch_size=64",
                "sae.ne_start_step=4",
                "trainer.threads_per_worker=1",
            ],
            cls=MnistRunConfig,
        )
        conf["mnist"] = to_dict(mnist)
    (tmp / "conf.json").write_text(json.dumps(conf))
    ray_tmp = tempfile.mkdtemp(prefix="ray")  # Ray's socket paths must stay short
    env = dict(
        os.environ,
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="disabled",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests" / "jobs" / "node_loss_run.py"), str(tmp), str(tmp / "conf.json")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp / "result.json").read_text())
    print("node-loss job seconds:", result["seconds"])
    return result, lm, mnist


def test_harvest_and_cluster_stage_survive_node_loss(node_loss, tmp_path):
    from index.build import run_index
    from jobs.cluster import run_cluster
    from jobs.harvest import run_harvest

    result, lm, _ = node_loss
    nodes, removed = result["nodes"], result["removed"]
    # Each dead node held work when it died, never finished it, and the surviving node redid that work.
    assert removed["harvest"] == nodes["a"] and removed["cluster"] == nodes["c"]
    for stage in ("harvest", "cluster"):
        lost = marked(result, stage, "start", removed[stage]) - marked(result, stage, "end", removed[stage])
        assert len(lost) == 1, (stage, result["marks"])
        assert lost <= marked(result, stage, "end", nodes["b"]), (stage, result["marks"])
    assert result["alive_after_harvest"] == 2  # a was gone for good: its part was redone by b's actor
    # The h slices only c's object store held were lost with it; Ray recomputed them on b.
    loaded_on_c = marked(result, "cluster", "load", nodes["c"])
    assert loaded_on_c and loaded_on_c <= marked(result, "cluster", "load", nodes["b"]), result["marks"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = replace(lm, run_dir=str(tmp_path / "reference"), harvest=replace(lm.harvest, num_workers=0))
        run_harvest(reference)
        run_cluster(reference, in_process=True)
        run_index(reference)
    finally:
        torch.set_num_threads(threads)
    got, expected = run_outputs(lm.run_dir), run_outputs(reference.run_dir)
    assert len(expected) > 20 and got == expected


def test_training_survives_node_loss(node_loss):
    from tests.jobs.test_train import MLP_SHAPES, SAE_SHAPES, library_run

    result, _, mnist = node_loss
    if mnist is None:
        require_shared("mnist")
    nodes, removed = result["nodes"], result["removed"]
    assert removed["train"] in (nodes["b"], nodes["d"])
    survivor = nodes["b"] if removed["train"] == nodes["d"] else nodes["d"]
    assert marked(result, "train", "start", removed["train"]) == {"attempt"}
    assert marked(result, "train", "end", removed["train"]) == set()
    assert marked(result, "train", "end", survivor) == {"attempt"}
    # The second attempt resumed from the checkpoint of the MLP's first epoch: 40 steps in all, 10 before it.
    assert result["train"] == {"trained": ["mlp", "sae_standard", "sae_ne_loss"], "steps": 30}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = library_run(mnist)
    finally:
        torch.set_num_threads(threads)
    for name, tensors in expected.items():
        shapes = MLP_SHAPES if name == "mlp" else SAE_SHAPES
        written = store.read_tensors(f"{mnist.run_dir}/mnist/{name}.safetensors", shapes)
        for key, value in tensors.items():
            assert torch.equal(written[key], value), (name, key)
