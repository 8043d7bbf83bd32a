"""Held candidates: gathered whole, scored by mean log-probability, deduped, the best chosen.

The score is the mean of the chosen tokens' log-probabilities (under the model's raw distribution,
as the worker reports them), so long and short completions compare fairly; a completion without
tokens scores lowest. Ties keep candidate order, so the choice is deterministic for fixed seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from meshserve.common.errors import MeshError
from meshserve.v1 import common_pb2


@dataclass
class Candidate:
    number: int
    token_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    usage: common_pb2.Usage | None = None
    error: MeshError | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED or self.error is not None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def mean_logprob(self) -> float:
        if not self.logprobs:
            return -math.inf
        return sum(lp.logprob for lp in self.logprobs) / len(self.logprobs)

    def add(self, chunk: common_pb2.StreamChunk) -> None:
        assert not self.done, f"candidate {self.number} got tokens after it ended"
        self.token_ids.extend(chunk.token_ids)
        self.texts.append(chunk.text)
        self.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
            self.usage = chunk.usage

    def fail(self, error: MeshError) -> None:
        self.error = error


def choose(candidates: list[Candidate], n: int, dedupe: bool) -> list[Candidate]:
    """The n best finished candidates, best first; with dedupe, a repeat of a better one is skipped."""
    finished = sorted((c for c in candidates if c.error is None), key=lambda c: (-c.mean_logprob, c.number))
    chosen: list[Candidate] = []
    seen: set[tuple[int, ...]] = set()
    for candidate in finished:
        key = tuple(candidate.token_ids)
        if dedupe and key in seen:
            continue
        seen.add(key)
        chosen.append(candidate)
        if len(chosen) == n:
            break
    return chosen
