"""MNIST data: the IDX files, or `ylecun/mnist` through `datasets`.

Images stay uint8 in memory (47 MB for the training set) and are scaled batch by batch with the usual
MNIST statistics, (x/255 - 0.1307) / 0.3081, then flattened, as the authors' `transforms.Normalize` did.
"""

from __future__ import annotations

import gzip
import logging
import posixpath
import zlib
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from jaxtyping import Float, Int, UInt8
from torch import Tensor

from ne.errors import DataError

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


def scale_pixels(images: UInt8[Tensor, "n 784"]) -> Float[Tensor, "n 784"]:
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


def find_file(directory: str, stem: str) -> str:
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
        find_file(directory, stem)


def load_idx(directory: str, split: str) -> MnistSplit:
    """The `train` or `test` split from the IDX files in `directory`."""
    check_idx_dir(directory)
    images = read_idx(find_file(directory, FILES[(split, "images")]))
    labels = read_idx(find_file(directory, FILES[(split, "labels")]))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{directory!r} {split}: images {images.shape} and labels {labels.shape} do not form MNIST "
            "(n×28×28 images and n labels)"
        )
    check_labels(labels, f"{directory!r} {split} labels")
    flat = images.reshape(len(images), N_PIXELS).copy()
    return MnistSplit(torch.from_numpy(flat), torch.from_numpy(labels.copy()).long())


def check_labels(labels: np.ndarray, where: str) -> None:
    """MNIST labels are digits; anything else would index past the 10 logits deep inside training."""
    bad = np.flatnonzero((labels < 0) | (labels >= N_CLASSES))
    if len(bad):
        raise DataError(
            f"{where}: label {int(labels[bad[0]])} at index {int(bad[0])} ({len(bad)} such) lies outside 0..9; "
            "MNIST labels are digits, so the file is damaged or is not MNIST"
        )


def from_hf(dataset) -> MnistSplit:
    """Convert a `datasets` split with `image` (PIL, 28×28) and `label` columns."""
    images = np.stack([np.asarray(img, dtype=np.uint8).reshape(N_PIXELS) for img in dataset["image"]])
    labels = np.asarray(dataset["label"], dtype=np.int64)
    check_labels(labels, "the Hugging Face MNIST labels")
    return MnistSplit(torch.from_numpy(images), torch.from_numpy(labels))


def load_hf(split: str, name: str = "ylecun/mnist") -> MnistSplit:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except (ConnectionError, OSError) as exc:  # offline, the hub unreachable, or not in the local cache
        raise DataError(
            f"cannot load the Hugging Face dataset {name!r} ({str(exc).splitlines()[0]}); without the "
            "hub, use data.source=idx with data.dir holding the four MNIST IDX files"
        ) from None
    return from_hf(dataset)


def load_mnist(source: str, directory: str, split: str) -> MnistSplit:
    return load_hf(split) if source == "hf" else load_idx(directory, split)
