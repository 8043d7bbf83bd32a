"""Many streams on one gateway process: the gateway's memory per open stream and its CPU time, in one run.

    python bench/streams.py                                  # 1,000 streams of 16 tokens
    python bench/streams.py --streams 200 --max-tokens 8     # a short trial
    python bench/streams.py --workers 2 --channels 10        # more workers; the streams over 10 connections

Starts a worker (built-in model, one torch thread), a router, an aggregator and a gateway as processes
(`python -m meshserve.cli ...`, each in a session of its own, on free loopback ports, logs in a temporary folder),
waits until each is SERVING and runs a few warm-up streams. Then it reads the gateway's VmRSS (/proc/PID/status)
idle, stops the workers (SIGSTOP: no stream can finish, whatever this machine's speed), opens --streams
meshserve.v1.Inference/GenerateStream calls on the gateway from one grpc.aio loop (greedy, --max-tokens each, EOS
ignored, a prompt of their own), and once the router holds them all (queued, or in flight on a stopped worker)
reads the gateway's VmRSS again. The workers go on (SIGCONT) and every stream runs to its end.

Prints the gateway's RSS idle and with every stream open, the growth per open stream in KiB, the gateway's CPU
seconds (to open the streams and in all), and how many streams completed with exactly --max-tokens tokens and
their final message; exits 1 if any did not.

The router is started with --max-queued max(1024, --streams), so that its queue (1,024 by default) never refuses
a stream; the gateway needs no setting: its anonymous tenant (loopback, no keys file) has no rate limits.
A stopped worker answers no keepalive ping: gRPC closes the router's link to it after about 40 s, so the hold
is bounded (--hold-seconds); if the router does not hold every stream by then, RSS is sampled with those open.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from processes import HOST, free_port_block, spawn, stop_process_group, tree_cpu_seconds

from meshserve.cli.launcher import child_env
from meshserve.common.channels import wait_until_serving
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc

DEFAULT_MAX_QUEUED = 1024  # RouterConfig.max_queued
WARM_UP_STREAMS = 8


@dataclass
class Mesh:
    processes: dict[str, subprocess.Popen[bytes]]  # "worker-0", ..., "router", "aggregator", "gateway"
    addresses: dict[str, str]
    work: Path

    @property
    def gateway_pid(self) -> int:
        return self.processes["gateway"].pid

    def workers(self) -> list[subprocess.Popen[bytes]]:
        return [p for name, p in self.processes.items() if name.startswith("worker")]


@dataclass
class StreamResult:
    tokens: int = 0
    final_tokens: int | None = None  # usage.completion_tokens of the final message; None: no final message
    error: str = ""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"streams: no VmRSS for pid {pid}")


def signal_workers(mesh: Mesh, signum: int) -> None:
    for process in mesh.workers():
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


@contextlib.contextmanager
def running_mesh(args: argparse.Namespace) -> Iterator[Mesh]:
    """Worker(s), router, aggregator and gateway processes, all SERVING; all stopped after (workers continued
    first: a stopped process does not act on SIGTERM)."""
    work = Path(tempfile.mkdtemp(prefix="meshserve-streams-"))
    base = free_port_block(args.workers + 3)
    names = [*(f"worker-{i}" for i in range(args.workers)), "router", "aggregator", "gateway"]
    addresses = {name: f"{HOST}:{base + i}" for i, name in enumerate(names)}
    workers = ",".join(addresses[f"worker-{i}"] for i in range(args.workers))
    cli = [sys.executable, "-m", "meshserve.cli"]
    common = ["--host", HOST, "--metrics-port", "0"]
    commands = {f"worker-{i}": ["worker", "--threads", "1"] for i in range(args.workers)}
    if args.max_num_seqs:
        for command in commands.values():
            command += ["--max-num-seqs", str(args.max_num_seqs)]
    commands["router"] = ["router", "--workers", workers, "--max-queued", str(max(DEFAULT_MAX_QUEUED, args.streams))]
    commands["aggregator"] = ["aggregator", "--router", addresses["router"]]
    commands["gateway"] = ["gateway", "--router", addresses["router"], "--aggregator", addresses["aggregator"]]
    commands["gateway"] += ["--http-port", "-1"]
    processes: dict[str, subprocess.Popen[bytes]] = {}
    mesh = Mesh(processes, addresses, work)
    try:
        for name in names:
            port = addresses[name].rsplit(":", 1)[1]
            processes[name] = spawn([*cli, *commands[name], "--port", port, *common], child_env(), work / f"{name}.log")
        for name in names:  # workers first: they load (and compile) the model before they say SERVING
            if not wait_until_serving(addresses[name], timeout=args.start_timeout):
                tail = "\n".join((work / f"{name}.log").read_text(errors="replace").splitlines()[-20:])
                raise SystemExit(f"streams: the {name} was not SERVING after {args.start_timeout:.0f} s:\n{tail}")
        yield mesh
    finally:
        signal_workers(mesh, signal.SIGCONT)
        for process in reversed(processes.values()):
            stop_process_group(process, grace=10)


def request(i: int, max_tokens: int) -> inference_pb2.GenerateRequest:
    """Greedy, exactly max_tokens (EOS ignored), a prompt of its own (no prefix shared with another stream)."""
    prompt = [10 + i % 100, 200 + i // 100 % 100, 300 + i // 10_000, 400 + i % 7]
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=prompt), sampling=sampling)


async def one_stream(stub: inference_pb2_grpc.InferenceStub, i: int, max_tokens: int, timeout: float) -> StreamResult:
    result = StreamResult()
    try:
        async for message in stub.GenerateStream(request(i, max_tokens), timeout=timeout):
            if message.final:
                result.final_tokens = message.usage.completion_tokens
            else:
                result.tokens += len(message.token_ids)
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {(exc.details() or '')[:200]}"
    return result


async def held(router: router_pb2_grpc.RouterStub) -> int:
    """Requests the router holds: queued, or in flight on a worker."""
    stats = await router.Stats(router_pb2.RouterStatsRequest(), timeout=5)
    return sum(q.queued for q in stats.queues) + sum(w.in_flight for w in stats.workers)


async def measure(mesh: Mesh, args: argparse.Namespace) -> bool:
    """Runs the streams and prints what they cost the gateway; whether every one completed in full."""
    n, pid = args.streams, mesh.gateway_pid
    channels = [grpc.aio.insecure_channel(mesh.addresses["gateway"]) for _ in range(args.channels)]
    router_channel = grpc.aio.insecure_channel(mesh.addresses["router"])
    try:
        stubs = [inference_pb2_grpc.InferenceStub(c) for c in channels]
        router = router_pb2_grpc.RouterStub(router_channel)
        warm = await asyncio.gather(
            *(one_stream(stubs[i % len(stubs)], n + i, args.max_tokens, args.timeout) for i in range(WARM_UP_STREAMS))
        )
        if any(r.error for r in warm):
            raise SystemExit(f"streams: a warm-up stream failed: {next(r.error for r in warm if r.error)}")

        idle_rss, idle_cpu = rss_bytes(pid), tree_cpu_seconds(pid)
        print(f"gateway pid {pid}: RSS idle {idle_rss / 2**20:.1f} MiB (after {WARM_UP_STREAMS} warm-up streams)")
        signal_workers(mesh, signal.SIGSTOP)
        started = time.monotonic()
        tasks = [
            asyncio.create_task(one_stream(stubs[i % len(stubs)], i, args.max_tokens, args.timeout)) for i in range(n)
        ]
        holding = 0
        while time.monotonic() - started < args.hold_seconds:
            holding = await held(router)
            if holding >= n or any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.1)
        open_s = time.monotonic() - started
        open_rss, open_cpu = rss_bytes(pid), tree_cpu_seconds(pid)
        signal_workers(mesh, signal.SIGCONT)
        opened = min(holding, n)
        growth = open_rss - idle_rss
        print(
            f"{opened} of {n} streams open after {open_s:.1f} s (workers stopped): gateway RSS "
            f"{open_rss / 2**20:.1f} MiB, +{growth / 2**20:.1f} MiB, {growth / max(1, opened) / 1024:.1f} KiB per "
            f"open stream; gateway CPU {open_cpu - idle_cpu:.2f} s to accept them "
            f"({(open_cpu - idle_cpu) / max(1, opened) * 1e3:.2f} ms each)"
        )

        results = await asyncio.gather(*tasks)
        total_s, total_cpu = time.monotonic() - started, tree_cpu_seconds(pid) - idle_cpu
        full = sum(not r.error and r.tokens == args.max_tokens and r.final_tokens == args.max_tokens for r in results)
        print(
            f"{full} of {n} streams completed with {args.max_tokens} tokens and their final message, "
            f"{total_s:.1f} s after the first was opened; gateway CPU {total_cpu:.2f} s in all "
            f"({total_cpu / n * 1e3:.2f} ms per stream, {total_cpu / (n * args.max_tokens) * 1e6:.0f} us per token); "
            f"gateway RSS at the end {rss_bytes(pid) / 2**20:.1f} MiB"
        )
        errors = collections.Counter(r.error for r in results if r.error)
        for error, count in errors.most_common(5):
            print(f"  {count} x {error}")
        short = [r for r in results if not r.error and (r.tokens, r.final_tokens) != (args.max_tokens,) * 2]
        if short:
            print(f"  {len(short)} without the full count, e.g. tokens={short[0].tokens} final={short[0].final_tokens}")
        return full == n
    finally:
        for channel in [*channels, router_channel]:
            await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="streams open at once (default 1000)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per stream (default 16)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--max-num-seqs", type=int, default=0, help="each worker's seats (default: the worker's)")
    parser.add_argument("--channels", type=int, default=1, help="client connections the streams share (default 1)")
    parser.add_argument("--hold-seconds", type=float, default=25.0, help="longest the workers stay stopped")
    parser.add_argument("--timeout", type=float, default=600.0, help="each stream's deadline, seconds")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds a service may take to serve")
    args = parser.parse_args()
    if args.streams < 1 or args.max_tokens < 1 or args.workers < 1 or args.channels < 1:
        parser.error("--streams, --max-tokens, --workers and --channels must be at least 1")
    with running_mesh(args) as mesh:
        print(f"streams: {args.streams} of {args.max_tokens} tokens, {args.workers} worker(s); logs in {mesh.work}")
        ok = asyncio.run(measure(mesh, args))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
