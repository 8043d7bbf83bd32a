"""Constrained decoding in the engine: each constrained sequence has an llguidance matcher over this model's
tokenizer, which says before every draw which tokens may come next (a bitmask the sampler applies to its
row) and takes every token drawn. The grammar itself was checked and compiled by common/structured.py."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import llguidance
import numpy as np
import torch


class GrammarMatchers:
    """Makes matchers for one model; the tokenizer is read once (it is shared by every matcher)."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        tokenizer_json = (Path(model_dir) / "tokenizer.json").read_text()
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))

    def matcher(self, grammar: str, consumed: list[int]) -> llguidance.LLMatcher:
        """A matcher at the state after `consumed` (a resumed sequence's tokens); ValueError if either is bad."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if consumed:
            matcher.consume_tokens(consumed)
        if matcher.is_error():
            raise ValueError(f"the grammar cannot be followed: {matcher.get_error()[:300]}")
        return matcher


def allowed_tokens(matchers: list[llguidance.LLMatcher], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(matchers), vocab_size] bool: what each matcher allows next (the end-of-sequence token once its
    grammar is complete)."""
    words = (vocab_size + 31) // 32
    bitmask = np.zeros((len(matchers), words), dtype=np.int32)
    for row, matcher in enumerate(matchers):
        matcher.unsafe_compute_mask_ptr(bitmask[row].ctypes.data, words * 4)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits.astype(np.bool_)).to(device)
