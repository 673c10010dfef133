"""The sentence encoder against direct encoder passes: encoder tokens given to run tokens by their characters, and
sentence-transformers' mean pooling."""

from __future__ import annotations

import numpy as np
import pytest

from ne.models.sentence import SentenceEncoder
from ne.models.tokenizers import decode_each, gpt2_tokenizer


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


@pytest.mark.parametrize("piece", [128, 5])
def test_states_give_each_encoder_token_to_the_run_token_that_holds_it(encoder, piece):
    """GPT-2 BPE run tokens against MiniLM's WordPiece: a naive reference runs the encoder on each piece's text and
    gives every encoder token to the run token whose characters contain its first character."""
    import torch

    tok = gpt2_tokenizer()
    text = "The Python interpreter's garbage collector frees unreachable objects; weakref callbacks run first."
    ids = tok(text)["input_ids"]
    pieces = decode_each(tok, ids)
    [(sums, counts)] = encoder.states([pieces], piece=piece)
    want_sums, want_counts = np.zeros_like(sums), np.zeros_like(counts)
    for lo in range(0, len(ids), piece):
        chunk = pieces[lo : lo + piece]
        batch = encoder.tokenizer("".join(chunk), return_offsets_mapping=True, return_tensors="pt")
        offsets = batch.pop("offset_mapping")[0].tolist()
        with torch.inference_mode():
            hidden = encoder.model(**batch).last_hidden_state[0].numpy()
        spans, at = [], 0
        for p in chunk:
            spans.append((at, at + len(p)))
            at += len(p)
        for (start, end), state in zip(offsets, hidden):
            if start == end == 0:  # [CLS], [SEP]
                continue
            owner = next(i for i, (a, b) in enumerate(spans) if a <= start < b)
            want_sums[lo + owner] += state
            want_counts[lo + owner] += 1
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_allclose(sums, want_sums, atol=2e-4)
    assert counts.sum() > len(ids) * 0.8  # most of the text reached the encoder


def test_encode_is_sentence_transformers_mean_pooling(encoder):
    """A text's embedding: the mean of every token's state, [CLS] and [SEP] included, L2-normalised."""
    import torch

    texts = ["a short one", "and a somewhat longer sentence about lists"]
    got = encoder.encode(texts, batch_size=1)
    for text, row in zip(texts, got):
        batch = encoder.tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            mean = encoder.model(**batch).last_hidden_state[0].mean(0).numpy()
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-5)
