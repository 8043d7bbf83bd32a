"""What tracing costs: mesh throughput (gateway -> router -> worker) with every request traced or none.

Runs in one process on the built-in model, alternating off and on (after a warm-up run) so drift
and warm-up do not favour either; prints the median tokens/s of each, their ratio, spans per request:
    python bench/tracing.py [--concurrency 16] [--max-tokens 64] [--rounds 3]
"On" is the real SDK pipeline (every span created, sampled and batched) into an exporter that counts
and drops, so the number is the cost of tracing in the services, not of a collector. "Off" is the same
pipeline sampling nothing, as a deployment with OTEL_TRACES_SAMPLER_ARG=0 runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler, SamplingResult
from throughput import mesh_tokens_per_second


class Switch(Sampler):
    """Samples every trace or none, switched between runs."""

    def __init__(self) -> None:
        self.on = False

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return (ALWAYS_ON if self.on else ALWAYS_OFF).should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "Switch"


class CountingExporter(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker (default 1)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    switch, exporter = Switch(), CountingExporter()
    trace.set_tracer_provider(TracerProvider(sampler=switch))
    trace.get_tracer_provider().add_span_processor(BatchSpanProcessor(exporter))  # type: ignore[attr-defined]

    def run() -> float:
        return asyncio.run(mesh_tokens_per_second(args.concurrency, args.max_tokens, args.threads))

    run()  # warm-up: the first run in a process is slower
    results: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for on in (False, True):
            switch.on = on
            results[on].append(run())
    print("off:", " ".join(f"{r:.0f}" for r in results[False]), " on:", " ".join(f"{r:.0f}" for r in results[True]))
    trace.get_tracer_provider().shutdown()  # type: ignore[attr-defined]
    off, on = statistics.median(results[False]), statistics.median(results[True])
    traced_requests = args.rounds * (args.concurrency + 1)  # each run sends one warm-up request too
    print(f"tracing off, {args.concurrency} concurrent streams: {off:8.0f} tokens/s (median of {args.rounds})")
    print(
        f"tracing on, every request sampled:   {on:8.0f} tokens/s, {exporter.spans / traced_requests:.1f} spans/request"
    )
    print(f"ratio on / off: {on / off:.3f}")


if __name__ == "__main__":
    main()
