"""Configuration of the MNIST experiment: the MLP, the two SAEs (± neuron-embedding loss), their evaluation.

`configs/mnist-sae.yaml` mirrors `MnistRunConfig`; load it with
`ne.config.load_config(path, overrides, cls=MnistRunConfig)`. The field docstrings are the documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ne.checks import at_least, check_choices, positive
from ne.compute.sae import SAEConfig
from ne.errors import ConfigError


@dataclass
class MnistDataConfig:
    source: Literal["idx", "hf"] = "idx"
    """`idx`: the four IDX files (gzipped or not) in `dir`. `hf`: the Hugging Face dataset `ylecun/mnist`
    through `datasets` (needs the hub, or its local cache)."""
    dir: str = "../shared/data/mnist"
    """idx source: the directory holding train-images-idx3-ubyte(.gz) and the three other files. A relative
    path is taken from the working directory."""
    train_subset: int | None = None
    """Use only the first n training images (tests and quick runs). None: all 60,000."""
    test_subset: int | None = None
    """Use only the first n test images. None: all 10,000."""

    def __post_init__(self):
        check_choices(self, "data")
        for key in ("train_subset", "test_subset"):
            value = getattr(self, key)
            if value is not None:
                at_least(f"data.{key}", value, 1, "or null for the whole split")


@dataclass
class MLPConfig:
    hidden: int = 64
    """Width of the hidden layer (the paper: 64)."""
    epochs: int = 3
    """Training epochs (the paper: 3, "until the loss converges")."""
    batch_size: int = 64
    """Global batch size, split evenly between the Ray workers."""
    optimizer: Literal["sgd", "adam"] = "adam"
    """`adam` or `sgd`."""
    lr: float = 2e-4
    """Learning rate."""
    momentum: float = 0.0
    """SGD momentum (ignored by adam)."""
    weight_decay: float = 0.01
    """L2 weight decay added to the gradient (torch's `weight_decay`). Adam, lr 2e-4, 0.01 gives an MLP like
    the authors': 93.7% test accuracy (theirs 94.0), |W1| 3.9 (4.2), |W2| 2.8 (2.6), mean hidden-vector norm
    14.4 (14.6), and the same decay of the weights on always-blank pixels (6% of their initial spread, theirs
    6%; without decay it stays 100%)."""

    def __post_init__(self):
        at_least("mlp.hidden", self.hidden, 1)
        at_least("mlp.epochs", self.epochs, 1)
        at_least("mlp.batch_size", self.batch_size, 1)
        check_choices(self, "mlp")
        positive("mlp.lr", self.lr)
        if self.weight_decay < 0:
            raise ConfigError(f"mlp.weight_decay is {self.weight_decay}; it must be >= 0")


@dataclass
class SAEEvalConfig:
    max_examples: int = 100
    """Test examples with nonzero activation used per SAE neuron for the distances (the paper: 100)."""
    paper_batch_size: int = 128
    """Batch size of the paper's L1 column: the mean over test batches of the batch's Σ|f|."""
    batch_size: int = 2048
    """Rows per forward pass during evaluation (memory only; results do not depend on it)."""

    def __post_init__(self):
        at_least("eval.max_examples", self.max_examples, 2, "distances need pairs")
        at_least("eval.paper_batch_size", self.paper_batch_size, 1)
        at_least("eval.batch_size", self.batch_size, 1)


@dataclass
class TrainerConfig:
    num_workers: int = 1
    """Ray Train workers. Each takes an equal slice of every global batch and gradients are summed, so
    any number of workers follows the same trajectory up to float rounding."""
    use_gpu: bool = False
    """Give each worker one GPU."""
    threads_per_worker: int | None = None
    """torch threads in each worker. None: the cluster's CPUs divided by the workers."""
    checkpoint_every: int = 1
    """Ray checkpoint after every n-th epoch of each model (each report costs about 2 s)."""

    def __post_init__(self):
        at_least("trainer.num_workers", self.num_workers, 1)
        at_least("trainer.checkpoint_every", self.checkpoint_every, 1)
        if self.threads_per_worker is not None:
            at_least("trainer.threads_per_worker", self.threads_per_worker, 1)


@dataclass
class MnistRunConfig:
    run_dir: str = "runs/mnist"
    """Where outputs go (`mnist/*.safetensors`, tables); a local path or an fsspec URL."""
    seed: int = 0
    """Seed of initialisation and batch order; the same config and seed give the same weights."""
    data: MnistDataConfig = field(default_factory=MnistDataConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    eval: SAEEvalConfig = field(default_factory=SAEEvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        at_least("seed", self.seed, 0, "seeds are non-negative integers")
