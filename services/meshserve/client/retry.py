"""When a failed call is tried again: which codes, how many times, how long to wait first."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import grpc

from meshserve.client.errors import MeshClientError

log = logging.getLogger("meshserve.client")

# The mesh says these mean "try again": no worker or router could take the call, or a limit (the tenant's
# rate, the router's queue) refused it for now, usually with a RetryInfo saying when.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: before attempt k + 1 wait a random time in
    [0, min(max_backoff, initial_backoff * multiplier ** (k - 1))]; when the server's error carries a
    google.rpc.RetryInfo, wait that long instead (plus up to `retry_info_jitter` of it, so callers refused
    together do not return together). Never past the call's deadline, at most `max_attempts` calls, and
    never a stream that has produced tokens."""

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    retry_info_jitter: float = 0.2
    retryable_codes: frozenset[grpc.StatusCode] = field(default=RETRYABLE_CODES)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1 or self.retry_info_jitter < 0:
            raise ValueError("backoffs and jitter must be >= 0 and the multiplier >= 1")

    def delay(self, error: MeshClientError, deadline: float | None) -> float | None:
        """Seconds to wait before trying again after `error` (its .attempts calls made so far), or None:
        raise it. `deadline` is time.monotonic()'s at which the caller's time is up (None: no deadline)."""
        if error.code not in self.retryable_codes or error.tokens_received or error.attempts >= self.max_attempts:
            return None
        server_delay = error.retry_after
        if server_delay is not None:
            wait = server_delay * (1 + random.uniform(0, self.retry_info_jitter))
        else:
            backoff = self.initial_backoff * self.multiplier ** (error.attempts - 1)
            wait = random.uniform(0, min(self.max_backoff, backoff))
        if deadline is not None and time.monotonic() + wait >= deadline:
            return None  # no time left for another attempt: the caller hears the error now, not at its deadline
        log.info(
            "%s: %s; retrying in %.2f s (attempt %d of %d)",
            error.code.name,
            error.message,
            wait,
            error.attempts + 1,
            self.max_attempts,
            extra={"retry_code": error.code.name, "retry_delay_s": wait, "retry_after_s": server_delay},
        )
        return wait


NO_RETRIES = RetryPolicy(max_attempts=1)


class Attempts:
    """The attempts of one call under one deadline: `start()` before each (the timeout it gets: what is left),
    `failed(exc)` after a failure (the seconds to wait before the next, or raises the MeshClientError)."""

    def __init__(self, policy: RetryPolicy, timeout: float | None) -> None:
        self.policy = policy
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.made = 0

    def start(self) -> float | None:
        self.made += 1
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def failed(self, exc: grpc.RpcError, tokens_received: int = 0, delivered: bool = False) -> float:
        """`delivered`: the caller already has some of this call's answer (a stream's chunks): never retried."""
        error = MeshClientError.of_rpc_error(
            exc, attempts=self.made, tokens_received=tokens_received, timeout=self.timeout
        )
        wait = None if delivered else self.policy.delay(error, self.deadline)
        if wait is None:
            raise error from None
        return wait
