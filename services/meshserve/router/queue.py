"""The router's waiting room: one queue per priority class, an order that cannot starve, bounded admission.

Order (best first), recomputed at every dispatch:
1. Level: the class (CRITICAL 1 .. BATCH 5), raised one level per `aging_seconds` waited, so a
   request of class c competes as CRITICAL after at most (c - 1) * aging_seconds.
2. Tenant fair share inside a level: the tenant that has been served the least cost in that
   class goes first (start-time fair queuing: a tenant that comes back after idling starts at
   the least-served active tenant, not at its old deficit).
3. Weighted shortest job first inside a tenant: cost / (1 + wait / aging_seconds), cost being
   prompt tokens + expected output tokens, so short jobs go first and long ones still age in.
4. Arrival.

Admission: at most `max_queued` requests wait. When full, an arrival evicts the newest queued request of
a strictly lower class among BATCH then LOW; failing that, if its tenant holds less than `tenant_share` of
the queue, the newest request of the tenant most over its share (so one tenant may fill the queue while
nobody else needs it, but cannot get other tenants' arrivals, CRITICAL ones included, refused); else it is
itself refused. A tenant's requests within its share are never evicted for another's.

Time comes from the queue's `clock` (time.monotonic unless a test gives another), the clock the
requests' `enqueued_at` is read on.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from meshserve.common.enums import PRIORITY_CLASSES, priority_name, served_priority
from meshserve.common.errors import MeshError, resource_exhausted
from meshserve.v1 import common_pb2

SHEDDABLE = (common_pb2.PRIORITY_BATCH, common_pb2.PRIORITY_LOW)  # evicted in this order
DEFAULT_EXPECTED_OUTPUT = 256  # tokens, when a request does not say max_tokens
SHED_RETRY_AFTER_S = 1.0

_arrivals = itertools.count()


def class_name(priority: int) -> str:
    """CRITICAL ... BATCH, as queue messages name a class."""
    return priority_name(priority).upper()


@dataclass(eq=False)
class Pending:
    request: common_pb2.TokenRequest
    priority: int
    tenant: str
    cost: int
    enqueued_at: float = field(default_factory=time.monotonic)
    arrival: int = field(default_factory=lambda: next(_arrivals))
    # Resolved with the chosen worker, or with the error that ended the wait (shed).
    assigned: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # What the TTFT model predicted on arrival (router/ttft_model.py), when it came out of the queue, and how
    # many tokens have been relayed to the caller since.
    prediction: Any = None
    dispatched_at: float | None = None
    relayed: int = 0

    @property
    def fair_key(self) -> tuple[int, str]:
        return (self.priority, self.tenant)

    @classmethod
    def of(cls, request: common_pb2.TokenRequest, enqueued_at: float | None = None) -> Pending:
        """The request as it waits, since `enqueued_at` on the queue's clock (default: now on time.monotonic)."""
        priority = served_priority(request.priority)
        expected = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else DEFAULT_EXPECTED_OUTPUT
        pending = cls(request, priority, request.tenant, len(request.prompt_token_ids) + expected)
        if enqueued_at is not None:
            pending.enqueued_at = enqueued_at
        return pending


class RequestQueue:
    def __init__(
        self,
        max_queued: int,
        aging_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        tenant_share: float = 1.0,
    ) -> None:
        if max_queued < 1 or aging_seconds <= 0:
            raise ValueError("max_queued must be at least 1 and aging_seconds more than 0")
        if not 0 < tenant_share <= 1:
            raise ValueError(f"tenant_share must be above 0 and at most 1, not {tenant_share}")
        self.max_queued = max_queued
        self.tenant_max_queued = max(1, int(max_queued * tenant_share))
        self.aging_seconds = aging_seconds
        self.clock = clock
        self._pending: list[Pending] = []
        self._served: dict[tuple[int, str], float] = defaultdict(float)  # cost dispatched per (class, tenant)
        self.shed_by_priority: dict[int, int] = defaultdict(int)

    @property
    def shed(self) -> int:
        return sum(self.shed_by_priority.values())

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, pending: Pending) -> None:
        """Queues pending, evicting a lower-class request, or one of a tenant over its share, if the queue
        is full; refuses it if it cannot."""
        if len(self._pending) >= self.max_queued:
            victim = self._eviction_victim(pending.priority)
            why = f"a {class_name(pending.priority)} request took its place"
            if victim is None:
                victim = self._over_share_victim(pending.tenant)
                why = f"its tenant is over its share of the queue ({self.tenant_max_queued} of {self.max_queued})"
            if victim is None:
                self.shed_by_priority[pending.priority] += 1
                raise self._shed_error(pending.priority, "the router's queue is full")
            self.remove(victim)
            self.shed_by_priority[victim.priority] += 1
            victim.assigned.set_exception(self._shed_error(victim.priority, why))
        self._join_fairly(pending)
        self._pending.append(pending)

    def remove(self, pending: Pending) -> None:
        if pending in self._pending:
            self._pending.remove(pending)

    def best(
        self, skip_models: set[str], now: float | None = None, classes: tuple[int, ...] | None = None
    ) -> Pending | None:
        """The first request in the order above (as of `now`, default the clock's now) whose model is not in
        skip_models, of the given classes only if set (one pass, no sort)."""
        now = self.clock() if now is None else now
        candidates = self._pending
        if skip_models or classes:
            candidates = [
                p
                for p in candidates
                if p.request.model not in skip_models and (classes is None or p.priority in classes)
            ]
        return min(candidates, key=lambda p: self._rank(p, now), default=None)

    def ahead_of(self, pending: Pending, now: float | None = None) -> Iterator[Pending]:
        """The queued requests of pending's model that go before it in the order above, as of `now`. Lazy: a
        pass over the whole queue per arrival is paid only by a caller that reads it."""
        now = self.clock() if now is None else now
        rank = self._rank(pending, now)
        model = pending.request.model
        return (p for p in self._pending if (not model or p.request.model == model) and self._rank(p, now) < rank)

    def dispatched(self, pending: Pending) -> None:
        self.remove(pending)
        self._served[pending.fair_key] += pending.cost

    def stats(self, now: float | None = None) -> dict[int, tuple[int, float]]:
        """Per class: (queued, oldest wait in seconds)."""
        now = self.clock() if now is None else now
        out = {c: (0, 0.0) for c in PRIORITY_CLASSES}
        for p in self._pending:
            count, oldest = out[p.priority]
            out[p.priority] = (count + 1, max(oldest, now - p.enqueued_at))
        return out

    def _rank(self, pending: Pending, now: float) -> tuple[int, float, float, int]:
        aged = (now - pending.enqueued_at) / self.aging_seconds
        level = pending.priority - int(aged)
        return (
            level if level > PRIORITY_CLASSES[0] else PRIORITY_CLASSES[0],
            self._served[pending.fair_key],
            pending.cost / (1 + aged),
            pending.arrival,
        )

    def _join_fairly(self, pending: Pending) -> None:
        """A tenant that becomes active starts at the least-served active tenant of its class."""
        active = {p.tenant for p in self._pending if p.priority == pending.priority}
        if active and pending.tenant not in active:
            floor = min(self._served[(pending.priority, tenant)] for tenant in active)
            self._served[pending.fair_key] = max(self._served[pending.fair_key], floor)

    def _eviction_victim(self, priority: int) -> Pending | None:
        for sheddable in SHEDDABLE:
            if sheddable <= priority:
                continue
            newest = [p for p in self._pending if p.priority == sheddable]
            if newest:
                return max(newest, key=lambda p: p.arrival)
        return None

    def _over_share_victim(self, tenant: str) -> Pending | None:
        """When the queue is full: the newest request of the tenant most over its share, if the arrival's own
        tenant is within its share (one tenant may use the whole queue only while nobody else needs it)."""
        if self.tenant_max_queued >= self.max_queued:
            return None
        waiting = collections.Counter(p.tenant for p in self._pending)
        if waiting[tenant] >= self.tenant_max_queued:
            return None
        hog, count = waiting.most_common(1)[0]
        if count <= self.tenant_max_queued:
            return None
        return max((p for p in self._pending if p.tenant == hog), key=lambda p: p.arrival)

    def _shed_error(self, priority: int, why: str) -> MeshError:
        return resource_exhausted(
            f"{class_name(priority)} request shed: {why} ({self.max_queued} waiting); retry later",
            retry_after_seconds=SHED_RETRY_AFTER_S,
        )
