"""Configuration of the MNIST experiment: the MLP, the two SAEs (± neuron-embedding loss), their evaluation.

`configs/mnist-sae.yaml` mirrors `MnistRunConfig`; load it with
`ne.config.load_config(path, overrides, cls=MnistRunConfig)`. The field docstrings are the documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ne.config import _at_least, _choice
from ne.errors import ConfigError

OPTIMIZERS = ("adam", "sgd")


@dataclass
class MnistDataConfig:
    source: str = "idx"
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
        _choice("data.source", self.source, ("idx", "hf"))
        for key in ("train_subset", "test_subset"):
            value = getattr(self, key)
            if value is not None:
                _at_least(f"data.{key}", value, 1, "or null for the whole split")


@dataclass
class MLPConfig:
    hidden: int = 64
    """Width of the hidden layer (the paper: 64)."""
    epochs: int = 3
    """Training epochs (the paper: 3, "until the loss converges")."""
    batch_size: int = 64
    """Global batch size, split evenly between the Ray workers."""
    optimizer: str = "sgd"
    """`sgd` or `adam`."""
    lr: float = 0.01
    """Learning rate."""
    momentum: float = 0.0
    """SGD momentum (ignored by adam)."""

    def __post_init__(self):
        _at_least("mlp.hidden", self.hidden, 1)
        _at_least("mlp.epochs", self.epochs, 1)
        _at_least("mlp.batch_size", self.batch_size, 1)
        _choice("mlp.optimizer", self.optimizer, OPTIMIZERS)
        _positive("mlp.lr", self.lr)


@dataclass
class SAEConfig:
    expansion: int = 8
    """SAE width as a multiple of the MLP's hidden width (the paper: 8, so 512 neurons)."""
    epochs: int = 1
    """Training epochs over the training set (the paper: 1)."""
    batch_size: int = 128
    """Global batch size, split evenly between the Ray workers."""
    optimizer: str = "adam"
    """`adam` or `sgd`."""
    lr: float = 1e-3
    """Learning rate."""
    l1_coeff: float = 1e-3
    """λ1: weight of the L1 term, the mean over the batch of Σ_j |f_j|."""
    ne_coeff: float = 1.0
    """λ2: weight of the neuron-embedding loss L_N (used by the `ne_loss` SAE only)."""
    ne_momentum: float = 0.9
    """m of eq. 6: weight of the running average embedding against the batch's (the paper: 0.9)."""
    ne_examples: str = "active"
    """Which (example, neuron) pairs L_N averages over: `active` (f > 0: the definition of the issue and,
    as we read it, the paper) or `all` (every example of the batch, active or not). `all` pulls inactive
    examples towards each neuron's feature, so neurons fire more; see the report for its measured effects."""
    ne_start_step: int = 200
    """Optimiser step at which L_N is switched on (the paper: 200). The running averages are tracked from
    step 0, so they are warm when L_N starts."""

    def __post_init__(self):
        _at_least("sae.expansion", self.expansion, 1)
        _at_least("sae.epochs", self.epochs, 1)
        _at_least("sae.batch_size", self.batch_size, 1)
        _choice("sae.optimizer", self.optimizer, OPTIMIZERS)
        _positive("sae.lr", self.lr)
        if self.l1_coeff < 0 or self.ne_coeff < 0:
            raise ConfigError(f"sae.l1_coeff ({self.l1_coeff}) and sae.ne_coeff ({self.ne_coeff}) must be >= 0")
        if not 0.0 <= self.ne_momentum < 1.0:
            raise ConfigError(f"sae.ne_momentum is {self.ne_momentum}; it must lie in [0, 1), e.g. 0.9")
        _choice("sae.ne_examples", self.ne_examples, ("active", "all"))
        _at_least("sae.ne_start_step", self.ne_start_step, 0)


@dataclass
class SAEEvalConfig:
    max_examples: int = 100
    """Test examples with nonzero activation used per SAE neuron for the distances (the paper: 100)."""
    paper_batch_size: int = 128
    """Batch size of the paper's L1 column: the mean over test batches of the batch's Σ|f|."""
    batch_size: int = 2048
    """Rows per forward pass during evaluation (memory only; results do not depend on it)."""

    def __post_init__(self):
        _at_least("eval.max_examples", self.max_examples, 2, "distances need pairs")
        _at_least("eval.paper_batch_size", self.paper_batch_size, 1)
        _at_least("eval.batch_size", self.batch_size, 1)


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
        _at_least("trainer.num_workers", self.num_workers, 1)
        _at_least("trainer.checkpoint_every", self.checkpoint_every, 1)
        if self.threads_per_worker is not None:
            _at_least("trainer.threads_per_worker", self.threads_per_worker, 1)


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


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} is {value}; it must be > 0")
