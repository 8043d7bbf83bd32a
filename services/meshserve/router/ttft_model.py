"""A request's time to first token, predicted on arrival from the router's live queue and the workers' step times.

TTFT = the wait for a seat + its prefill + the hops in between (event loops of gateway, router, worker):
- Seats: each worker of the model has `limit` seats for the request's class (max_num_seqs, plus the overflow
  of CRITICAL and HIGH, less what is held back for more urgent classes), `busy` of them taken. A taken seat
  frees when its sequence ends: one of this router's after its remaining tokens (expected output less the
  tokens relayed) at that worker's step time; another router's after the mean of ours.
- The queue: the requests that rank ahead of it (queue.py's order) take seats first, each for its service
  (prefill steps + expected output tokens, at the step time), in the order seats free (list scheduling).
- Its prefill: ceil(prompt / max_num_batched_tokens) steps; the last one samples its first token.
- Learned from what came, as moving averages: the share of max_tokens that requests generate (many stop at
  EOS), and the hop time that queue and steps do not explain.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass

from meshserve.router.queue import DEFAULT_EXPECTED_OUTPUT, Pending

MAX_SIMULATED = 1024  # requests ahead placed one by one; beyond, their work is spread over every seat
LEARNING_RATE = 0.1


@dataclass(frozen=True)
class SeatView:
    """One worker as a request of some class sees it."""

    limit: int  # seats the class may use
    busy: int
    step_seconds: float  # 0: not known yet
    max_num_batched_tokens: int
    ours: list[Pending]  # this router's requests on it


@dataclass(frozen=True)
class Prediction:
    seconds: float
    queue_seconds: float
    prefill_seconds: float
    ahead: int
    seats_free: int
    step_seconds: float

    def describe(self) -> str:
        return (
            f"{self.seconds:.3f} s ({self.ahead} requests ahead of it, {self.seats_free} seats free: "
            f"{self.queue_seconds:.3f} s queued, then {self.prefill_seconds:.3f} s of prefill at "
            f"{self.step_seconds * 1000:.1f} ms engine steps)"
        )


def expected_output(pending: Pending) -> int:
    sampling = pending.request.sampling
    return sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_EXPECTED_OUTPUT


class TtftModel:
    def __init__(self) -> None:
        self.output_share = 1.0  # tokens generated / max_tokens, learned
        self.hop_seconds = 0.0  # TTFT beyond the queue wait and the prefill steps, learned

    def prefill_steps(self, pending: Pending, max_num_batched_tokens: int) -> int:
        return max(1, math.ceil(len(pending.request.prompt_token_ids) / max(1, max_num_batched_tokens)))

    def service_seconds(self, pending: Pending, step: float, max_num_batched_tokens: int) -> float:
        outputs = max(1.0, expected_output(pending) * self.output_share)
        return (self.prefill_steps(pending, max_num_batched_tokens) + outputs - 1) * step

    def remaining_seconds(self, pending: Pending, step: float, max_num_batched_tokens: int) -> float:
        if pending.relayed == 0:
            return self.service_seconds(pending, step, max_num_batched_tokens)
        return max(1.0, expected_output(pending) * self.output_share - pending.relayed) * step

    def predict(self, pending: Pending, ahead: Iterable[Pending], workers: list[SeatView]) -> Prediction | None:
        """None when nothing is known yet (no worker, or none has stepped): nobody is refused on a guess."""
        known = [w.step_seconds for w in workers if w.step_seconds > 0]
        if not known:
            return None
        typical = sum(known) / len(known)
        ready: list[tuple[float, float, int]] = []  # (when a seat for this class is free, its step, its budget)
        free = 0
        for worker in workers:
            if worker.limit <= 0:
                continue
            step, budget = worker.step_seconds or typical, worker.max_num_batched_tokens
            ours = [self.remaining_seconds(p, step, budget) for p in worker.ours]
            mean = sum(ours) / len(ours) if ours else self.service_seconds(pending, step, budget)
            releases = sorted(ours + [mean] * max(0, worker.busy - len(ours)))
            free_now = max(0, worker.limit - worker.busy)
            free += free_now
            # Past the limit, the class's first seat frees only after the excess sequences end.
            times = [0.0] * free_now + releases[max(0, worker.busy - worker.limit) :]
            ready += [(t, step, budget) for t in times[: worker.limit]]
        if not ready:
            return None
        heapq.heapify(ready)
        count, spread = 0, 0.0
        for other in ahead:
            count += 1
            when, step, budget = ready[0]
            if count <= MAX_SIMULATED:
                heapq.heapreplace(ready, (when + self.service_seconds(other, step, budget), step, budget))
            else:
                spread += self.service_seconds(other, step, budget)
        when, step, budget = ready[0]
        queue_seconds = when + spread / len(ready)
        prefill = self.prefill_steps(pending, budget) * step
        return Prediction(queue_seconds + prefill + self.hop_seconds, queue_seconds, prefill, count, free, step)

    def observed(self, pending: Pending, ttft: float, queue_wait: float) -> float | None:
        """Learns from a first token; returns the prediction's error (observed - predicted), if there was one."""
        prediction = pending.prediction
        if prediction is None:
            return None
        hop = max(0.0, ttft - queue_wait - prediction.prefill_seconds)
        self.hop_seconds += LEARNING_RATE * (hop - self.hop_seconds)
        return ttft - prediction.seconds

    def finished(self, pending: Pending, generated: int) -> None:
        """Learns how much of max_tokens a request that ended normally used."""
        share = min(1.0, max(0.02, generated / max(1, expected_output(pending))))
        self.output_share += LEARNING_RATE * (share - self.output_share)
