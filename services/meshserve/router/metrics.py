"""The router's Prometheus metrics: queues per priority class, waits, outcomes, failovers, shedding; time to first
token per class against its objective, what is held back for it, and the error of the TTFT prediction."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshserve.common.enums import PRIORITY_NAMES, priority_name
from meshserve.common.metrics import LATENCY_BUCKETS
from meshserve.common.objectives import ObjectiveCollector
from meshserve.router.dispatcher import Dispatcher
from meshserve.router.queue import DEFAULT_EXPECTED_OUTPUT, Pending
from meshserve.v1 import common_pb2, router_pb2

PROBE_PROMPT_TOKENS = 16  # the request whose TTFT Stats predicts per class


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, dispatcher: Dispatcher) -> None:
        self.queue_wait = Histogram(
            "meshserve_router_queue_wait_seconds",
            "Time a request waited in the router's queue before a worker had room",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "meshserve_router_time_to_first_token_seconds",
            "From a request reaching the router to its first token relayed to the caller",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prediction_error = Histogram(
            "meshserve_router_ttft_prediction_error_seconds",
            "How far the time to first token predicted on arrival was from the one observed (direction: the "
            "observed was over or under the prediction)",
            ["priority", "direction"],
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

    def first_token(self, priority: int, ttft: float, error: float | None) -> None:
        label = priority_name(priority)
        self.time_to_first_token.labels(label).observe(ttft)
        if error is not None:
            self.prediction_error.labels(label, "over" if error > 0 else "under").observe(abs(error))


def held_seats(dispatcher: Dispatcher, priority: int) -> int:
    """Seats of the largest worker held free of the class for more urgent ones."""
    seats = max((w.load.max_num_seqs for w in dispatcher.pool.workers if w.load is not None), default=0)
    return dispatcher.holdback.held_seats(priority, seats)


def class_objectives(dispatcher: Dispatcher, queue: router_pb2.QueueStats) -> None:
    """Fills a class's Stats with its recent TTFTs, objective, attainment, hold-back and predicted TTFT."""
    priority, recent = queue.priority, dispatcher.recent_ttft
    queue.recent_ttft_p50_ms = int((recent.quantile(priority, 0.5) or 0.0) * 1000)
    queue.recent_ttft_p99_ms = int((recent.quantile(priority, 0.99) or 0.0) * 1000)
    target = dispatcher.holdback.objectives.get(priority)
    if target is not None:
        queue.ttft_objective_ms = int(target * 1000)
        queue.objective_attainment = recent.attainment(priority, target) or 0.0
    queue.held_seats = held_seats(dispatcher, priority)
    probe = common_pb2.TokenRequest(prompt_token_ids=[0] * PROBE_PROMPT_TOKENS, priority=priority)
    probe.sampling.max_tokens = DEFAULT_EXPECTED_OUTPUT
    prediction = dispatcher.predict(Pending.of(probe))
    queue.predicted_ttft_ms = int(prediction.seconds * 1000) if prediction is not None else 0


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
        yield from self._objectives()
        yield CounterMetricFamily(
            "meshserve_router_deadline_refused_requests",
            "Requests refused on arrival because their deadline was shorter than their predicted time to first token",
            value=self.dispatcher.deadline_refused,
        )
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

    def _objectives(self) -> Iterator[Metric]:
        holdback = self.dispatcher.holdback
        yield from ObjectiveCollector(
            "meshserve_router", "at the router", holdback.objectives, self.dispatcher.recent_ttft
        ).collect()
        held = GaugeMetricFamily(
            "meshserve_router_held_back_sequences",
            "Seats (sequences) of a worker held free of each class for a more urgent class near or past its objective",
            labels=["priority"],
        )
        shed = CounterMetricFamily(
            "meshserve_router_objective_shed_requests",
            "BATCH and LOW requests shed because a more urgent class kept missing its objective",
            labels=["priority"],
        )
        for priority, label in PRIORITY_NAMES.items():
            held.add_metric([label], held_seats(self.dispatcher, priority))
            shed.add_metric([label], holdback.shed_by_priority.get(priority, 0))
        yield from (held, shed)
