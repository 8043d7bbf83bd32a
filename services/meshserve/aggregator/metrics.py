"""The aggregator's Prometheus metrics: fan-out requests by kind and outcome, their sub-requests, their width."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

FAN_OUT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class AggregatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "meshserve_aggregator_fanout_requests",
            "Fan-out requests answered, by kind (samples, best_of, batch, map_reduce) and gRPC status code",
            ["kind", "code"],
            registry=registry,
        )
        self.sub_requests = Counter(
            "meshserve_aggregator_sub_requests",
            "Sub-requests sent through the router, by gRPC status code",
            ["code"],
            registry=registry,
        )
        self.fan_out = Histogram(
            "meshserve_aggregator_fanout_width",
            "Sub-requests one fan-out request was split into",
            ["kind"],
            buckets=FAN_OUT_BUCKETS,
            registry=registry,
        )
