"""An SAE judged on held-out tokens: reconstruction, sparsity, and the downstream cost of splicing its reconstruction
into the model; the run's feature clusters add the polysemy of its latents.

Every metric is over the tokens of the held-out contexts (`sae.eval.holdout_every`), BOS excluded, in corpus
order, up to `sae.eval.tokens`:
- mse: mean over tokens and dimensions of (x̂ - x)², on the raw activations; fvu: Σ|x̂ - x|² / Σ|x - mean(x)|²;
- l0: mean number of active latents per token; dead_pct: % of latents active on none of the tokens;
  dense_pct: % active on more than `sae.eval.dense_threshold` of them;
- the splice: the hook's activation replaced by x̂ at every token but BOS, the model then run to its output.
  Causal LMs (logits): ce_clean, the mean next-token cross-entropy, and ce_increase, what the splice adds to it.
  Encoders (MiniLM): cosine, the mean over contexts of the cosine between the sentence embedding (the
  attention-masked mean of the last hidden state, as sentence-transformers pools) with and without the splice;
- from the run's `metrics.parquet` (`ne.rundir.report.polysemy`): latents with examples, the share of those with two or
  more feature clusters, the median mean_dist and the median silhouette of their neuron embeddings; and
  raw_polysemantic, raw_mean_dist: the same two on the clusters of the examples' SAE inputs h alone (not
  weighted by W_enc[j]), which tell whether a latent's examples grew alike or only its weighting of them did;
- enc_dims: the median over latents of the participation ratio (Σ_i w_i²)² / Σ_i w_i⁴ of its encoder row: how
  many input dimensions it effectively reads (d_in for a uniform row, 1 for a single dimension).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ne.compute.harvest import Context, pad_batch
from ne.config import ModelConfig
from ne.lm_sae.buffer import held_out
from ne.models import DTYPES, load_model, load_model_tokenizer
from ne.models.base import UnitModel
from ne.models.hooks import hooked
from ne.rundir.contexts import iter_context_parts
from ne.rundir.store import RunDir


@dataclass
class LMSAEMetrics:
    tokens: int
    """Held-out tokens evaluated."""
    mse: float
    fvu: float
    l0: float
    dead_pct: float
    dense_pct: float
    cosine: float = math.nan
    """Encoders: mean cosine of the sentence embeddings with and without the splice."""
    ce_clean: float = math.nan
    """Causal LMs: next-token cross-entropy without the splice (nats)."""
    ce_increase: float = math.nan
    """Causal LMs: what the splice adds to it."""
    with_examples: int = 0
    """Latents with dataset examples in the run (the pipeline's units)."""
    polysemantic: float = math.nan
    """Share of those with two or more feature clusters."""
    mean_dist: float = math.nan
    """Median over them of the mean pairwise cosine distance of their examples' neuron embeddings."""
    silhouette: float = math.nan
    """Median silhouette of their feature clusters."""
    raw_polysemantic: float = math.nan
    """Share with two or more clusters of their examples' SAE inputs h (unweighted)."""
    raw_mean_dist: float = math.nan
    """Median mean pairwise cosine distance of those h."""
    enc_dims: float = math.nan
    """Median participation ratio of the encoder rows: input dimensions a latent effectively reads."""


COLUMNS = [f.name for f in fields(LMSAEMetrics)]
FORMATS = {
    "tokens": "{:,.0f}",
    "mse": "{:.4g}",
    "fvu": "{:.3f}",
    "l0": "{:.1f}",
    "dead_pct": "{:.1f}",
    "dense_pct": "{:.2f}",
    "cosine": "{:.4f}",
    "ce_clean": "{:.3f}",
    "ce_increase": "{:.3f}",
    "with_examples": "{:,.0f}",
    "polysemantic": "{:.3f}",
    "mean_dist": "{:.3f}",
    "silhouette": "{:.3f}",
    "raw_polysemantic": "{:.3f}",
    "raw_mean_dist": "{:.3f}",
    "enc_dims": "{:.1f}",
}


def downstream_model(cfg: ModelConfig) -> tuple[UnitModel, Callable[[Tensor, Tensor], Tensor], str]:
    """The model, its output as the splice is judged by, and how: `ce` on the logits of a causal LM, `cosine` on
    an encoder's sentence embedding."""
    from ne.models.tl import TLModel

    if cfg.backend == "hf":
        from ne.compute.device import resolve_device
        from ne.models.hf import HFModel, is_causal_lm, load_hf_lm

        if is_causal_lm(cfg.name):
            base, lm = load_hf_lm(cfg, load_model_tokenizer(cfg), resolve_device(cfg.device), DTYPES[cfg.dtype])
            return base, lambda tokens, mask: lm(input_ids=tokens, attention_mask=mask).logits, "ce"
        encoder = load_model(cfg)
        assert isinstance(encoder, HFModel), "backend hf loads an HFModel"

        def sentence(tokens: Tensor, mask: Tensor) -> Tensor:
            h = encoder.model(input_ids=tokens, attention_mask=mask).last_hidden_state.float()
            return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

        return encoder, sentence, "cosine"
    model = load_model(cfg)
    assert isinstance(model, TLModel)

    def logits(tokens: Tensor, mask: Tensor) -> Tensor:
        return model.model(tokens, attention_mask=None if bool(mask.all()) else mask)

    return model, logits, "ce"


def eval_contexts(run: RunDir, holdout_every: int) -> Iterator[Context]:
    """The held-out contexts (all of them when nothing is held out), in corpus order."""
    for _, contexts in iter_context_parts(run):
        keep = held_out(np.array([c for c, _ in contexts], dtype=np.int64), holdout_every) if holdout_every else None
        yield from (c for i, c in enumerate(contexts) if keep is None or keep[i])


def _token_ce(logits: Tensor, tokens: Tensor, mask: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over targets that are real tokens, and their count (row by row: the
    log-softmax over the vocabulary is the largest tensor here)."""
    total, count = 0.0, 0
    for row in range(len(tokens)):
        real = mask[row, 1:].bool()
        ce = F.cross_entropy(logits[row, :-1].float(), tokens[row, 1:].to(logits.device), reduction="none")
        total += float(ce[real].sum())
        count += int(real.sum())
    return total, count


@torch.no_grad()
def evaluate_sae(
    model: UnitModel,
    output: Callable[[Tensor, Tensor], Tensor],
    kind: str,
    sae,
    hook: str,
    contexts: Iterator[Context],
    max_tokens: int,
    per_batch: int,
    dense_threshold: float,
) -> LMSAEMetrics:
    """Metrics of a SAELens SAE (`sae.encode`, `sae.decode`) at `hook`, over `contexts` up to `max_tokens`."""
    skip = int(model.bos_token_id is not None)
    sums: dict[str, float] = {
        "n": 0,
        "err": 0.0,
        "sq": 0.0,
        "l0": 0.0,
        "cos": 0.0,
        "ctx": 0,
        "ce": 0.0,
        "ce_spliced": 0.0,
        "ce_n": 0,
    }
    total: Tensor | None = None  # Σ x per input dimension, and how often each latent fired: sized by the first batch
    fires: Tensor | None = None

    def reconstruct(x: Tensor) -> Tensor:
        return sae.decode(sae.encode(x.float())).to(x.dtype)

    batch: list[Context] = []
    for context in _limited(contexts, max_tokens, skip):
        batch.append(context)
        if len(batch) < per_batch:
            continue
        total, fires = _batch(model, output, kind, sae, hook, batch, skip, reconstruct, sums, total, fires)
        batch = []
    if batch:
        total, fires = _batch(model, output, kind, sae, hook, batch, skip, reconstruct, sums, total, fires)
    n = int(sums["n"])
    if n == 0 or total is None or fires is None:
        from ne.errors import DataError

        raise DataError("the SAE evaluation found no held-out tokens; lower sae.eval.holdout_every or add text")
    spread = sums["sq"] - float((total / n).square().sum()) * n
    w2 = sae.W_enc.detach().double().square()  # [d_in, d_sae]
    out = LMSAEMetrics(
        tokens=n,
        mse=sums["err"] / (n * len(total)),
        fvu=sums["err"] / spread,
        l0=sums["l0"] / n,
        dead_pct=100 * float((fires == 0).double().mean()),
        dense_pct=100 * float((fires > dense_threshold * n).double().mean()),
        enc_dims=float(np.median((w2.sum(0).square() / w2.square().sum(0)).cpu().numpy())),
    )
    if kind == "cosine":
        out.cosine = sums["cos"] / sums["ctx"]
    else:
        out.ce_clean = sums["ce"] / sums["ce_n"]
        out.ce_increase = (sums["ce_spliced"] - sums["ce"]) / sums["ce_n"]
    return out


def _limited(contexts: Iterator[Context], max_tokens: int, skip: int) -> Iterator[Context]:
    """The contexts, the last one cut so that their tokens (after `skip`) number at most max_tokens."""
    left = max_tokens
    for ctx_id, tokens in contexts:
        if left <= 0:
            return
        tokens = tokens[: skip + left]
        if len(tokens) > skip:
            left -= len(tokens) - skip
            yield ctx_id, tokens


def _batch(model, output, kind, sae, hook, batch, skip, reconstruct, sums, total, fires):
    tokens, mask = pad_batch([t for _, t in batch], model.pad_token_id)
    tokens, mask = tokens.to(model.device), mask.to(model.device)
    spliced_at = mask.bool().clone()
    spliced_at[:, :skip] = False
    seen: dict[str, Tensor] = {}

    def capture(x: Tensor) -> None:
        seen["x"] = x

    with hooked(model, hook, capture):
        clean = output(tokens, mask)
    with hooked(model, hook, lambda x: torch.where(spliced_at[..., None], reconstruct(x), x)):
        spliced = output(tokens, mask)
    x = seen["x"][spliced_at].float()
    f = sae.encode(x)
    x_hat = sae.decode(f)
    if total is None:
        total, fires = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(f.shape[1], dtype=torch.long)
    total += x.double().sum(0).cpu()
    fires += (f > 0).sum(0).cpu()
    sums["n"] += len(x)
    sums["err"] += float((x_hat - x).double().square().sum())
    sums["sq"] += float(x.double().square().sum())
    sums["l0"] += float((f > 0).sum())
    if kind == "cosine":
        sums["cos"] += float(F.cosine_similarity(clean.double(), spliced.double(), dim=-1).sum())
        sums["ctx"] += len(batch)
    else:
        ce, count = _token_ce(clean, tokens, mask)
        ce_spliced, _ = _token_ce(spliced, tokens, mask)
        sums["ce"] += ce
        sums["ce_spliced"] += ce_spliced
        sums["ce_n"] += count
    return total, fires


def to_markdown(rows: dict[str, dict], stds: dict[str, dict] | None = None) -> str:
    """A Markdown table of metrics rows (name → `asdict(LMSAEMetrics)`); rows in `stds` show mean ± std. Columns
    that are NaN in every row are left out."""
    cols = [c for c in COLUMNS if any(not _missing(r.get(c)) for r in rows.values())]
    lines = ["| sae | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for c in cols:
            text = "" if _missing(row.get(c)) else FORMATS[c].format(row[c])
            if text and stds and name in stds and not _missing(stds[name].get(c)):
                text += " ± " + FORMATS[c].format(stds[name][c])
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
