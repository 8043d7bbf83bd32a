"""Latency objectives per priority class and the recent latencies they are judged by, for the router and the gateway.

An operator sets time-to-first-token targets per class (`--slo-ttft critical=150ms,high=300ms`,
MESHSERVE_SLO_TTFT); a class without one has no objective. `RecentLatencies` keeps each class's last
latencies inside a time window: its quantiles and the share that met the target (attainment) are what
the router holds lower classes back by, and what both services export.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshserve.common.enums import PRIORITY_BY_NAME, PRIORITY_NAMES, priority_name, served_priority

UNITS = {"ms": 1e-3, "s": 1.0}


def parse_ttft_objectives(text: str) -> dict[int, float]:
    """'critical=150ms,high=0.3s' as {PRIORITY_CRITICAL: 0.15, PRIORITY_HIGH: 0.3}; ValueError saying what is wrong."""
    objectives: dict[int, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, raw = item.partition("=")
        priority = PRIORITY_BY_NAME.get(name.strip().lower())
        if not sep or priority is None:
            classes = ", ".join(PRIORITY_BY_NAME)
            raise ValueError(f"{item!r}: expected CLASS=TIME with CLASS one of {classes} (e.g. high=300ms)")
        raw = raw.strip().lower()
        unit = next((u for u in ("ms", "s") if raw.endswith(u)), "s")
        try:
            seconds = float(raw.removesuffix(unit)) * UNITS[unit]
        except ValueError:
            raise ValueError(f"{item!r}: {raw!r} is not a time such as 300ms or 0.3s") from None
        if not 0 < seconds < math.inf:
            raise ValueError(f"{item!r}: the target must be a positive time")
        objectives[priority] = seconds
    return objectives


def describe_objectives(objectives: dict[int, float]) -> str:
    return ",".join(f"{priority_name(p)}={s * 1000:g}ms" for p, s in sorted(objectives.items())) or "none"


class RecentLatencies:
    """The last `samples` latencies of each class that are at most `window_seconds` old."""

    def __init__(
        self, window_seconds: float = 30.0, samples: int = 256, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_seconds = window_seconds
        self.clock = clock
        self._samples = samples
        self._by_class: dict[int, collections.deque[tuple[float, float]]] = {}

    def observe(self, priority: int, seconds: float) -> None:
        recent = self._by_class.setdefault(served_priority(priority), collections.deque(maxlen=self._samples))
        recent.append((self.clock(), seconds))

    def values(self, priority: int) -> list[float]:
        recent = self._by_class.get(served_priority(priority))
        if not recent:
            return []
        oldest = self.clock() - self.window_seconds
        while recent and recent[0][0] < oldest:
            recent.popleft()
        return [seconds for _, seconds in recent]

    def quantile(self, priority: int, q: float) -> float | None:
        """The nearest-rank q-quantile (0.99: p99) of the class's recent latencies; None without any."""
        values = sorted(self.values(priority))
        if not values:
            return None
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    def attainment(self, priority: int, target: float) -> float | None:
        """The share of the class's recent latencies within `target`; None without any."""
        values = self.values(priority)
        return sum(1 for v in values if v <= target) / len(values) if values else None


class ObjectiveCollector(Collector):
    """`<prefix>_recent_ttft_seconds{priority,quantile}` (p50, p99), `<prefix>_ttft_objective_seconds` and
    `<prefix>_ttft_objective_attainment_ratio` per class, read at scrape time from the service's window."""

    def __init__(self, prefix: str, where: str, objectives: dict[int, float], recent: RecentLatencies) -> None:
        self.prefix, self.where = prefix, where
        self.objectives, self.recent = objectives, recent

    def collect(self) -> Iterator[Metric]:
        window = f"the last {self.recent.window_seconds:g} s"
        recent = GaugeMetricFamily(
            f"{self.prefix}_recent_ttft_seconds",
            f"Time to first token {self.where} of each class's recent requests ({window}), by quantile",
            labels=["priority", "quantile"],
        )
        objective = GaugeMetricFamily(
            f"{self.prefix}_ttft_objective_seconds", "Each class's TTFT target (--slo-ttft)", labels=["priority"]
        )
        attainment = GaugeMetricFamily(
            f"{self.prefix}_ttft_objective_attainment_ratio",
            f"Share of each class's recent requests ({window}) whose time to first token met its objective",
            labels=["priority"],
        )
        for priority, label in PRIORITY_NAMES.items():
            for q in (0.5, 0.99):
                value = self.recent.quantile(priority, q)
                if value is not None:
                    recent.add_metric([label, f"{q:g}"], value)
            target = self.objectives.get(priority)
            if target is not None:
                objective.add_metric([label], target)
                met = self.recent.attainment(priority, target)
                if met is not None:
                    attainment.add_metric([label], met)
        yield from (recent, objective, attainment)
