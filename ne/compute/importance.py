"""Token importance: how much a neuron's activation on the key token depends on each earlier token.

importance(i) = 1 − act_masked(i) / act_key, where act_masked(i) is the activation at the key token when
token i alone is replaced by a masking token. The masking token must be neutral for the tokenizer: its pad
token, or EOS when it has none (never an arbitrary id such as 1, which is `"` in GPT-2).

All maskings of one example run in one batched forward pass: row 0 is the unmasked context (act_key), row
r masks one position. A causal model's activation at the key token does not depend on later tokens, so for
it the context is cut after the key token; for other models (a BERT encoder) the whole context is kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float

from ne.errors import ConfigError
from ne.models.base import UnitModel


def mask_token_id(model: UnitModel, mask_token: int | None = None) -> int:
    """The configured masking token, or the model's pad token (its tokenizer's pad, else EOS)."""
    token = model.pad_token_id if mask_token is None else mask_token
    if token is None or token < 0:
        raise ConfigError(
            f"{model.name} has no pad or EOS token to mask with; set importance.mask_token to a neutral token id"
        )
    tokenizer = getattr(model, "tokenizer", None)
    if mask_token is not None and tokenizer is not None:
        check_mask_token(mask_token, len(tokenizer), model.name)
    return int(token)


def check_mask_token(mask_token: int | None, vocab_size: int, model_name: str) -> None:
    """importance.mask_token, when set, must be a token id of the model's tokenizer."""
    if mask_token is not None and not 0 <= mask_token < vocab_size:
        raise ConfigError(
            f"importance.mask_token is {mask_token} but the tokenizer of {model_name} has token ids "
            f"0..{vocab_size - 1}; give a neutral token of it, or null for its pad (or EOS) token"
        )


@torch.inference_mode()
def token_importance(
    model: UnitModel,
    tokens: Sequence[int] | np.ndarray,
    pos: int,
    layer: int,
    neuron: int,
    mask_token: int,
    start: int = 0,
) -> Float[np.ndarray, " n"]:
    """Importance of positions start..pos (inclusive) for the activation of `neuron` at key position `pos`.

    A BOS token at position 0 is never masked (every context has it); its entry is NaN. When the unmasked
    activation is 0 the ratio is undefined and every entry is NaN.
    """
    if not 0 <= pos < len(tokens):
        raise ValueError(f"key position {pos} outside a context of {len(tokens)} tokens")
    start = max(0, min(start, pos))
    context = torch.as_tensor(np.asarray(tokens[: pos + 1] if model.is_causal else tokens), dtype=torch.long)
    skip_bos = model.bos_token_id is not None and int(context[0]) == model.bos_token_id
    masked = [i for i in range(start, pos + 1) if not (i == 0 and skip_bos)]

    batch = context.repeat(len(masked) + 1, 1)
    batch[torch.arange(1, len(masked) + 1), torch.as_tensor(masked, dtype=torch.long)] = mask_token
    out = model.run(batch.to(model.device), torch.ones_like(batch).to(model.device), [layer])[layer]
    acts = out.act[:, pos, neuron].double().cpu().numpy()

    result = np.full(pos + 1 - start, np.nan, dtype=np.float32)
    if acts[0] != 0:
        result[np.asarray(masked, dtype=np.int64) - start] = 1.0 - acts[1:] / acts[0]
    return result


class ImportanceCache:
    """`token_importance` with an LRU cache keyed by what determines the answer."""

    def __init__(self, model: UnitModel, mask_token: int | None = None, max_entries: int = 4096):
        self.model = model
        self.mask_token = mask_token_id(model, mask_token)
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, tokens: Sequence[int], ctx_id: int, pos: int, layer: int, neuron: int, start: int = 0):
        key = (ctx_id, pos, layer, neuron, start)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = token_importance(self.model, tokens, pos, layer, neuron, self.mask_token, start)
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return value
