"""The worker's Prometheus metrics: batch, KV cache, prefix cache, preemptions, tokens, latency at the worker.

The gauges and running totals come from the engine's own load snapshot at scrape time (the numbers each
router's stream reports), so the engine loop pays nothing for them; only per-step batch sizes and
per-request latencies are observed as they happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshserve.common.metrics import BATCH_SIZE_BUCKETS, INTER_TOKEN_BUCKETS, LATENCY_BUCKETS
from meshserve.worker.engine_load import EngineLoad


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, load: Callable[[], EngineLoad | None]) -> None:
        self.batch_size = Histogram(
            "meshserve_worker_batch_size",
            "Sequences computed together in one engine step",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "meshserve_worker_time_to_first_token_seconds",
            "From a request reaching the worker to its first token (worker queue + prefill)",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "meshserve_worker_inter_token_latency_seconds",
            "Time between two consecutive messages of tokens of one sequence",
            buckets=INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "meshserve_worker_prompt_tokens", "Prompt tokens of finished sequences", registry=registry
        )
        self.cached_prompt_tokens = Counter(
            "meshserve_worker_cached_prompt_tokens",
            "Prompt tokens served from the prefix cache instead of computed",
            registry=registry,
        )
        self.requests = Counter(
            "meshserve_worker_requests",
            "Generate calls the worker finished, by gRPC status code",
            ["code"],
            registry=registry,
        )
        registry.register(_EngineCollector(load))


class _EngineCollector(Collector):
    def __init__(self, load: Callable[[], EngineLoad | None]) -> None:
        self.load = load

    def collect(self) -> Iterator[Metric]:
        load = self.load()
        if load is None:  # still loading the model: no engine yet
            return
        yield GaugeMetricFamily(
            "meshserve_worker_running_sequences", "Sequences in the running batch", value=load.running_sequences
        )
        waiting = GaugeMetricFamily(
            "meshserve_worker_waiting_sequences",
            "Sequences waiting for a seat in the batch (new or preempted); the autoscaling signal",
            value=load.waiting_sequences,
        )
        yield waiting
        yield GaugeMetricFamily(
            "meshserve_worker_max_num_seqs", "Sequences the batch holds at most", value=load.max_num_seqs
        )
        used = load.total_kv_blocks - load.free_kv_blocks
        yield GaugeMetricFamily(
            "meshserve_worker_kv_cache_usage_ratio",
            "Share of the KV-cache blocks in use by running sequences (cached free blocks count as free)",
            value=used / load.total_kv_blocks if load.total_kv_blocks else 0.0,
        )
        yield GaugeMetricFamily(
            "meshserve_worker_kv_cache_blocks", "KV-cache blocks in the pool", value=load.total_kv_blocks
        )
        yield GaugeMetricFamily(
            "meshserve_worker_prefix_cache_hit_ratio",
            "Share of looked-up prompt blocks found in the prefix cache",
            value=load.prefix_cache_hit_rate,
        )
        yield GaugeMetricFamily(
            "meshserve_worker_generation_tokens_per_second",
            "Tokens generated per second over the last few seconds",
            value=load.tokens_per_second,
        )
        yield GaugeMetricFamily(
            "meshserve_worker_draining", "1 while the worker drains before stopping", value=int(load.draining)
        )
        yield CounterMetricFamily("meshserve_worker_generation_tokens", "Tokens generated", value=load.generated_tokens)
        yield CounterMetricFamily(
            "meshserve_worker_preemptions",
            "Sequences taken out of the batch to free KV blocks or a seat (they recompute later)",
            value=load.preemptions,
        )
        sequences = CounterMetricFamily(
            "meshserve_worker_sequences", "Sequences that left the engine, by how", labels=["outcome"]
        )
        sequences.add_metric(["finished"], load.sequences_finished)
        sequences.add_metric(["cancelled"], load.sequences_cancelled)
        yield sequences
