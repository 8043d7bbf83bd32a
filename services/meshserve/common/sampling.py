"""Range checks of sampling parameters, shared by the gateway (public input) and the worker (trusts no caller)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from meshserve.common.structured import grammar_of, kind_of
from meshserve.v1 import common_pb2

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20

Violation = tuple[str, str]


def token_id_violations(field: str, ids: Sequence[int], vocab_size: int) -> list[Violation]:
    if not ids:
        return [(field, "must hold at least one token id")]
    if max(ids) >= vocab_size:
        return [(field, f"ids must be below the vocabulary size {vocab_size}")]
    return []


def sampling_violations(
    sampling: common_pb2.SamplingParams, prompt_tokens: int, context_length: int, vocab_size: int
) -> list[Violation]:
    """Every out-of-range field of `sampling` for a prompt of prompt_tokens (max_tokens only when set;
    min_tokens against max_tokens when set, else against the context). The booleans need no check: unset
    skip_special_tokens and spaces_between_special_tokens mean true."""
    violations: list[Violation] = []
    room = context_length - prompt_tokens
    # A prompt that leaves no room is the prompt's violation (each caller reports it), not max_tokens'.
    if sampling.HasField("max_tokens") and (sampling.max_tokens < 1 or 1 <= room < sampling.max_tokens):
        violations.append(
            (
                "sampling.max_tokens",
                f"must be between 1 and {max(room, 1)} (the model's context of {context_length} tokens "
                f"minus {prompt_tokens} prompt tokens), got {sampling.max_tokens}",
            )
        )
    if sampling.HasField("max_tokens") and sampling.min_tokens > sampling.max_tokens:
        why = f"must be at most sampling.max_tokens ({sampling.max_tokens}), got {sampling.min_tokens}"
        violations.append(("sampling.min_tokens", why))
    elif sampling.min_tokens > max(room, 1):
        violations.append(
            (
                "sampling.min_tokens",
                f"must be at most {max(room, 1)} (the model's context of {context_length} tokens "
                f"minus {prompt_tokens} prompt tokens), got {sampling.min_tokens}",
            )
        )
    if sampling.HasField("temperature") and not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        violations.append(("sampling.temperature", f"must be 0 (greedy) or more, got {sampling.temperature}"))
    if sampling.HasField("top_p") and not (0 < sampling.top_p <= 1):
        violations.append(("sampling.top_p", f"must be in (0, 1], got {sampling.top_p}"))
    if sampling.top_k > vocab_size:
        violations.append(("sampling.top_k", f"must be between 0 (off) and {vocab_size}"))
    if not (math.isfinite(sampling.min_p) and 0 <= sampling.min_p <= 1):
        violations.append(("sampling.min_p", f"must be in [0, 1] (0 = off), got {sampling.min_p}"))
    if sampling.HasField("repetition_penalty") and not (
        math.isfinite(sampling.repetition_penalty) and 0 < sampling.repetition_penalty <= 10
    ):
        violations.append(
            ("sampling.repetition_penalty", f"must be in (0, 10] (1 = off), got {sampling.repetition_penalty}")
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(sampling, name)
        if not (math.isfinite(value) and -2 <= value <= 2):
            violations.append((f"sampling.{name}", f"must be in [-2, 2] (0 = off), got {value}"))
    if sampling.top_logprobs > MAX_TOP_LOGPROBS:
        violations.append(("sampling.top_logprobs", f"must be at most {MAX_TOP_LOGPROBS}"))
    elif sampling.top_logprobs and not sampling.logprobs:
        violations.append(("sampling.top_logprobs", "needs sampling.logprobs set"))
    if len(sampling.stop) > MAX_STOP_STRINGS:
        violations.append(("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings"))
    else:
        for i, stop in enumerate(sampling.stop):
            if not 1 <= len(stop) <= MAX_STOP_LENGTH:
                violations.append((f"sampling.stop[{i}]", f"must be 1 to {MAX_STOP_LENGTH} characters"))
    if len(sampling.stop_token_ids) > vocab_size:  # counted before any is looked at
        violations.append(("sampling.stop_token_ids", f"at most {vocab_size} ids, one per token of the vocabulary"))
    else:
        for i, token_id in enumerate(sampling.stop_token_ids):
            if token_id >= vocab_size:
                violations.append((f"sampling.stop_token_ids[{i}]", f"must be below {vocab_size}"))
    if sampling.HasField("structured"):
        try:
            grammar_of(sampling.structured)
        except ValueError as exc:
            violations.append((f"sampling.structured.{kind_of(sampling.structured) or 'kind'}", str(exc)))
    return violations


def max_tokens_or_default(sampling: common_pb2.SamplingParams, default: int, room: int) -> int:
    """sampling.max_tokens when set; otherwise `default`, raised to min_tokens, within the `room` the context
    leaves (at least 1), so that a request asking only for min_tokens gets them."""
    if sampling.HasField("max_tokens"):
        return sampling.max_tokens
    return max(1, min(max(default, sampling.min_tokens), room))
