"""A whole Ray node lost during the harvest, the cluster stage and MNIST training (tests/jobs/test_node_loss.py).

Run as a script, in its own process: it starts a local multi-node cluster (`ray.cluster_utils.Cluster`: a head
with no CPUs, so every task and actor runs on a worker node, and worker nodes of one CPU each, every node with
its own raylet and object store), then runs each job in the main thread while a watcher thread removes a node
(SIGKILL of its raylet, object store and workers).

The moment is made deterministic by hooks that wrap the job's own work: the first piece of work on the victim
node marks itself held and never finishes, and work on other nodes waits until the victim is gone, so the
victim surely holds work when it dies and nothing else can have run it. In the cluster stage the other node is
kept busy until then, so the h slices the victim loaded into its object store have no copy anywhere else and
Ray must recompute them. Every start and end of a piece of work is recorded with its node (`marks/`), so the
test can check what the dead node was doing and who redid it.

    python tests/jobs/node_loss_run.py WORK CONFIG.json  ->  WORK/result.json
"""

from __future__ import annotations

import glob
import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import jobs.cluster
import jobs.harvest
import jobs.train
from index.build import run_index
from ne.config import RunConfig, from_dict
from ne.mnist.config import MnistRunConfig

WAIT_LIMIT_S = 600
"""Work off the victim waits at most this long for the victim to die (then the test fails)."""
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "max_direct_call_object_size": 1024,
}
"""The GCS declares a silent node dead after ~1.5 s instead of ~30 s; results over 1 KiB go to the object store
of the node that made them (as a real run's h slices do), not back to the driver inline."""


def mark(marks: str, name: str, text: str = "") -> None:
    Path(marks, name).write_text(text)


def wait_for(path: str, limit: float = WAIT_LIMIT_S) -> None:
    deadline = time.time() + limit
    while not glob.glob(path):
        if time.time() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def on_victim(marks: str, stage: str) -> bool:
    return ray.get_runtime_context().get_node_id() == Path(marks, f"{stage}-victim").read_text()


def hold_or_go(marks: str, stage: str, what: str) -> None:
    """On the victim node: mark the work held and block until the node dies. Elsewhere: wait until it is gone."""
    mark(marks, f"{stage}-start-{what}-{ray.get_runtime_context().get_node_id()}")
    if on_victim(marks, stage) and not Path(marks, f"{stage}-held").exists():
        mark(marks, f"{stage}-held", f"{what} {ray.get_runtime_context().get_node_id()}")
        while True:
            time.sleep(1)
    wait_for(os.path.join(marks, f"{stage}-removed"))


def done(marks: str, stage: str, what: str, event: str = "end") -> None:
    mark(marks, f"{stage}-{event}-{what}-{ray.get_runtime_context().get_node_id()}")


def hooked_harvest(marks: str):
    class HoldingProcessor(jobs.harvest.PartProcessor):
        def examples(self, part, *args):
            hold_or_go(marks, "harvest", f"part{part}")
            out = super().examples(part, *args)
            done(marks, "harvest", f"part{part}")
            return out

    return ray.remote(HoldingProcessor)


def hooked_cluster_batch(marks: str):
    def cluster_batch(run_url, batch, *args):
        from jobs.cluster import cluster_batch as real  # the worker's own module, never patched

        what = f"layer{batch.layer}batch{batch.index}"
        hold_or_go(marks, "cluster", what)
        out = real(run_url, batch, *args)
        done(marks, "cluster", what)
        return out

    return cluster_batch


def hooked_load_h(marks: str):
    def load_h(run, layer, ids):
        from ne.rundir.h import load_h as real  # the worker's own module, never patched

        out = real(run, layer, ids)
        done(marks, "cluster", f"load{layer}", event="load")
        return out

    return load_h


@ray.remote(num_cpus=1)
def occupy(marks: str, stage: str) -> None:
    """Keep a node's CPU busy until the stage's victim is gone: until then, the stage runs on the victim alone."""
    done(marks, stage, "occupy", event="occupied")
    wait_for(os.path.join(marks, f"{stage}-removed"))


def hooked_train_loop(marks: str):
    """The first attempt holds right after its first checkpoint is reported; the attempt after the node loss
    runs freely. The victim is whichever node the Ray Train worker landed on."""

    def train_loop(config):
        import jobs.train as train  # the worker's own module: patched here, in the worker

        node = ray.get_runtime_context().get_node_id()
        first_attempt = not Path(marks, "train-held").exists()
        mark(marks, f"train-start-attempt-{node}")
        report = train._save_state

        def save_state(state, metrics):
            report(state, metrics)
            if first_attempt:
                mark(marks, "train-held", f"after {metrics.get('model')} epoch {metrics.get('epoch')} {node}")
                while True:
                    time.sleep(1)

        real, train._save_state = train.train_loop, save_state
        real(config)
        mark(marks, f"train-end-attempt-{node}")

    return train_loop


def remove_when_held(cluster: Cluster, marks: str, stage: str, removed: dict, then: str | None = None) -> None:
    """Watcher: once `stage` holds work on a node (and `then`, a path glob, exists), remove that whole node."""

    def watch() -> None:
        wait_for(os.path.join(marks, f"{stage}-held"), limit=600)
        if then:
            wait_for(then, limit=600)
        node_id = Path(marks, f"{stage}-held").read_text().split()[-1]
        node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
        cluster.remove_node(node, allow_graceful=False)
        removed[stage] = node_id
        mark(marks, f"{stage}-removed")

    threading.Thread(target=watch, daemon=True).start()


def main(work: str, config_path: str) -> None:
    conf = json.loads(Path(config_path).read_text())
    marks = os.path.join(work, "marks")
    os.makedirs(marks, exist_ok=True)
    seconds, clock = {}, time.time()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name], clock = round(time.time() - clock, 1), time.time()

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": SYSTEM_CONFIG},
    )
    a, b = cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)  # three nodes
    ray.init(address=cluster.address)
    removed: dict = {}
    lap("start")

    # The harvest: one actor on each worker node; a's first part of pass 2 dies with a. Nothing replaces a.
    cfg = from_dict(RunConfig, conf["lm"])
    mark(marks, "harvest-victim", a.node_id)
    jobs.harvest.HarvestWorker = hooked_harvest(marks)
    remove_when_held(cluster, marks, "harvest", removed)
    jobs.harvest.run_harvest(cfg)
    alive_after_harvest = sum(n["Alive"] for n in ray.nodes())
    lap("harvest")

    # The cluster stage: a new node c joins (as an autoscaler would add one) while b is busy, so c loads the h
    # slices into its object store (no copy anywhere else) and starts the first batch; c dies with all three.
    c = cluster.add_node(num_cpus=1)
    mark(marks, "cluster-victim", c.node_id)
    busy = occupy.options(scheduling_strategy=NodeAffinitySchedulingStrategy(b.node_id, soft=False)).remote(
        marks, "cluster"
    )
    wait_for(os.path.join(marks, "cluster-occupied-occupy-*"))
    jobs.cluster.cluster_batch = hooked_cluster_batch(marks)
    jobs.cluster.load_h = hooked_load_h(marks)
    remove_when_held(cluster, marks, "cluster", removed)
    jobs.cluster.run_cluster(cfg)
    ray.get(busy)
    run_index(cfg)
    lap("cluster")

    result = {
        "nodes": {"head": cluster.head_node.node_id, "a": a.node_id, "b": b.node_id, "c": c.node_id},
        "alive_after_harvest": alive_after_harvest,
        "removed": removed,
        "seconds": seconds,
    }
    if "mnist" in conf:  # training: node d joins; the Ray Train worker's node dies once a checkpoint is registered
        d = cluster.add_node(num_cpus=1)
        mnist = from_dict(MnistRunConfig, conf["mnist"])
        jobs.train.train_loop = hooked_train_loop(marks)
        snapshot = os.path.join(mnist.run_dir, "ray", "*", "checkpoint_manager_snapshot.json")
        remove_when_held(cluster, marks, "train", removed, then=snapshot)
        summary = jobs.train.run_train(mnist)
        lap("train")
        result["nodes"]["d"] = d.node_id
        result["train"] = {"trained": summary.trained, "steps": summary.steps}
    result["marks"] = sorted(os.listdir(marks))
    Path(work, "result.json").write_text(json.dumps(result, indent=1))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
