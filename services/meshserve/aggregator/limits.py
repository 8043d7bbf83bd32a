"""Bounds on fan-out: sub-requests per request, and sub-requests one tenant has running at once.

A request reserves its width (the most sub-requests it runs at once) for its whole life; a tenant
whose running requests would then exceed its share is told to retry later, so one tenant's fan-outs
cannot fill every worker. Requests without a tenant share one budget.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from meshserve.common.errors import invalid_argument, resource_exhausted

RETRY_AFTER_S = 1.0


def check_width(field: str, width: int, limit: int, what: str) -> None:
    """INVALID_ARGUMENT naming `field` when a request would fan out into more than `limit` sub-requests."""
    if width > limit:
        raise invalid_argument([(field, f"{what} make {width} sub-requests; at most {limit} are allowed per request")])


class TenantLimiter:
    def __init__(self, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"the per-tenant sub-request limit must be at least 1, not {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.in_flight: Counter[str] = Counter()

    @contextmanager
    def reserve(self, tenant: str, width: int) -> Iterator[None]:
        """Holds `width` of the tenant's sub-request budget while the block runs."""
        running = self.in_flight[tenant]
        if running + width > self.max_in_flight:
            who = f"tenant {tenant!r}" if tenant else "requests without a tenant"
            raise resource_exhausted(
                f"{who} already have {running} sub-requests running; this request needs {width} more and the "
                f"limit is {self.max_in_flight} at once; retry later",
                retry_after_seconds=RETRY_AFTER_S,
            )
        self.in_flight[tenant] += width
        try:
            yield
        finally:
            self.in_flight[tenant] -= width
            if not self.in_flight[tenant]:
                del self.in_flight[tenant]
