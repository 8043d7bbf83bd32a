"""The router's Prometheus metrics: queues per priority class, waits, outcomes, failovers, shedding."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshserve.common.enums import PRIORITY_NAMES, priority_name
from meshserve.common.metrics import LATENCY_BUCKETS
from meshserve.router.dispatcher import Dispatcher


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, dispatcher: Dispatcher) -> None:
        self.queue_wait = Histogram(
            "meshserve_router_queue_wait_seconds",
            "Time a request waited in the router's queue before a worker had room",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "meshserve_router_requests",
            "Requests the router finished, by priority class and gRPC status code",
            ["priority", "code"],
            registry=registry,
        )
        registry.register(_DispatcherCollector(dispatcher))

    def finished(self, priority: int, code: str) -> None:
        self.requests.labels(priority_name(priority), code).inc()


class _DispatcherCollector(Collector):
    """Read at scrape time from the dispatcher, which already keeps these numbers for its Stats RPC."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "meshserve_router_queue_depth", "Requests waiting in the router's queue", labels=["priority"]
        )
        oldest = GaugeMetricFamily(
            "meshserve_router_queue_oldest_wait_seconds",
            "How long the oldest waiting request of each class has waited",
            labels=["priority"],
        )
        queued = dict.fromkeys(PRIORITY_NAMES.values(), (0, 0.0))
        for priority, (count, wait) in self.dispatcher.queue.stats().items():
            label = priority_name(priority)
            before = queued[label]
            queued[label] = (before[0] + count, max(before[1], wait))
        for label, (count, wait) in queued.items():
            depth.add_metric([label], count)
            oldest.add_metric([label], wait)
        shed = CounterMetricFamily(
            "meshserve_router_shed_requests",
            "Requests refused or evicted with RESOURCE_EXHAUSTED because the queue was full",
            labels=["priority"],
        )
        shed_counts = dict.fromkeys(PRIORITY_NAMES.values(), 0)
        for priority, count in self.dispatcher.queue.shed_by_priority.items():
            shed_counts[priority_name(priority)] += count
        for label, count in shed_counts.items():
            shed.add_metric([label], count)
        yield depth
        yield oldest
        yield shed
        yield CounterMetricFamily(
            "meshserve_router_deadline_exceeded_requests",
            "Requests whose deadline passed while they waited in the queue",
            value=self.dispatcher.deadline_exceeded,
        )
        yield CounterMetricFamily(
            "meshserve_router_failovers",
            "Streams resumed on another worker after theirs failed",
            value=self.dispatcher.failovers,
        )
        yield CounterMetricFamily(
            "meshserve_router_dispatched_requests",
            "Dispatches to a worker (a failover counts again)",
            value=self.dispatcher.dispatched,
        )
        workers = GaugeMetricFamily("meshserve_router_workers", "Workers the router knows, by state", labels=["state"])
        pool = self.dispatcher.pool.workers
        draining = sum(1 for w in pool if w.up and w.load is not None and w.load.draining)
        up = sum(1 for w in pool if w.up)
        workers.add_metric(["up"], up - draining)
        workers.add_metric(["draining"], draining)
        workers.add_metric(["down"], len(pool) - up)
        yield workers
