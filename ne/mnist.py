"""MNIST data (IDX files, or `ylecun/mnist` through `datasets`) and the 784-64-10 ReLU MLP.

Images stay uint8 in memory (47 MB for the training set) and are normalised batch by batch with the usual
MNIST statistics, (x/255 - 0.1307) / 0.3081, then flattened, as the authors' `transforms.Normalize` did.
Weights are read and written as safetensors with the authors' tensor names (`W1`, `b1`, `W2`, `b2`).
"""

from __future__ import annotations

import gzip
import logging
import posixpath
import zlib
from dataclasses import dataclass

import fsspec
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, UInt8
from torch import Tensor, nn

from ne.errors import DataError
from ne.mnist_config import MLPConfig
from ne.parallel import SINGLE, Shard, epoch_batches

log = logging.getLogger(__name__)

MEAN, STD = 0.1307, 0.3081
N_PIXELS, N_CLASSES = 784, 10
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


@dataclass
class MnistSplit:
    images: UInt8[Tensor, "n 784"]
    labels: Int[Tensor, " n"]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> MnistSplit:
        return self if n is None else MnistSplit(self.images[:n], self.labels[:n])


def normalise(images: UInt8[Tensor, "n 784"]) -> Float[Tensor, "n 784"]:
    return (images.float() / 255.0 - MEAN) / STD


# --- IDX files ------------------------------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (gzipped or raw, detected from its first bytes) of unsigned bytes."""
    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"IDX file {path!r} does not exist") from None
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path!r} is a damaged gzip file ({exc}); download it again") from None
    if len(raw) < 4:
        raise DataError(f"{path!r} is truncated: {len(raw)} bytes, not even an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise DataError(
            f"{path!r} has magic number {magic:#010x}; an MNIST IDX file starts with {IMAGES_MAGIC:#010x} "
            f"(images) or {LABELS_MAGIC:#010x} (labels). Is it really an MNIST file?"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path!r} is truncated inside its header; download it again")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(
            f"{path!r} holds {len(raw)} bytes but its header {dims} needs {expected}: the file is "
            f"{'truncated' if len(raw) < expected else 'too long'}; download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: str, stem: str) -> str:
    fs, root = fsspec.core.url_to_fs(directory)
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if fs.exists(posixpath.join(root, name)):
            return posixpath.join(directory, name)
    raise DataError(f"{directory!r} has no {stem}(.gz); put the four MNIST IDX files there or set data.dir")


def check_idx_dir(directory: str) -> None:
    """Fail early, with the fix, when `directory` lacks any of the four IDX files."""
    fs, root = fsspec.core.url_to_fs(directory)
    if not fs.isdir(root):
        raise DataError(
            f"MNIST directory {directory!r} does not exist; set data.dir to the folder holding the IDX files "
            "(or NE_DATA_DIR for the tests), or use data.source=hf"
        )
    for stem in FILES.values():
        _find(directory, stem)


def load_idx(directory: str, split: str) -> MnistSplit:
    """The `train` or `test` split from the IDX files in `directory`."""
    check_idx_dir(directory)
    images = read_idx(_find(directory, FILES[(split, "images")]))
    labels = read_idx(_find(directory, FILES[(split, "labels")]))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{directory!r} {split}: images {images.shape} and labels {labels.shape} do not form MNIST "
            "(n×28×28 images and n labels)"
        )
    flat = images.reshape(len(images), N_PIXELS).copy()
    return MnistSplit(torch.from_numpy(flat), torch.from_numpy(labels.copy()).long())


def from_hf(dataset) -> MnistSplit:
    """Convert a `datasets` split with `image` (PIL, 28×28) and `label` columns."""
    images = np.stack([np.asarray(img, dtype=np.uint8).reshape(N_PIXELS) for img in dataset["image"]])
    return MnistSplit(torch.from_numpy(images), torch.tensor(dataset["label"], dtype=torch.long))


def load_hf(split: str, name: str = "ylecun/mnist") -> MnistSplit:
    import datasets

    return from_hf(datasets.load_dataset(name, split=split))


def load_mnist(source: str, directory: str, split: str) -> MnistSplit:
    return load_hf(split) if source == "hf" else load_idx(directory, split)


# --- weights --------------------------------------------------------------------------------------------


def read_tensors(path: str, shapes: dict[str, tuple[int | None, ...]]) -> dict[str, Tensor]:
    """Load a safetensors file and check it holds exactly `shapes`' names, each of rank and size given
    (None: any size). Returns float32 tensors."""
    try:
        with fsspec.open(path, "rb") as f:
            tensors = safetensors.torch.load(f.read())
    except FileNotFoundError:
        raise DataError(f"weights file {path!r} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise DataError(f"{path!r} is not a readable safetensors file ({exc})") from None
    if set(tensors) != set(shapes):
        raise DataError(
            f"{path!r} holds tensors {sorted(tensors)}; expected exactly {sorted(shapes)} (the authors' names)"
        )
    for name, want in shapes.items():
        got = tuple(tensors[name].shape)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            raise DataError(f"{path!r}: tensor {name} has shape {list(got)}, expected {list(want)}")
    return {k: v.float() for k, v in tensors.items()}


def tensors_bytes(module: nn.Module) -> bytes:
    return safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()})


# --- the MLP --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """logits = W2 · relu(W1 · x + b1) + b2 on normalised, flattened images."""

    def __init__(self, hidden: int = 64, generator: torch.Generator | None = None):
        super().__init__()
        self.W1 = nn.Parameter(_uniform((hidden, N_PIXELS), N_PIXELS, generator))
        self.b1 = nn.Parameter(_uniform((hidden,), N_PIXELS, generator))
        self.W2 = nn.Parameter(_uniform((N_CLASSES, hidden), hidden, generator))
        self.b2 = nn.Parameter(_uniform((N_CLASSES,), hidden, generator))

    @property
    def hidden_size(self) -> int:
        return self.W1.shape[0]

    def hidden(self, x: Float[Tensor, "n 784"]) -> Float[Tensor, "n hidden"]:
        return F.relu(x @ self.W1.T + self.b1)

    def head(self, a: Float[Tensor, "n hidden"]) -> Float[Tensor, "n 10"]:
        return a @ self.W2.T + self.b2

    def forward(self, x: Float[Tensor, "n 784"]) -> Float[Tensor, "n 10"]:
        return self.head(self.hidden(x))

    @classmethod
    def load(cls, path: str) -> MLP:
        t = read_tensors(path, {"W1": (None, N_PIXELS), "b1": (None,), "W2": (N_CLASSES, None), "b2": (N_CLASSES,)})
        hidden = t["W1"].shape[0]
        if t["b1"].shape[0] != hidden or t["W2"].shape[1] != hidden:
            raise DataError(
                f"{path!r}: W1 {list(t['W1'].shape)}, b1 {list(t['b1'].shape)} and W2 {list(t['W2'].shape)} "
                "disagree on the hidden width"
            )
        model = cls(hidden)
        model.load_state_dict(t)
        return model


def _uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator | None) -> Tensor:
    """nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from a given generator."""
    bound = fan_in**-0.5
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def train_mlp_epoch(
    model: MLP, opt: torch.optim.Optimizer, train: MnistSplit, cfg: MLPConfig, seed: int, epoch: int,
    shard: Shard = SINGLE,
) -> float:
    """One epoch of cross-entropy training on this worker's slices; returns the mean training loss."""
    total = torch.zeros(1, device=train.images.device)  # on the device: NCCL reduces only GPU tensors
    for batch in epoch_batches(len(train), cfg.batch_size, seed, epoch):
        rows = shard.rows(batch)
        logits = model(normalise(train.images[rows]))
        loss = F.cross_entropy(logits, train.labels[rows], reduction="sum") / len(batch)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        shard.sum_grads(model)
        opt.step()
        total += loss.detach() * len(batch)
    return float(shard.sum(total)[0] / len(train))


@torch.no_grad()
def hidden_acts(model: MLP, images: UInt8[Tensor, "n 784"], batch_size: int = 4096) -> Float[Tensor, "n hidden"]:
    return torch.cat([model.hidden(normalise(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def accuracy(model: MLP, split: MnistSplit, batch_size: int = 4096) -> float:
    correct = sum(
        int((model(normalise(split.images[i : i + batch_size])).argmax(1) == split.labels[i : i + batch_size]).sum())
        for i in range(0, len(split), batch_size)
    )
    return correct / len(split)
