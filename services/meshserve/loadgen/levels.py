"""How hard one level of a benchmark pushes, and for how long.

Closed loop (`concurrency`): that many slots, each sending its next request as soon as its previous one ends,
so the server's speed sets the request rate. Open loop (`rate`): requests arrive as a Poisson process of
that many per second whatever the server does, so a slow server piles up requests in flight.
Either way a level stops sending after `duration` seconds or `requests` requests, whichever comes first, and
then waits for the requests in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadLevel:
    concurrency: int | None = None
    rate: float | None = None  # requests per second
    duration: float | None = None  # seconds of sending
    requests: int | None = None  # requests to send at most

    def __post_init__(self) -> None:
        assert (self.concurrency is None) != (self.rate is None), "a level is a concurrency or a rate"
        assert self.concurrency is None or self.concurrency >= 1, self.concurrency
        assert self.rate is None or (math.isfinite(self.rate) and self.rate > 0), self.rate
        assert self.duration is not None or self.requests is not None, "a level needs a duration or a count"
        assert self.duration is None or self.duration > 0, self.duration
        assert self.requests is None or self.requests >= 1, self.requests

    @property
    def kind(self) -> str:
        return "concurrency" if self.concurrency is not None else "rate"

    @property
    def value(self) -> float:
        """The load on a plot's x axis: streams, or requests per second."""
        return float(self.concurrency if self.concurrency is not None else self.rate)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency is not None else f"rate {self.rate:g}/s"

    def describe(self) -> dict[str, object]:
        return {
            "concurrency": self.concurrency,
            "rate": self.rate,
            "duration": self.duration,
            "requests": self.requests,
        }


def parse_concurrencies(text: str) -> list[int]:
    """`1,4,16`: whole numbers of at least 1; ValueError says what is wrong."""
    values = _numbers(text, int, "--concurrency")
    if min(values) < 1:
        raise ValueError(f"concurrency must be at least 1, not {min(values)}")
    return values


def parse_rates(text: str) -> list[float]:
    """`0.5,5,10`: requests per second, more than 0; ValueError says what is wrong."""
    values = _numbers(text, float, "--rate")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"rates must be finite and more than 0, not {text}")
    return values


def _numbers(text: str, kind: type, flag: str) -> list:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = [kind(part) for part in parts]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of {kind.__name__}s ({flag} 1,4,16)") from None
    if not values:
        raise ValueError(f"{flag} needs at least one value")
    return list(dict.fromkeys(values))  # each level once, in the order given
