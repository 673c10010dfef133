"""Starting Ray the same way on a laptop and on a cluster."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

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


def fit(trainer):
    """`trainer.fit()`, with our own error in a Ray Train worker raised as itself, as `get` does for tasks."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as exc:
        ours = [e for _, e in sorted(exc.worker_failures.items()) if isinstance(e, NeError)]
        if ours:
            raise ours[0] from None
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


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cpu_workers(asked: int, key: str, todo: int, unit: str) -> tuple[int, int]:
    """(workers, CPUs each) for `asked` CPU workers (config key `key`) sharing `todo` `unit` (plural): the
    cluster's CPUs split between the workers, so torch gets that many threads.

    More workers than CPUs could never all be scheduled, nor more than the units of work all be busy, so their
    number is capped at both; a warning gives the numbers when the cluster is smaller than asked for.
    """
    total = cluster_cpus()
    workers = max(1, min(asked, todo, total))
    if total < asked:
        left = f" ({unit} to do: {todo})" if todo < total else ""
        log.warning(
            "%s is %d but the Ray cluster has %d CPUs; using %d worker%s%s",
            key,
            asked,
            total,
            workers,
            "s" * (workers != 1),
            left,
        )
    return workers, total // workers


def train_threads(num_workers: int, use_gpu: bool, section: str = "trainer") -> int:
    """Torch threads for each of `num_workers` Ray Train workers (config section `section`), after checking that
    the cluster can hold them all: Ray Train waits, without a word, until every worker has its CPU (or GPU, with
    `use_gpu`)."""
    workers, gpu = f"{section}.num_workers", f"{section}.use_gpu"
    if use_gpu:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if not gpus:
            raise ConfigError(f"{gpu} is true but the Ray cluster has no GPU; set {gpu} to false")
        if gpus < num_workers:
            raise ConfigError(
                f"{workers} is {num_workers} but the Ray cluster has {gpus} GPUs, one per "
                f"worker with {gpu}; set {workers} to at most {gpus}"
            )
    elif cluster_cpus() < num_workers:
        raise ConfigError(
            f"{workers} is {num_workers} but the Ray cluster has {cluster_cpus()} CPUs, one "
            f"per worker; set {workers} to at most {cluster_cpus()}"
        )
    return max(1, cluster_cpus() // num_workers)


def gpu_wanted(use_gpu: bool | None, key: str) -> bool:
    """Whether tasks take GPUs: None when the cluster has any; true on a cluster without GPUs is an error,
    as such tasks would wait forever."""
    has = ray.cluster_resources().get("GPU", 0) > 0
    if use_gpu and not has:
        raise ConfigError(f"{key} is true but the Ray cluster has no GPU; set {key} to null or false")
    return has if use_gpu is None else use_gpu


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


def check_resources(use_gpu: bool | None, gpus_per_worker: int = 1, key: str = "harvest.use_gpu") -> bool:
    """Whether model actors take GPUs; an error when they ask for GPUs the cluster lacks (checked before a
    stage removes anything)."""
    if gpus_per_worker > 1:
        check_gpus_per_node(gpus_per_worker, node_gpus())
    return gpu_wanted(use_gpu, key)


def model_actor_options(
    section: str, num_workers: int, use_gpu: bool | None, todo: int, unit: str, gpus_per_worker: int = 1
) -> tuple[int, int, dict]:
    """(actors, torch threads each, Ray options) for actors that each hold one model replica, given the config
    `section` (harvest, importance) they come from and the `todo` units of work they share.

    With GPUs (asked for, or found in the cluster when `use_gpu` is None) each actor takes `gpus_per_worker`
    of one node and splits its model over them; on CPUs the cluster's cores are split between the actors.
    A dead actor is restarted (on another node when its own is gone); `run_on_actors`, not Ray, redoes its
    task, so that a live actor takes it at once.
    """
    if check_resources(use_gpu, gpus_per_worker, f"{section}.use_gpu"):
        n, threads, resources = min(num_workers, todo), 1, {"num_gpus": gpus_per_worker, "num_cpus": 1}
    else:
        n, threads = cpu_workers(num_workers, f"{section}.num_workers", todo, unit)
        resources = {"num_cpus": threads}
    return n, threads, {"max_restarts": 2, "max_task_retries": 0, **resources}


def run_on_actors(workers: list, method: str, items: list, *args, on_done=None) -> list:
    """Give `items` one at a time to whichever actor is free (`actor.<method>(item, *args)`), calling
    `on_done(result)` as each finishes: a slow item never holds up the others. Returns the actors not known
    to be dead, for the next call.

    An actor that dies (killed, or lost with its node) gives its item back to the queue, where any live
    actor takes it. The lost actor rejoins once Ray has restarted it, which may never happen on a cluster
    left without room for it, so no item waits for it. An item whose actor dies `ITEM_ATTEMPTS` times, or
    the loss of every actor for good, is an error.
    """
    pool = _Dispatch(workers, method, items, args)
    while pool.queue or pool.running:
        pool.hand_out()
        ref = pool.next_ready()
        if ref is None:
            continue
        if ref in pool.waking:
            pool.woke(ref)
            continue
        done, result = pool.finished(ref)
        if done and on_done is not None:
            on_done(result)
    return pool.live()


class _Dispatch:
    """One `run_on_actors` call: the items still to do, and each actor free, running an item, waking (asked
    whether it answers) or asleep (restarting, asked again later)."""

    def __init__(self, workers: list, method: str, items: list, args: tuple):
        self.method, self.items, self.args = method, items, args
        self.queue = list(range(len(items)))
        self.attempts = [0] * len(items)
        self.running: dict[ray.ObjectRef, tuple[Any, int]] = {}
        self.waking = {_ping(w): w for w in workers}  # an actor takes items once it answers (its model loaded)
        self.asleep: list[tuple[float, Any]] = []  # restarting actors, pinged again at the time given
        self.free: list = []
        self.last: BaseException | None = None

    def hand_out(self) -> None:
        while self.queue and self.free:
            i = self.queue.pop(0)
            worker = self.free.pop(0)
            self.running[getattr(worker, self.method).remote(self.items[i], *self.args)] = (worker, i)

    def next_ready(self) -> ray.ObjectRef | None:
        """The next answer of a running item or a waking actor; None when the wait ended without one."""
        now = time.monotonic()
        self.waking.update({_ping(w): w for t, w in self.asleep if t <= now})
        self.asleep = [(t, w) for t, w in self.asleep if t > now]
        if not (self.running or self.waking or self.asleep):
            raise NeError(
                f"every Ray worker died ({_reason(self.last)}); {len(self.queue)} of {len(self.items)} "
                "items are not done. Rerun the command to resume: finished items are kept"
            )
        timeout = max(0.0, min(t for t, _ in self.asleep) - now) if self.asleep else None
        refs = [*self.running, *self.waking]
        if not refs:  # only restarting actors: wait for the next ping
            time.sleep(timeout or 0.0)
            return None
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        return ready[0] if ready else None

    def woke(self, ref: ray.ObjectRef) -> None:
        worker = self.waking.pop(ref)
        try:
            ray.get(ref)
            self.free.append(worker)
        except ray.exceptions.ActorUnavailableError:
            self.asleep.append((time.monotonic() + PING_SECONDS, worker))  # restarting (or waiting for room)
        except ray.exceptions.RayActorError as exc:  # dead for good: its restarts are spent
            self.last = exc

    def finished(self, ref: ray.ObjectRef) -> tuple[bool, Any]:
        """(True, the item's result), or (False, None) when its actor died and the item went back to the queue."""
        worker, i = self.running.pop(ref)
        try:
            result = get(ref)
        except ray.exceptions.RayActorError as exc:
            self.last, self.attempts[i] = exc, self.attempts[i] + 1
            if self.attempts[i] >= ITEM_ATTEMPTS:
                raise NeError(
                    f"item {self.items[i]} of `{self.method}` lost its Ray worker {self.attempts[i]} times "
                    f"(the last: {_reason(exc)}); see the Ray logs of its workers"
                ) from None
            log.warning(
                "a Ray worker died during %s of %s (%s); the item goes back to the queue",
                self.method,
                self.items[i],
                _reason(exc),
            )
            self.queue.insert(0, i)
            self.waking[_ping(worker)] = worker
            return False, None
        self.free.append(worker)
        return True, result

    def live(self) -> list:
        """The actors not known to be dead."""
        return [*self.free, *self.waking.values(), *(w for _, w in self.asleep)]


ITEM_ATTEMPTS = 3
"""Times an item may lose its actor before the job stops: an item that kills every actor must not loop."""
PING_SECONDS = 1.0
"""How often a restarting actor is asked whether it is back."""


def _ping(worker) -> ray.ObjectRef:
    return worker.__ray_ready__.remote()


def _reason(exc: BaseException | None) -> str:
    """The last line of a Ray error: its cause (a creation task's error comes last, after its traceback)."""
    lines = [line.strip() for line in str(exc or "").splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
