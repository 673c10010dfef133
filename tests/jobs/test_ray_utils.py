"""jobs/ray_utils.py: workers sized to the cluster with the real numbers, and one-line errors out of Ray Train
(the checks of Ray Train's workers against the cluster: tests/jobs/test_train.py)."""

from __future__ import annotations

import logging

import pytest

from ne.errors import DataError

pytestmark = pytest.mark.ray


def test_a_cluster_smaller_than_asked_warns_with_the_real_numbers(local_ray, caplog):
    from jobs.ray_utils import cpu_workers, model_actor_options

    with caplog.at_level(logging.WARNING, logger="jobs.ray_utils"):
        assert cpu_workers(50, "harvest.num_workers", 3, "parts") == (2, 1)
    assert caplog.messages == ["harvest.num_workers is 50 but the Ray cluster has 2 CPUs; using 2 workers"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jobs.ray_utils"):
        n, threads, options = model_actor_options("importance", 50, False, 1, "neuron batches")
    assert (n, threads, options["num_cpus"]) == (1, 2, 2)
    assert caplog.messages == [
        "importance.num_workers is 50 but the Ray cluster has 2 CPUs; using 1 worker (neuron batches to do: 1)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jobs.ray_utils"):
        assert cpu_workers(2, "harvest.num_workers", 1, "parts") == (1, 2)  # fewer parts than workers: no warning
    assert caplog.messages == []


def test_our_error_in_a_ray_train_worker_comes_out_as_itself(local_ray, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.ray_utils import fit

    def loop(config):
        raise DataError("'train-images-idx3-ubyte.gz' holds 16 bytes but its header needs 15696; download it again")

    trainer = TorchTrainer(
        loop,
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name="fails", storage_path=str(tmp_path)),
    )
    with pytest.raises(DataError, match=r"^'train-images-idx3-ubyte.gz' holds 16 bytes") as err:
        fit(trainer)
    assert err.value.__suppress_context__  # raised as itself: no chain of Ray's own errors printed with it

    class Other:  # a worker failure that is not ours stays Ray's error, with its traceback
        def fit(self):
            raise ray.train.WorkerGroupError("rank 0 failed", {0: ValueError("a bug")})

    with pytest.raises(ray.train.WorkerGroupError):
        fit(Other())
