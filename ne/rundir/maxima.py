"""Each unit's extreme activation from `maxima.parquet`, in the sign the selection uses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

from ne import schema
from ne.compute.harvest import SIGNS
from ne.rundir.store import RunDir


def signed_extremes(run: RunDir, layers: Sequence[int], direction: str) -> dict[int, Float[np.ndarray, " d_mlp"]]:
    """Per layer, in neuron order, sign × each neuron's extreme from maxima.parquet: its maximum, or minus its
    minimum for `direction: min`, so that `thresholds_from_maxima` and the comparisons after it read alike."""
    maxima = run.read_parquet(schema.MAXIMA).to_pandas()
    column, sign = schema.extreme_column(direction), SIGNS[direction]
    return {
        layer: sign * maxima[maxima.layer == layer].sort_values("neuron")[column].to_numpy(np.float32)
        for layer in layers
    }
