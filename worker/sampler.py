"""Choosing the next token of one sequence from its logits."""

from __future__ import annotations

import os

import torch

from meshserve.worker.sequence import SamplingOptions


def make_generator(seed: int | None) -> torch.Generator:
    """A generator per sequence, so a seeded sequence draws the same numbers whatever it is batched with."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return generator


def sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """logits: [vocab] float. Greedy when temperature is 0, else top-k, then top-p, then a draw."""
    if options.temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits.float() / options.temperature
    if 0 < options.top_k < scores.numel():
        kth_best = torch.topk(scores, options.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if options.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely token always stays.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= options.top_p
        scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
