"""The weights file of a harvested layer, `weights/layer=L.safetensors`, so later stages never load the model.

Matrices are stored neuron-major, `[d_mlp, d_model]` (row j is neuron j's input vector), under `W_in_T`
(plain MLP) or `W_gate_T` and `W_up_T` (gated), with the biases `b_in` or `b_gate`, `b_up`. A batch of
neurons is then one contiguous byte range, read alone: a cluster task's memory follows its batch, not the
layer's width. Files of older runs (`W_in`, [d_model, d_mlp]) are still read, whole.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import safetensors.numpy
from jaxtyping import Float
from torch import Tensor

from ne import schema
from ne.compute.embed import LayerWeights
from ne.errors import DataError
from ne.rundir.store import RunDir

ROW_KEYS = {"W_in": "W_in_T", "W_gate": "W_gate_T", "W_up": "W_up_T"}
_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def weights_file(tensors: dict[str, Tensor]) -> bytes:
    """`UnitModel.input_weights` (W_in [d_model, d_mlp], ...) as the file's bytes, matrices neuron-major."""
    out = {
        ROW_KEYS.get(k, k): (v.T if k in ROW_KEYS else v).float().cpu().contiguous().numpy() for k, v in tensors.items()
    }
    return safetensors.numpy.save(out)


def read_layer_weights(run: RunDir, layer: int, lo: int = 0, hi: int | None = None) -> LayerWeights:
    """Neurons lo..hi-1 of a layer (all by default), reading only their rows of the weights file."""
    rel = schema.weights_path(layer)
    header, start = _header(run, rel)
    if "W_in" in header:  # an older run: [d_model, d_mlp], read whole
        w_in = safetensors.numpy.load(run.read_bytes(rel))["W_in"]
        hi = w_in.shape[1] if hi is None else hi
        return LayerWeights(np.ascontiguousarray(w_in[:, lo:hi].T), None, lo, w_in.shape[1])
    gate_key = "W_gate_T" if "W_gate_T" in header else "W_in_T"
    d_mlp = header[gate_key]["shape"][0]
    hi = d_mlp if hi is None else min(hi, d_mlp)
    up = _rows(run, rel, header, start, "W_up_T", lo, hi) if "W_up_T" in header else None
    return LayerWeights(_rows(run, rel, header, start, gate_key, lo, hi), up, lo, d_mlp)


def read_w_in(run: RunDir, layer: int) -> Float[np.ndarray, "d_model d_mlp"]:
    """The input of act_fn of a harvested layer, [d_model, d_mlp]: W_in, or a gated layer's gate."""
    return read_layer_weights(run, layer).gate.T


def _header(run: RunDir, rel: str) -> tuple[dict, int]:
    """The safetensors header (tensor name: dtype, shape, data_offsets) and where the data starts."""
    raw = run.read_range(rel, 0, 8)
    size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
    try:
        header = json.loads(run.read_range(rel, 8, 8 + size))
    except (ValueError, UnicodeDecodeError):
        raise DataError(
            f"{run.path(rel)} is not a safetensors file; redo the harvest's weights stage with "
            "`ne harvest --config CONFIG --force weights`"
        ) from None
    return header, 8 + size


def _rows(run: RunDir, rel: str, header: dict, start: int, key: str, lo: int, hi: int) -> np.ndarray:
    entry = header[key]
    dtype = np.dtype(_NUMPY[entry["dtype"]])
    width = int(np.prod(entry["shape"][1:]))
    begin = start + entry["data_offsets"][0] + lo * width * dtype.itemsize
    data = run.read_range(rel, begin, begin + (hi - lo) * width * dtype.itemsize)
    return np.frombuffer(data, dtype=dtype).reshape(hi - lo, width).astype(np.float32)
