"""A level's numbers: throughput over its wall time and latency percentiles over its successful requests.

`percentile` is the one percentile of the benchmarks (bench/hops.py uses it too).
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field
from typing import Any

from meshserve.loadgen.levels import LoadLevel
from meshserve.loadgen.records import RequestRecord


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


@dataclass
class LevelSummary:
    """Seconds for every latency; rates per second of the level's wall time (first send to last end)."""

    load: str  # "concurrency 4", "rate 5/s"
    wall: float
    requests: int
    ok: int
    errors: dict[str, int]  # failed requests by status
    output_tokens: int  # of the requests that succeeded
    tokens_per_second: float
    requests_per_second: float  # successful ones
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    tpot_p50: float
    e2e_p50: float
    e2e_p99: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LevelResult:
    level: LoadLevel
    records: list[RequestRecord] = field(default_factory=list)  # in the order they were sent
    wall: float = 0.0

    @property
    def summary(self) -> LevelSummary:
        return summarize(self.level.label, self.records, self.wall)

    def to_json(self) -> dict[str, Any]:
        return {
            "load": self.level.describe(),
            "summary": self.summary.to_json(),
            "records": [r.to_json() for r in self.records],
        }


def summarize(load: str, records: list[RequestRecord], wall: float) -> LevelSummary:
    done = [r for r in records if r.ok]
    errors = collections.Counter(r.status for r in records if not r.ok)
    ttfts = [r.ttft for r in done if r.ttft is not None]
    itls = [gap for r in done for gap in r.itl]
    tpots = [t for r in done if (t := r.tpot) is not None]
    e2es = [r.e2e for r in done]
    tokens = sum(r.output_tokens for r in done)
    per_second = 1 / wall if wall > 0 else float("nan")
    return LevelSummary(
        load=load,
        wall=wall,
        requests=len(records),
        ok=len(done),
        errors=dict(errors.most_common()),
        output_tokens=tokens,
        tokens_per_second=tokens * per_second,
        requests_per_second=len(done) * per_second,
        ttft_p50=percentile(ttfts, 50),
        ttft_p90=percentile(ttfts, 90),
        ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(itls, 50),
        itl_p99=percentile(itls, 99),
        tpot_p50=percentile(tpots, 50),
        e2e_p50=percentile(e2es, 50),
        e2e_p99=percentile(e2es, 99),
    )
