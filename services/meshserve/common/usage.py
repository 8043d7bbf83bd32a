"""A request's token usage (common_pb2.Usage), counted the same way by the worker, the aggregator and the gateway."""

from __future__ import annotations

from collections.abc import Iterable

from meshserve.v1 import common_pb2


def token_usage(prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int = 0) -> common_pb2.Usage:
    """One sequence's (or a whole fan-out's) usage; total_tokens is always the sum of the other two."""
    return common_pb2.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        cached_prompt_tokens=cached_prompt_tokens,
    )


def outputs_usage(prompt_tokens: int, per_output: Iterable[common_pb2.Usage]) -> common_pb2.Usage:
    """Several outputs of one prompt: the prompt counted once, the completions of every output, and the
    cached prompt tokens of the luckiest output (each ran on its own and may have hit the cache or not)."""
    outputs = list(per_output)
    return token_usage(
        prompt_tokens,
        sum(u.completion_tokens for u in outputs),
        max((u.cached_prompt_tokens for u in outputs), default=0),
    )
