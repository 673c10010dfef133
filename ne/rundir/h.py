"""Pre-MLP embeddings of a run, `h/layer=L/part-*.parquet`, read by h_id: what the cluster stage, the index and
`ne explain`'s centroids are built from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
from jaxtyping import Float

from ne import schema
from ne.errors import DataError
from ne.rundir.store import RunDir


@dataclass(frozen=True)
class LayerH:
    """Pre-MLP embeddings of one layer keyed by h_id: read once, then shared by every batch of its neurons."""

    url: str
    layer: int
    h_ids: np.ndarray
    """Sorted int64 ids, one per row."""
    rows: np.ndarray
    """[len(h_ids), d_model] in the stored dtype (float16 or float32)."""

    def positions(self, h_ids: np.ndarray) -> np.ndarray:
        """Row index of each of `h_ids`; an error naming the missing ones."""
        pos = np.searchsorted(self.h_ids, h_ids)
        found = pos < len(self.h_ids)
        found[found] = self.h_ids[pos[found]] == h_ids[found]
        if not found.all():
            missing = np.unique(h_ids[~found])[:5].tolist()
            raise DataError(
                f"{self.url}: h/layer={self.layer} lacks h_ids {missing}; the harvest is incomplete, rerun it"
            )
        return pos

    def take(self, h_ids: np.ndarray) -> Float[np.ndarray, "len(h_ids) d_model"]:
        return self.rows[self.positions(h_ids)].astype(np.float32, copy=False)


def load_h(run: RunDir, layer: int, h_ids: np.ndarray | None = None) -> LayerH:
    """The h rows of a layer: all of them, or only those of `h_ids` (then memory follows `len(h_ids)`)."""
    keep = None
    if h_ids is not None:
        wanted = np.unique(h_ids)
        keep = pc.field("h_id").isin(wanted)
        if len(wanted):  # the range lets Parquet statistics skip whole parts, which are in h_id order
            keep = (pc.field("h_id") >= int(wanted[0])) & (pc.field("h_id") <= int(wanted[-1])) & keep
    table = run.read_parquet(schema.layer_dir(schema.H_DIR, layer), columns=["h_id", "h"], filters=keep)
    ids = table.column("h_id").to_numpy()
    h = table.column("h").combine_chunks()
    rows = h.flatten().to_numpy(zero_copy_only=False).reshape(len(h), h.type.list_size)
    if np.any(ids[1:] < ids[:-1]):
        order = np.argsort(ids, kind="stable")
        ids, rows = ids[order], rows[order]
    return LayerH(run.url, layer, ids, rows)


def read_h(run: RunDir, layer: int, h_ids: np.ndarray) -> Float[np.ndarray, "len(h_ids) d_model"]:
    """The pre-MLP embeddings of layer `layer` for `h_ids`, in that order, as float32."""
    return load_h(run, layer, h_ids).take(h_ids)
