"""Holding lower classes back so that a class with a latency objective keeps it, and shedding when that is not enough.

Each class with a TTFT target has a pressure: the larger of its recent p90 time to first token and its
oldest queued request's wait, over the target. From `APPROACH` of the target on, every lower class is
held back at dispatch: each worker keeps some seats free of it (one at first, up to `MAX_HELD_SHARE` of
its seats at the target), so the urgent class finds a seat without waiting for a preemption and runs in
a smaller, faster batch. Lower classes always keep the other seats, so they never stop.

Only when the objective stays missed (pressure at or above 1) for `SHED_AFTER_S` with the most seats
held does admission shed: new BATCH and LOW requests are refused with RESOURCE_EXHAUSTED and a
RetryInfo. NORMAL and above are never shed for an objective.

Time comes from `clock` (time.monotonic unless a test gives another); the queue's waits are given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from meshserve.common.enums import priority_name
from meshserve.common.errors import MeshError, resource_exhausted
from meshserve.common.objectives import RecentLatencies
from meshserve.router.queue import SHEDDABLE, class_name

APPROACH = 0.5  # a class at this share of its target starts holding lower classes back
MAX_HELD_SHARE = 0.25  # the most of a worker's seats kept free of lower classes (they keep the rest)
RECENT_QUANTILE = 0.9
SHED_AFTER_S = 1.0  # missed this long with the most seats held: holding back is not enough
OBJECTIVE_RETRY_AFTER_S = 1.0
REFRESH_S = 0.02  # pressures are recomputed at most this often (dispatch runs far more often)


class HoldBack:
    def __init__(
        self, objectives: dict[int, float], recent: RecentLatencies, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.objectives = objectives
        self.recent = recent
        self.clock = clock
        self.pressure: dict[int, float] = dict.fromkeys(objectives, 0.0)
        self._missed_since: dict[int, float | None] = dict.fromkeys(objectives, None)
        self._refreshed = -math.inf
        self.shed_by_priority: dict[int, int] = {}

    def update(self, oldest_wait: Callable[[], dict[int, float]], force: bool = False) -> None:
        """Recomputes each objective's pressure from its recent TTFTs and `oldest_wait()` (class -> seconds its
        oldest queued request has waited), at most every REFRESH_S unless forced."""
        now = self.clock()
        if not self.objectives or (not force and now - self._refreshed < REFRESH_S):
            return
        self._refreshed = now
        waits = oldest_wait()
        for priority, target in self.objectives.items():
            recent = self.recent.quantile(priority, RECENT_QUANTILE) or 0.0
            pressure = max(recent, waits.get(priority, 0.0)) / target
            self.pressure[priority] = pressure
            if pressure < 1.0:
                self._missed_since[priority] = None
            elif self._missed_since[priority] is None:
                self._missed_since[priority] = now

    def held_share(self, priority: int) -> float:
        """The share of each worker's seats kept free of `priority` for the more urgent classes."""
        above = [p for c, p in self.pressure.items() if c < priority]
        worst = max(above, default=0.0)
        if worst < APPROACH:
            return 0.0
        return MAX_HELD_SHARE * min(1.0, (worst - APPROACH) / (1.0 - APPROACH))

    def held_seats(self, priority: int, max_num_seqs: int) -> int:
        """Seats of a worker with `max_num_seqs` that a `priority` request may not take (at least one as soon as
        anything is held; never all of them)."""
        share = self.held_share(priority)
        if share <= 0.0:
            return 0
        return min(max_num_seqs - 1, max(1, math.ceil(share * max_num_seqs)))

    def shed_error(self, priority: int) -> MeshError | None:
        """The refusal of a BATCH or LOW arrival while a more urgent class has missed its objective for
        SHED_AFTER_S with the most seats held; None when it may queue."""
        if priority not in SHEDDABLE:
            return None
        now = self.clock()
        for urgent, since in self._missed_since.items():
            if urgent < priority and since is not None and now - since >= SHED_AFTER_S:
                self.shed_by_priority[priority] = self.shed_by_priority.get(priority, 0) + 1
                recent = self.recent.quantile(urgent, RECENT_QUANTILE) or 0.0
                return resource_exhausted(
                    f"{class_name(priority)} request shed: {priority_name(urgent)} requests are missing their "
                    f"time-to-first-token objective of {self.objectives[urgent] * 1000:g} ms (recent p90 "
                    f"{recent * 1000:.0f} ms) with lower classes already held back; retry later",
                    retry_after_seconds=OBJECTIVE_RETRY_AFTER_S,
                )
        return None

    @property
    def shed(self) -> int:
        return sum(self.shed_by_priority.values())
