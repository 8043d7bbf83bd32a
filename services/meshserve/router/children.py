"""Sub-requests grouped by their parent (TokenRequest.parent_id), so a fan-out shows in the router's Stats.

A parent is tracked while any child runs on a worker; once none does it moves to a short list of
recently finished parents (bounded, oldest dropped first), so a fan-out can be inspected after it ends.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

RECENT_PARENTS = 64


@dataclass
class ParentChildren:
    parent_id: str
    priority: int
    tenant: str
    client_request_id: str = ""  # the caller's own id for it, as a label
    running_on: Counter[str] = field(default_factory=Counter)  # worker address -> children running there
    dispatched: int = 0
    finished: int = 0
    peak_in_flight: int = 0
    peak_workers: int = 0

    @property
    def in_flight(self) -> int:
        return sum(self.running_on.values())


class ChildrenTracker:
    def __init__(self, recent: int = RECENT_PARENTS) -> None:
        self.recent = recent
        self._active: dict[str, ParentChildren] = {}
        # Parents that come back (a later map-reduce phase) are revived from here, keeping their totals.
        self._finished: OrderedDict[str, ParentChildren] = OrderedDict()

    def started(self, parent_id: str, worker: str, priority: int, tenant: str, client_request_id: str = "") -> None:
        parent = self._active.get(parent_id) or self._finished.pop(parent_id, None)
        if parent is None:
            parent = ParentChildren(parent_id, priority, tenant, client_request_id)
        self._active[parent_id] = parent
        parent.running_on[worker] += 1
        parent.dispatched += 1
        parent.peak_in_flight = max(parent.peak_in_flight, parent.in_flight)
        parent.peak_workers = max(parent.peak_workers, len(parent.running_on))

    def finished(self, parent_id: str, worker: str) -> None:
        parent = self._active[parent_id]
        assert parent.running_on[worker] > 0, f"{parent_id} has no child running on {worker}"
        parent.running_on[worker] -= 1
        if not parent.running_on[worker]:
            del parent.running_on[worker]
        parent.finished += 1
        if not parent.running_on:
            del self._active[parent_id]
            self._finished[parent_id] = parent
            while len(self._finished) > self.recent:
                self._finished.popitem(last=False)

    def parents(self) -> list[ParentChildren]:
        """Active parents, then the finished ones, most recent first."""
        return [*self._active.values(), *reversed(self._finished.values())]
