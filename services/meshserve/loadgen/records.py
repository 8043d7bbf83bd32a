"""One request's record: its status and what its stream's timing says (TTFT, inter-token latencies, end to end).

Inter-token latencies are per token, tokens - 1 of them: a message that brings k tokens, g seconds after the
previous message, counts as k gaps of g / k (a hop that batches tokens into fewer messages does not look
faster per token than it is), and the tokens that come with the first token count as gaps of 0. Their sum is
the time from the first token to the last, so their mean is the TPOT. A stream's longest wait between two
messages is the stall it saw (the soak's measure of a failover).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from meshserve.loadgen.target import OK, Chunk, Reply
from meshserve.loadgen.workload import RequestSpec


@dataclass
class RequestRecord:
    request: RequestSpec
    status: str  # OK, a gRPC status name (UNAVAILABLE, ...), "HTTP 503", CONNECTION_ERROR, TIMEOUT, ...
    error: str
    sent_at: float  # seconds from the level's start to sending
    e2e: float  # seconds from sending to the end of the stream (or the failure)
    ttft: float | None  # seconds from sending to the first token; None when none came
    itl: list[float] = field(default_factory=list)  # seconds: tokens - 1 inter-token latencies
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as the server counted them
    token_ids: list[int] | None = None  # the output's ids, when the API returns them (gRPC does)
    text: str = ""
    finish_reason: str = ""
    retry_delay: float | None = None  # seconds: when the server said to retry (RetryInfo, Retry-After)
    longest_gap: float | None = None  # seconds: the longest wait between two messages with output (a stall)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        return sum(self.itl) / len(self.itl) if self.itl else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def record_of(request: RequestSpec, reply: Reply, level_start: float) -> RequestRecord:
    counts = tokens_per_chunk(reply.chunks, reply.completion_tokens)
    # What arrived, when the API says; else what the server's usage says; else one token per event.
    if reply.token_ids is not None:
        output_tokens = len(reply.token_ids)
    else:
        output_tokens = reply.completion_tokens if reply.completion_tokens is not None else sum(counts)
    return RequestRecord(
        request=request,
        status=reply.status,
        error=reply.error,
        sent_at=reply.sent_at - level_start,
        e2e=reply.ended_at - reply.sent_at,
        ttft=reply.chunks[0].at - reply.sent_at if reply.chunks else None,
        itl=inter_token_latencies([c.at for c in reply.chunks], counts),
        output_tokens=output_tokens,
        prompt_tokens=reply.prompt_tokens,
        token_ids=reply.token_ids,
        text="".join(c.text for c in reply.chunks),
        finish_reason=reply.finish_reason,
        retry_delay=reply.retry_delay,
        longest_gap=max((b.at - a.at for a, b in itertools.pairwise(reply.chunks)), default=None),
    )


def inter_token_latencies(arrivals: list[float], counts: list[int]) -> list[float]:
    gaps: list[float] = []
    for i, (at, count) in enumerate(zip(arrivals, counts, strict=True)):
        if i == 0:
            gaps += [0.0] * (count - 1)
        else:
            gaps += [(at - arrivals[i - 1]) / count] * count
    return gaps


def tokens_per_chunk(chunks: list[Chunk], total: int | None) -> list[int]:
    """The tokens of each chunk: as it says, else estimated. Chunks that do not say share what the usage's
    `total` leaves for them in proportion to their text, at least one each (largest remainders round)."""
    known = sum(c.tokens for c in chunks if c.tokens is not None)
    unknown = [i for i, c in enumerate(chunks) if c.tokens is None]
    counts = [c.tokens if c.tokens is not None else 1 for c in chunks]
    extra = (total or 0) - known - len(unknown)
    if not unknown or extra <= 0:
        return counts
    weights = [max(1, len(chunks[i].text)) for i in unknown]
    shares = [extra * w / sum(weights) for w in weights]
    whole = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(unknown)), key=lambda j: whole[j] - shares[j])
    for j in by_remainder[: extra - sum(whole)]:
        whole[j] += 1
    for j, i in enumerate(unknown):
        counts[i] += whole[j]
    return counts
