"""What each hop costs, in one run: the same load straight into a worker, through the router, and through
gateway + router, all on the built-in model.

    python bench/hops.py                                      # levels 16,64,256, 10 s per run, 2 repeats
    python bench/hops.py --levels 16,64 --seconds 5 --repeat 1  # a short trial

The worker, router and gateway run as separate processes (`python -m meshserve.cli SERVICE`, free loopback
ports; the worker with one torch thread). Load: per level, that many closed-loop streams (each sends its next
request when the previous one ends) for --seconds (in-flight ones finish), every prompt unique (token ids,
no prefix shared with any other), greedy, --max-tokens each with ignore_eos. It goes three ways:

  worker   over one Worker.Connect stream held by a WorkerLink (meshserve.router.link), as the router holds
           it; like the router, at most the worker's max_num_seqs sequences are sent to it at once
  router   Router.Generate over gRPC
  gateway  Inference.GenerateStream over gRPC (token_ids prompts), gateway -> router -> worker

A warm-up run of each path comes first; then per repeat and level the three paths run in turn, the order
reversed every other time, so this machine's drift spreads over all three. Only numbers from one run
mean something; nothing here is checked against a fixed time.

Printed per path and level (pooled over the repeats): output tok/s, TTFT p50, ITL p50 and p99 (per token:
the gap since the previous message, divided by the tokens in the message, once for each of them), TPOT p50
(per request: (last message - first) / the tokens after the first message; a hop that joins tokens into
fewer messages lowers the ITL percentiles without being faster, TPOT shows it), and CPU
seconds per 1,000 output tokens of each service's process tree (from /proc/PID/stat deltas over each run)
and of this client. Then per level: the ITL p50/p99 (and TPOT p50) the router hop adds (router - worker) and the gateway
hop adds (gateway - router), the share of tok/s each hop loses ((worker - router) / worker, ...), and
whether the gateway's and router's CPU per 1k tokens together are below the worker's (on the gateway path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from processes import HOST, free_port_block, spawn, stop_process_group, tree_cpu_seconds

from meshserve.cli.launcher import child_env
from meshserve.common.channels import aio_channel, wait_until_serving
from meshserve.common.errors import MeshError
from meshserve.loadgen.results import percentile
from meshserve.router.link import WorkerLink
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2_grpc, worker_pb2, worker_pb2_grpc

PATHS = ("worker", "router", "gateway")
SERVICES = ("worker", "router", "gateway")
PROMPT_TOKENS = 24
TIMEOUT_S = 600.0

# One request: the token ids of each message of its stream, as they come.
Send = Callable[[list[int]], AsyncIterator[Sequence[int]]]


@dataclass
class Run:
    """One path at one level, one repeat."""

    path: str
    level: int
    wall: float = 0.0
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)  # seconds, per request
    itl: list[float] = field(default_factory=list)  # seconds, per token after a request's first message
    tpot: list[float] = field(default_factory=list)  # seconds, per request: the mean of its itl
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds over the run: each service, and "client"


class Prompts:
    """Token-id prompts no two alike from their first token on (the prefix cache never shares a block)."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab = vocab_size - 3  # ids 3 and up: clear of the usual special tokens
        self.rng = random.Random(seed)
        self.sent = 0

    def next(self) -> list[int]:
        n, self.sent = self.sent, self.sent + 1
        head = [3 + n % self.vocab, 3 + (n // self.vocab) % self.vocab]
        return head + [3 + self.rng.randrange(self.vocab) for _ in range(PROMPT_TOKENS - 2)]


@dataclass
class Mesh:
    """The three services as processes, and this client's way into each."""

    processes: dict[str, subprocess.Popen[bytes]]
    addresses: dict[str, str]
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    link: WorkerLink | None = None
    link_task: asyncio.Task[None] | None = None
    load: worker_pb2.LoadReport | None = None
    info: common_pb2.ModelInfo | None = None
    seats: asyncio.Semaphore | None = None
    sends: dict[str, Send] = field(default_factory=dict)


def start_services(work: Path, args: argparse.Namespace) -> tuple[dict[str, subprocess.Popen[bytes]], dict[str, str]]:
    """Starts worker, router and gateway, each in a process group of its own; waits until all are SERVING."""
    base = free_port_block(4)
    ports = {"worker": base, "router": base + 1, "gateway": base + 2}
    unused_aggregator = f"{HOST}:{base + 3}"  # the gateway wants an address; n = 1 never calls it
    addresses = {name: f"{HOST}:{port}" for name, port in ports.items()}
    cli = [sys.executable, "-m", "meshserve.cli"]
    common = ["--host", HOST, "--metrics-port", "0", "--drain-seconds", "2"]
    worker = ["--threads", str(args.threads), "--dtype", args.dtype, "--stream-interval", str(args.stream_interval)]
    if args.max_num_seqs:
        worker += ["--max-num-seqs", str(args.max_num_seqs)]
    gateway = ["--router", addresses["router"], "--aggregator", unused_aggregator]
    commands = {
        "worker": [*cli, "worker", "--port", str(ports["worker"]), *common, *worker],
        "router": [*cli, "router", "--port", str(ports["router"]), *common, "--workers", addresses["worker"]],
        "gateway": [*cli, "gateway", "--port", str(ports["gateway"]), *common, "--http-port", "-1", *gateway],
    }
    processes = {name: spawn(command, child_env(), work / f"{name}.log") for name, command in commands.items()}
    for name in SERVICES:  # the worker first: it loads and compiles the model before it says SERVING
        if not wait_until_serving(addresses[name], timeout=args.start_timeout):
            stop_all(processes)
            tail = "\n".join((work / f"{name}.log").read_text(errors="replace").splitlines()[-20:])
            raise SystemExit(f"hops: the {name} was not SERVING after {args.start_timeout:.0f} s:\n{tail}")
    return processes, addresses


def stop_all(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for name in reversed(SERVICES):
        if name in processes:
            stop_process_group(processes[name], grace=15)


async def connect(mesh: Mesh, max_tokens: int) -> None:
    """Channels to the three services; the worker's stream opened with a WorkerLink, as the router does."""
    worker_channel, router_channel, gateway_channel = (aio_channel(mesh.addresses[n]) for n in SERVICES)
    mesh.channels = [worker_channel, router_channel, gateway_channel]
    worker_stub = worker_pb2_grpc.WorkerStub(worker_channel)
    mesh.info = await worker_stub.DescribeModel(worker_pb2.DescribeModelRequest(), timeout=30)

    def on_load(report: worker_pb2.LoadReport) -> None:
        mesh.load = report

    mesh.link = WorkerLink(worker_stub, on_load)
    mesh.link_task = asyncio.create_task(mesh.link.run())
    for _ in range(1000):
        if mesh.link.open and mesh.load is not None:
            break
        if mesh.link_task.done():
            mesh.link_task.result()  # raises why the stream ended
        await asyncio.sleep(0.01)
    else:
        raise SystemExit("hops: the worker's stream sent no load report within 10 s")
    # The router sends a worker at most max_num_seqs sequences at once and queues the rest; so does this.
    mesh.seats = asyncio.Semaphore(mesh.load.max_num_seqs)
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    router = router_pb2_grpc.RouterStub(router_channel)
    gateway = inference_pb2_grpc.InferenceStub(gateway_channel)
    link, seats = mesh.link, mesh.seats

    async def via_worker(ids: list[int]) -> AsyncIterator[Sequence[int]]:
        async with seats:
            stream = link.submit(common_pb2.TokenRequest(prompt_token_ids=ids, sampling=sampling), TIMEOUT_S)
            try:
                while True:
                    chunk = await stream.next()
                    yield chunk.token_ids
                    if chunk.finish_reason:
                        return
            finally:
                stream.close()

    async def via_router(ids: list[int]) -> AsyncIterator[Sequence[int]]:
        async for chunk in router.Generate(
            common_pb2.TokenRequest(prompt_token_ids=ids, sampling=sampling), timeout=TIMEOUT_S
        ):
            yield chunk.token_ids

    async def via_gateway(ids: list[int]) -> AsyncIterator[Sequence[int]]:
        request = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=ids), sampling=sampling)
        async for message in gateway.GenerateStream(request, timeout=TIMEOUT_S):
            yield message.token_ids

    mesh.sends = {"worker": via_worker, "router": via_router, "gateway": via_gateway}


async def disconnect(mesh: Mesh) -> None:
    if mesh.link_task is not None:
        mesh.link_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await mesh.link_task
    for channel in mesh.channels:
        await channel.close()


async def one_request(send: Send, ids: list[int], run: Run) -> None:
    sent = time.perf_counter()
    first = last = 0.0
    tokens = first_count = 0
    async for token_ids in send(ids):
        if not token_ids:
            continue
        now, count = time.perf_counter(), len(token_ids)
        if not tokens:
            run.ttft.append(now - sent)
            first, first_count = now, count
        else:
            run.itl.extend([(now - last) / count] * count)
        last, tokens = now, tokens + count
    if tokens == 0:
        raise RuntimeError("the stream carried no tokens")
    if tokens > first_count:
        run.tpot.append((last - first) / (tokens - first_count))
    run.requests, run.tokens = run.requests + 1, run.tokens + tokens


async def run_level(mesh: Mesh, path: str, level: int, seconds: float, prompts: Prompts) -> Run:
    """`level` closed-loop streams on `path` for `seconds`; the CPU each service and this client used."""
    run = Run(path, level)
    send = mesh.sends[path]
    start = time.perf_counter()
    deadline = start + seconds

    async def slot() -> None:
        while time.perf_counter() < deadline:
            try:
                await one_request(send, prompts.next(), run)
            except (grpc.aio.AioRpcError, MeshError, RuntimeError) as exc:
                run.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.1)  # a failing path does not spin

    before = cpu_now(mesh)
    await asyncio.gather(*(slot() for _ in range(level)))
    run.wall = time.perf_counter() - start
    run.cpu = {name: after - before[name] for name, after in cpu_now(mesh).items()}
    return run


def cpu_now(mesh: Mesh) -> dict[str, float]:
    cpu = {name: tree_cpu_seconds(mesh.processes[name].pid) for name in SERVICES}
    return cpu | {"client": time.process_time()}


@dataclass
class Pooled:
    """One path at one level over all repeats."""

    runs: list[Run]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.runs)

    @property
    def tok_s(self) -> float:
        wall = sum(r.wall for r in self.runs)
        return self.tokens / wall if wall else float("nan")

    def itl(self, q: float) -> float:
        return percentile([x for r in self.runs for x in r.itl], q)

    def ttft(self, q: float) -> float:
        return percentile([x for r in self.runs for x in r.ttft], q)

    def tpot(self, q: float) -> float:
        return percentile([x for r in self.runs for x in r.tpot], q)

    def cpu_per_1k(self, name: str) -> float:
        return sum(r.cpu[name] for r in self.runs) / self.tokens * 1000 if self.tokens else float("nan")


def report(runs: list[Run], args: argparse.Namespace) -> None:
    pooled = {(p, lv): Pooled([r for r in runs if (r.path, r.level) == (p, lv)]) for p in PATHS for lv in args.levels}
    print(f"\npooled over {args.repeat} repeat(s); ms; CPU: seconds per 1,000 output tokens of each process tree")
    header = f"{'path':<8}{'streams':>8}{'tok/s':>9}{'TTFT p50':>10}{'ITL p50':>9}{'ITL p99':>9}{'TPOT p50':>10}"
    header += "".join(f"{'cpu ' + n:>13}" for n in (*SERVICES, "client")) + f"{'reqs':>7}{'errs':>6}"
    print(header + "\n" + "-" * len(header))
    for level in args.levels:
        for path in PATHS:
            p = pooled[(path, level)]
            row = f"{path:<8}{level:>8}{p.tok_s:>9.1f}{p.ttft(50) * 1e3:>10.1f}"
            row += f"{p.itl(50) * 1e3:>9.2f}{p.itl(99) * 1e3:>9.2f}{p.tpot(50) * 1e3:>10.2f}"
            row += "".join(f"{p.cpu_per_1k(n):>13.3f}" for n in (*SERVICES, "client"))
            print(row + f"{sum(r.requests for r in p.runs):>7}{sum(len(r.errors) for r in p.runs):>6}")
    print("\nper level: what each hop adds (ms) and loses (share of tok/s; each repeat's in brackets)")
    for level in args.levels:
        a, b, c = (pooled[(path, level)] for path in PATHS)
        print(f"  streams {level}:")
        for hop, near, far in (("router hop (router - worker)", a, b), ("gateway hop (gateway - router)", b, c)):
            added = [(far.itl(50) - near.itl(50)) * 1e3, (far.itl(99) - near.itl(99)) * 1e3]
            added.append((far.tpot(50) - near.tpot(50)) * 1e3)
            pairs = zip(near.runs, far.runs, strict=True)
            each = " ".join(f"{1 - f.tokens / f.wall / (n.tokens / n.wall):+.1%}" for n, f in pairs)
            print(
                f"    {hop:<31} ITL p50 {added[0]:+.2f}  ITL p99 {added[1]:+.2f}  TPOT p50 {added[2]:+.2f}"
                f"   tok/s lost {1 - far.tok_s / near.tok_s:+.1%} [{each}]"
            )
        mesh_cpu = c.cpu_per_1k("gateway") + c.cpu_per_1k("router")
        worker_cpu = c.cpu_per_1k("worker")
        verdict = "yes" if mesh_cpu < worker_cpu else "no"
        print(
            f"    gateway + router CPU per 1k tokens < worker CPU per 1k tokens (gateway path): {verdict} "
            f"({c.cpu_per_1k('gateway'):.3f} + {c.cpu_per_1k('router'):.3f} = {mesh_cpu:.3f} s vs {worker_cpu:.3f} s)"
        )


def print_run(run: Run, label: str) -> None:
    p = Pooled([run])
    print(
        f"  {label} {run.path:<8} streams {run.level:>4}: {p.tok_s:8.1f} tok/s, ITL p50 {p.itl(50) * 1e3:.2f} ms, "
        f"{run.requests} requests, {len(run.errors)} errors, {run.wall:.1f} s",
        flush=True,
    )
    for error in sorted(set(run.errors))[:3]:
        print(f"    error: {error}", flush=True)


async def measure(mesh: Mesh, args: argparse.Namespace) -> list[Run]:
    await connect(mesh, args.max_tokens)
    assert mesh.info is not None and mesh.load is not None
    print(f"model {mesh.info.name}, worker seats {mesh.load.max_num_seqs}", flush=True)
    prompts = Prompts(mesh.info.vocab_size)
    try:
        for path in PATHS:  # warm-up: first compilations, channels, the largest batch
            print_run(await run_level(mesh, path, max(args.levels), args.warmup, prompts), "warm-up")
        runs = []
        for repeat in range(args.repeat):
            for index, level in enumerate(args.levels):
                order = PATHS if (repeat + index) % 2 == 0 else PATHS[::-1]
                for path in order:
                    runs.append(await run_level(mesh, path, level, args.seconds, prompts))
                    print_run(runs[-1], f"repeat {repeat + 1}/{args.repeat}")
        return runs
    finally:
        await disconnect(mesh)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="16,64,256", help="concurrent closed-loop streams, one run each")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each run sends new requests this long")
    parser.add_argument("--repeat", type=int, default=2, help="rounds over levels and paths; order alternates")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of the warm-up run of each path")
    parser.add_argument("--threads", type=int, default=1, help="the worker's torch threads")
    parser.add_argument("--dtype", default="auto", help="the worker's --dtype")
    parser.add_argument("--max-num-seqs", type=int, default=0, help="the worker's seats (0: its default)")
    parser.add_argument(
        "--stream-interval", type=int, default=1, help="the worker's --stream-interval (tokens/message)"
    )
    parser.add_argument("--start-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    args.levels = list(dict.fromkeys(int(s) for s in args.levels.split(",") if s))
    if not args.levels or min(args.levels) < 1 or args.repeat < 1 or args.max_tokens < 1:
        parser.error("--levels needs positive integers; --repeat and --max-tokens at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the services' process groups are stopped in `finally`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = Path(tempfile.mkdtemp(prefix="meshserve-hops-"))
    print(
        f"hops: levels {args.levels}, {args.max_tokens} tokens per request (greedy, ignore_eos), {args.seconds:g} s "
        f"per run, {args.repeat} repeat(s); worker --threads {args.threads} --dtype {args.dtype} "
        f"--stream-interval {args.stream_interval}; "
        f"{os.cpu_count()} CPUs; logs in {work}",
        flush=True,
    )
    processes, addresses = start_services(work, args)
    try:
        runs = asyncio.run(measure(Mesh(processes, addresses), args))
    finally:
        stop_all(processes)
    report(runs, args)
    return 0 if not any(r.errors for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
