"""Starting Ray the same way on a laptop and on a cluster."""

from __future__ import annotations

import logging
import os

import ray

from ne.errors import ConfigError, NeError

log = logging.getLogger(__name__)


def get(ref: ray.ObjectRef):
    """`ray.get`, with our own errors raised as themselves: one line for the user, not a remote traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, NeError):
            raise exc.cause from None
        raise


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), or start a local one.

    `NE_RAY_NUM_CPUS` caps a local cluster's CPUs (tests use it to stay small).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if not os.environ.get("RAY_ADDRESS") and os.environ.get("NE_RAY_NUM_CPUS"):
        kwargs["num_cpus"] = int(os.environ["NE_RAY_NUM_CPUS"])
    ray.init(**kwargs)
    log.info("Ray resources: %s", ray.cluster_resources())


def cpu_workers(num_workers: int) -> tuple[int, int]:
    """(workers, CPUs each): the cluster's CPUs split between CPU workers, so torch gets that many threads.

    More workers than CPUs could never all be scheduled, so their number is capped at the CPUs.
    """
    total = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = min(num_workers, total)
    if workers < num_workers:
        log.warning("%d workers asked for but the cluster has %d CPUs; using %d", num_workers, total, workers)
    return workers, total // workers


def cpus_per_worker(num_workers: int) -> int:
    """CPUs (torch threads) for each of `num_workers` CPU workers."""
    return cpu_workers(num_workers)[1]


def gpu_wanted(use_gpu: bool | None, key: str) -> bool:
    """Whether tasks take GPUs: None when the cluster has any; true on a cluster without GPUs is an error,
    as such tasks would wait forever."""
    has = ray.cluster_resources().get("GPU", 0) > 0
    if use_gpu and not has:
        raise ConfigError(f"{key} is true but the Ray cluster has no GPU; set {key} to null or false")
    return has if use_gpu is None else use_gpu


def check_train_workers(num_workers: int, use_gpu: bool, key: str) -> None:
    """Ray Train places all its workers at once, each on a CPU (or a GPU with `use_gpu`): more workers than the
    cluster has would wait forever, so that is an error."""
    kind = "GPU" if use_gpu else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    if num_workers > have:
        raise ConfigError(f"{key} is {num_workers} but the Ray cluster has {have} {kind}s; each worker takes one, "
                          f"so set {key} to at most {have} (or add nodes)")


def check_gpus_per_node(gpus_per_worker: int, node_gpus: list[float]) -> None:
    """An actor's GPUs must all be on one node: `gpus_per_worker` no more than the largest node has."""
    most = int(max(node_gpus, default=0))
    if gpus_per_worker > most:
        per_node = ", ".join(str(int(g)) for g in node_gpus) or "none"
        raise ConfigError(
            f"harvest.gpus_per_worker is {gpus_per_worker} but the Ray cluster's nodes have at most {most} GPUs "
            f"(per node: {per_node}); one actor's GPUs must share a node: set harvest.gpus_per_worker to at most "
            f"{max(most, 1)}"
        )


def node_gpus() -> list[float]:
    """GPUs of every live node of the Ray cluster."""
    return [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]


def model_actor_options(
    num_workers: int, use_gpu: bool | None, gpus_per_worker: int = 1, key: str = "harvest.use_gpu"
) -> tuple[int, int, dict]:
    """(actors, torch threads each, Ray options) for actors that each hold one model replica.

    With GPUs (asked for, or found in the cluster when `use_gpu` is None) each actor takes `gpus_per_worker`
    of one node and splits its model over them; on CPUs the cluster's cores are split between the actors.
    A killed actor is restarted and its task retried.
    """
    if gpus_per_worker > 1:
        check_gpus_per_node(gpus_per_worker, node_gpus())
    if gpu_wanted(use_gpu, key):
        n, threads, resources = num_workers, 1, {"num_gpus": gpus_per_worker, "num_cpus": 1}
    else:
        n, threads = cpu_workers(num_workers)
        resources = {"num_cpus": threads}
    return n, threads, {"max_restarts": 2, "max_task_retries": 2, **resources}


def run_on_actors(workers: list, method: str, items: list, *args, on_done=None) -> None:
    """Give `items` one at a time to whichever actor is free (`actor.<method>(item, *args)`), calling
    `on_done(result)` as each finishes: a slow item never holds up the others."""
    queue, running = list(items), {}

    def submit(worker) -> None:
        if queue:
            running[getattr(worker, method).remote(queue.pop(0), *args)] = worker

    for worker in workers:
        submit(worker)
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        worker = running.pop(ref)
        result = get(ref)
        if on_done is not None:
            on_done(result)
        submit(worker)
