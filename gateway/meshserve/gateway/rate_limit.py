"""Per-tenant rate limits: token buckets for requests per second and tokens per minute.

The tokens bucket is charged before a request runs with what it may use at most (prompt +
max_tokens for each completion) and settled when it ends with what it used, so a tenant that
asks for long answers and gets short ones is not charged for the difference. Each tenant has
its own buckets: one tenant over its limit never delays another.

Buckets live in one gateway process. With N gateways behind one keys file, each enforces 1/N of every
limit (`replicas`, --gateway-replicas), so together they allow the tenant its limit when its traffic spreads
evenly over them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from meshserve.common.errors import resource_exhausted
from meshserve.gateway.auth import Tenant


class TokenBucket:
    """Holds up to `capacity`, refills at `per_second`. The level may go below zero when a settled
    request used more than it reserved; the debt is repaid by waiting."""

    def __init__(self, per_second: float, capacity: float, now: float) -> None:
        self.per_second = per_second
        self.capacity = capacity
        self.level = capacity
        self._updated = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._updated) * self.per_second)
        self._updated = now

    def take(self, amount: float, now: float) -> float:
        """Takes `amount` (at most the capacity, so a large request fits a full bucket) and returns 0,
        or takes nothing and returns the seconds until it would fit."""
        self._refill(now)
        amount = min(amount, self.capacity)
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.per_second

    def give_back(self, amount: float, now: float) -> None:
        """Returns `amount` (negative: charges more)."""
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


@dataclass
class Reservation:
    """Tokens charged for one request; `settle` corrects the charge to what the request used."""

    bucket: TokenBucket | None
    reserved: float
    clock: Callable[[], float]

    def settle(self, used: float) -> None:
        if self.bucket is not None:
            self.bucket.give_back(self.reserved - used, self.clock())
            self.bucket = None


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic, replicas: int = 1) -> None:
        if replicas < 1:
            raise ValueError(f"the gateway replicas sharing the limits must be at least 1, not {replicas}")
        self.clock = clock
        self.replicas = replicas
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def admit(self, tenant: Tenant) -> None:
        """Counts one request; RESOURCE_EXHAUSTED with RetryInfo when the tenant is over requests_per_second."""
        if not tenant.requests_per_second:
            return
        limit = tenant.requests_per_second / self.replicas
        # A burst of one second's requests (at least one) is allowed.
        bucket = self._bucket(self._requests, tenant.name, limit, max(1.0, limit))
        wait = bucket.take(1, self.clock())
        if wait:
            raise resource_exhausted(
                f"tenant {tenant.name!r} is over its limit of {limit:g} requests per second{self._share}; "
                f"retry in {wait:.2f} s",
                wait,
            )

    def reserve(self, tenant: Tenant, tokens: int) -> Reservation:
        """Charges up to `tokens`; RESOURCE_EXHAUSTED with RetryInfo when the tenant is over tokens_per_minute."""
        if not tenant.tokens_per_minute:
            return Reservation(None, 0, self.clock)
        limit = tenant.tokens_per_minute / self.replicas
        bucket = self._bucket(self._tokens, tenant.name, limit / 60, limit)
        wait = bucket.take(tokens, self.clock())
        if wait:
            raise resource_exhausted(
                f"tenant {tenant.name!r} is over its limit of {limit:g} tokens per minute{self._share} "
                f"(this request may use {tokens}: prompt + max_tokens for each completion); retry in {wait:.2f} s",
                wait,
            )
        return Reservation(bucket, min(tokens, bucket.capacity), self.clock)

    @property
    def _share(self) -> str:
        return f" (its share on this gateway, one of {self.replicas})" if self.replicas > 1 else ""

    def _bucket(self, buckets: dict[str, TokenBucket], name: str, per_second: float, capacity: float) -> TokenBucket:
        bucket = buckets.get(name)
        # A reloaded keys file may change a tenant's limits: start its bucket afresh.
        if bucket is None or (bucket.per_second, bucket.capacity) != (per_second, capacity):
            bucket = buckets[name] = TokenBucket(per_second, capacity, self.clock())
        return bucket
