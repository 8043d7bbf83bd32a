"""Priority under overload, in one run: HIGH's time to first token with the mesh idle and under a LOW flood, and what
priority costs the mesh's throughput; with 1 and 2 workers.

    python bench/priority.py [--workers 1,2] [--seats 8] [--seconds 20] [--slo-ttft high=150ms]

Per worker count: `meshserve up` (its own process group, free loopback ports, bench/peer.py's start) with
--slo-ttft for router and gateway, then, through the gateway's gRPC API (loadgen's GrpcTarget):
1. idle: HIGH requests (16 prompt tokens, 8 output tokens) one at a time;
2. LOW alone: 3 x the mesh's seats closed-loop streams of LOW requests (40 prompt tokens, 64 output tokens,
   ignore_eos) for --seconds;
3. LOW + HIGH: the same LOW flood, and HIGH requests one at a time (0.25 s apart) for --seconds.
The HIGH client runs in a process of its own, so it never waits behind the LOW streams in the bench's event loop.
Prints HIGH TTFT p50/p99 idle and loaded (and their ratio; the target is <= 1.5), the mesh's total output tok/s with
LOW alone and with LOW + HIGH (target: within 15 %), requests shed by class, and the router's own view (Stats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from peer import start_meshserve, wait_ready
from processes import stop_process_group

from meshserve.common.channels import aio_channel
from meshserve.common.config import cache_dir
from meshserve.loadgen.grpc_target import GrpcTarget
from meshserve.loadgen.levels import LoadLevel
from meshserve.loadgen.records import RequestRecord, record_of
from meshserve.loadgen.runner import run_level, warm_up
from meshserve.loadgen.target import Reply
from meshserve.loadgen.workload import LengthDistribution, RequestSpec, Workload
from meshserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from meshserve.worker.builtin_model import ensure_builtin_model

HIGH, LOW = common_pb2.PRIORITY_HIGH, common_pb2.PRIORITY_LOW
HIGH_GAP_S = 0.25  # between one HIGH request's end and the next one's start: a trickle


class PriorityTarget(GrpcTarget):
    """The gateway's gRPC API, every request sent with one priority class, by a client that honours RetryInfo."""

    def __init__(self, address: str, priority: int) -> None:
        super().__init__(address)
        self.priority = priority

    def generate_request(self, request: RequestSpec):
        message = super().generate_request(request)
        message.priority = self.priority
        return message

    async def send(self, request: RequestSpec) -> Reply:
        """As a client that honours RetryInfo does (meshserve.client): a shed request's slot waits as told."""
        reply = await super().send(request)
        if reply.retry_delay:
            await asyncio.sleep(reply.retry_delay)
        return reply


def workload(prompt: int, output: int, seed: int) -> Workload:
    return Workload(LengthDistribution("fixed", prompt), LengthDistribution("fixed", output), seed=seed)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))] if ordered else float("nan")


async def high_trickle(
    gateway: str, seconds: float, count: int | None, seed: int
) -> list[tuple[str, float | None, int]]:
    """HIGH requests one at a time for `seconds` or until `count` were sent: (status, TTFT, output tokens) each."""
    high, replies = workload(16, 8, seed=seed), []
    until = time.perf_counter() + seconds
    async with PriorityTarget(gateway, HIGH) as target:
        while time.perf_counter() < until and (count is None or len(replies) < count):
            record = record_of(request := high.next_request(), await target.send(request), time.perf_counter())
            replies.append((record.status, record.ttft if record.ok else None, tokens([record])))
            await asyncio.sleep(HIGH_GAP_S)
    return replies


def high_client(gateway: str, seconds: float, count: int | None, seed: int) -> list[tuple[str, float | None, int]]:
    """The HIGH client in a process of its own: it must not wait behind the LOW flood's streams in this one's loop."""
    return asyncio.run(high_trickle(gateway, seconds, count, seed))


def tokens(records: list[RequestRecord]) -> int:
    return sum(r.output_tokens for r in records if r.ok)


async def router_stats(address: str) -> router_pb2.RouterStats:
    channel = aio_channel(address, traced=False)
    try:
        return await router_pb2_grpc.RouterStub(channel).Stats(router_pb2.RouterStatsRequest(), timeout=5)
    finally:
        await channel.close()


async def measure(gateway: str, router: str, streams: int, args: argparse.Namespace) -> dict[str, object]:
    low_work = workload(40, 64, seed=1)
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as high:
        async with PriorityTarget(gateway, LOW) as low:
            await warm_up(low, workload(40, 64, seed=9), streams)
            await loop.run_in_executor(high, high_client, gateway, 60, 4, 8)  # its process and channel warm too
            idle = await loop.run_in_executor(high, high_client, gateway, 60, args.idle_requests, 2)
            alone = await run_level(low, low_work, LoadLevel(concurrency=streams, duration=args.seconds))
            flood = asyncio.create_task(run_level(low, low_work, LoadLevel(concurrency=streams, duration=args.seconds)))
            await asyncio.sleep(args.seconds * 0.1)  # the flood fills the mesh first
            loaded = await loop.run_in_executor(high, high_client, gateway, args.seconds * 0.85, None, 3)
            mixed = await flood
    stats = await router_stats(router)
    idle_ttft = [ttft for _, ttft, _ in idle if ttft is not None]
    loaded_ttft = [ttft for _, ttft, _ in loaded if ttft is not None]
    statuses = Counter(f"low {r.status}" for r in mixed.records) + Counter(f"high {s}" for s, _, _ in loaded)
    shed = {name: n for name, n in statuses.items() if name.endswith("RESOURCE_EXHAUSTED")}
    by_class = {q.priority: q for q in stats.queues}
    return {
        "streams": streams,
        "idle_p50": quantile(idle_ttft, 0.5),
        "idle_p99": quantile(idle_ttft, 0.99),
        "loaded_p50": quantile(loaded_ttft, 0.5),
        "loaded_p99": quantile(loaded_ttft, 0.99),
        "high_requests": (len(idle_ttft), len(loaded_ttft)),
        "loaded_ttfts_ms": sorted(round(t * 1000) for t in loaded_ttft),
        "low_alone_tps": tokens(alone.records) / alone.wall,
        "mixed_tps": (tokens(mixed.records) + sum(n for _, _, n in loaded)) / mixed.wall,
        "low_ttft_p50": statistics.median([r.ttft for r in mixed.records if r.ok and r.ttft] or [float("nan")]),
        "shed": shed,
        "statuses": dict(statuses),
        "router_high_p99_ms": by_class[HIGH].recent_ttft_p99_ms,
        "router_high_attainment": by_class[HIGH].objective_attainment,
        "objective_shed": stats.objective_shed,
        "deadline_refused": stats.deadline_refused,
        "preemptions": sum(w.load.preemptions for w in stats.workers),
    }


def run_mesh(workers: int, model_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    cache = work / "mesh-cache"  # peer.py's: its own mesh.json; the compiled code reused from the caller's cache
    cache.mkdir(parents=True, exist_ok=True)
    (cache_dir() / "inductor").mkdir(parents=True, exist_ok=True)
    if not (cache / "inductor").exists():
        (cache / "inductor").symlink_to((cache_dir() / "inductor").resolve(), target_is_directory=True)
    mesh_args = argparse.Namespace(
        mesh_env=[f"slo_ttft={args.slo_ttft}", *args.mesh_env],
        mesh_arg=[f"--workers={workers}", f"--max-num-seqs={args.seats}"],
    )
    server = start_meshserve(model_dir, work, mesh_args)
    try:
        asyncio.run(wait_ready(server, args.start_timeout))
        state = cache / "mesh.json"  # written once every service is SERVING, which may be just after the gateway
        for _ in range(600):
            if state.exists():
                break
            time.sleep(0.1)
        services = json.loads(state.read_text())["services"]
        address = {s["name"]: s["address"] for s in services}
        result = asyncio.run(measure(address["gateway"], address["router-0"], 3 * args.seats * workers, args))
    finally:
        stop_process_group(server.process)
    return {"workers": workers, **result}


def report(results: list[dict[str, object]], args: argparse.Namespace) -> None:
    print(f"\n{args.seats} seats per worker, LOW streams = 3 x seats, --slo-ttft {args.slo_ttft}, {args.seconds:g} s")
    header = (
        f"{'workers':>7} {'streams':>7} {'HIGH idle p50/p99 ms':>21} {'HIGH loaded p50/p99 ms':>23} {'p99 x':>6} "
        f"{'tok/s LOW':>10} {'tok/s +HIGH':>11} {'ratio':>6} {'LOW TTFT':>9}  shed"
    )
    print(header + "\n" + "-" * len(header))
    for r in results:
        ratio = r["loaded_p99"] / r["idle_p99"]
        tps = r["mixed_tps"] / r["low_alone_tps"]
        print(
            f"{r['workers']:>7} {r['streams']:>7} {r['idle_p50'] * 1e3:>10.1f}/{r['idle_p99'] * 1e3:<10.1f} "
            f"{r['loaded_p50'] * 1e3:>11.1f}/{r['loaded_p99'] * 1e3:<11.1f} {ratio:>6.2f} "
            f"{r['low_alone_tps']:>10.0f} {r['mixed_tps']:>11.0f} {tps:>6.2f} {r['low_ttft_p50'] * 1e3:>7.0f}ms  "
            f"{r['shed'] or 'none'}"
        )
    for r in results:
        print(
            f"  {r['workers']} worker(s): HIGH requests idle/loaded {r['high_requests']}; router: HIGH recent p99 "
            f"{r['router_high_p99_ms']} ms, attainment {r['router_high_attainment']:.2f}, objective sheds "
            f"{r['objective_shed']}, deadline refusals {r['deadline_refused']}, preemptions {r['preemptions']}; "
            f"outcomes {r['statuses']}; loaded HIGH TTFTs (ms) {r['loaded_ttfts_ms']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts, one mesh each")
    parser.add_argument("--seats", type=int, default=8, help="max_num_seqs of each worker")
    parser.add_argument("--seconds", type=float, default=20.0, help="each loaded phase")
    parser.add_argument("--idle-requests", type=int, default=30)
    parser.add_argument("--slo-ttft", default="high=150ms", help="the router's and gateway's objectives")
    parser.add_argument("--mesh-env", action="append", default=[], help="NAME=VALUE: MESHSERVE_NAME (repeatable)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    model_dir = ensure_builtin_model()
    work = Path(tempfile.mkdtemp(prefix="meshserve-priority-"))
    print(f"model {model_dir}; logs in {work}", flush=True)
    results = []
    for workers in (int(w) for w in args.workers.split(",") if w):
        print(f"{workers} worker(s) ...", flush=True)
        results.append(run_mesh(workers, model_dir, work / f"w{workers}", args))
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
