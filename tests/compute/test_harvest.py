"""ne/compute/harvest.py: selection as tensor ops, against naive loops written here."""

import numpy as np
import pyarrow as pa
import torch

from ne import schema
from ne.compute import harvest


def naive_first_k(peaks: np.ndarray, thresholds: np.ndarray, k: int) -> list[tuple[int, int, int]]:
    """(neuron, rank, row) by a plain loop over neurons and rows."""
    out = []
    for n in range(peaks.shape[1]):
        rank = 0
        for row in range(peaks.shape[0]):
            if rank < k and peaks[row, n] >= thresholds[n]:
                out.append((n, rank, row))
                rank += 1
    return out


def test_first_k_over_batches_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    peaks = torch.randn(50, 40, generator=gen)
    thresholds = torch.rand(40, generator=gen) * 1.5
    first_k = harvest.FirstK(thresholds, k=4)
    got = []
    for start in range(0, 50, 7):  # batches that do not divide the rows evenly
        row, neuron, rank = first_k.select(peaks[start : start + 7])
        got += [(int(n), int(r), int(b) + start) for b, n, r in zip(row, neuron, rank)]
    assert sorted(got) == naive_first_k(peaks.numpy(), thresholds.numpy(), 4)


def peaks(act, mask, has_bos):
    """Every (context, neuron) pair's peak and its position, the way the collector takes them."""
    key = harvest.key_activations(act, mask, has_bos)
    rows, neurons = torch.meshgrid(torch.arange(act.shape[0]), torch.arange(act.shape[2]), indexing="ij")
    return key.amax(dim=1), harvest.peak_positions(key, rows.ravel(), neurons.ravel(), has_bos).view(act.shape[0], -1)


def test_masked_peaks_ignores_bos_and_padding():
    act = torch.tensor([[[9.0], [1.0], [3.0], [7.0]], [[9.0], [2.0], [2.0], [8.0]]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    peak, pos = peaks(act, mask, has_bos=True)
    assert peak[:, 0].tolist() == [7.0, 2.0]
    assert pos[:, 0].tolist() == [3, 1]  # first of the tied maxima, never BOS (9.0) or padding (8.0)
    peak, pos = peaks(act, torch.ones_like(mask), has_bos=False)
    assert peak[:, 0].tolist() == [9.0, 9.0] and pos[:, 0].tolist() == [0, 0]


def test_thresholds_skip_neurons_that_never_fire():
    thr = harvest.thresholds_from_maxima(torch.tensor([2.0, 0.0, -1.0]), 0.75)
    assert thr[0] == 1.5 and torch.isinf(thr[1:]).all()


def test_merge_examples_keeps_first_k_in_corpus_order():
    rng = np.random.default_rng(0)
    n = 200
    table = pa.Table.from_pydict(
        {
            "layer": np.zeros(n, np.int16),
            "neuron": rng.integers(0, 10, n).astype(np.int32),
            "rank": np.zeros(n, np.int16),
            "ctx_id": rng.permutation(1000)[:n].astype(np.int64),
            "pos": np.ones(n, np.int16),
            "act": rng.random(n).astype(np.float32),
            "window_start": np.zeros(n, np.int16),
            "window": [[1.0]] * n,
            "h_id": np.arange(n, dtype=np.int64),
        },
        schema=schema.EXAMPLES,
    )
    merged = harvest.merge_examples(table, k=3).to_pandas()
    expected = table.to_pandas().sort_values(["neuron", "ctx_id"]).groupby("neuron").head(3)
    assert merged.ctx_id.tolist() == expected.ctx_id.tolist()
    assert merged.groupby("neuron")["rank"].apply(list).map(lambda r: r == list(range(len(r)))).all()
