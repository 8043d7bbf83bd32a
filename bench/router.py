"""The router's cost, in one run: scheduling overhead per request with 1,000 queued, and tokens/s through it.

    python bench/router.py [--queued 1000] [--concurrency 16] [--max-tokens 64]

1. Scheduling: 1,000 requests (mixed classes and tenants) wait before a real worker whose seats
   are full; each finish frees one seat and the dispatcher picks the next request. Prints
   microseconds of router CPU per dispatched request.
2. The hop: the same streams sent straight to a worker and through the router (both real gRPC
   servers on 127.0.0.1, built-in model); prints both tokens/s and the share lost.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from meshserve.common.channels import aio_channel
from meshserve.common.config import RouterConfig, WorkerConfig
from meshserve.common.enums import PRIORITY_CLASSES
from meshserve.router.discovery import parse_sources
from meshserve.router.dispatcher import Dispatcher
from meshserve.router.queue import Pending, RequestQueue
from meshserve.router.server import start_router
from meshserve.router.workers import WorkerPool
from meshserve.v1 import common_pb2, router_pb2_grpc, worker_pb2_grpc
from meshserve.worker.server import start_worker


async def scheduling_overhead(worker_address: str, queued: int) -> float:
    """Microseconds per dispatch with `queued` requests waiting, against a real worker's live load reports.

    The worker's seats are first filled; then each release() (a request finishing) frees one seat
    and dispatch() picks the next request, as after every finish in a busy mesh. The dispatched
    requests are never sent: this measures the router's choice only.
    """
    rng = random.Random(0)
    dispatcher: Dispatcher | None = None
    pool = WorkerPool(parse_sources(worker_address), on_change=lambda: dispatcher.wake() if dispatcher else None)
    dispatcher = Dispatcher(RequestQueue(max_queued=queued, aging_seconds=5.0), pool)
    await pool.start()
    try:
        worker = pool.workers[0]
        for _ in range(1000):  # its first load report arrives within a few ms
            if worker.up:
                break
            await asyncio.sleep(0.01)
        else:
            raise SystemExit(f"no load report from the worker at {worker_address} within 10 s")
        for i in range(queued):
            request = common_pb2.TokenRequest(
                prompt_token_ids=[rng.randrange(1000) for _ in range(rng.randint(10, 400))],
                priority=rng.choice(PRIORITY_CLASSES),
                tenant=f"tenant{rng.randrange(8)}",
                request_id=str(i),
            )
            request.sampling.max_tokens = rng.randint(16, 512)
            dispatcher.queue.push(Pending.of(request))
        dispatcher.dispatch()  # fills the worker's seats (CRITICAL and HIGH may overflow them)
        before = dispatcher.dispatched
        start = time.perf_counter()
        for _ in range(2 * queued):  # bounded: each release frees a seat, most dispatch one request
            if not dispatcher.queue:
                break
            dispatcher.release(worker)  # one request finished
            dispatcher.dispatch()
        elapsed = time.perf_counter() - start
        assert len(dispatcher.queue) == 0 and dispatcher.dispatched == queued
        return elapsed / (dispatcher.dispatched - before) * 1e6
    finally:
        await pool.close()


async def stream_tokens(
    client: worker_pb2_grpc.WorkerStub | router_pb2_grpc.RouterStub, concurrency: int, max_tokens: int
) -> float:
    """Tokens/s of `concurrency` greedy streams through `client` (the worker itself, or the router)."""
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> int:
        request = common_pb2.TokenRequest(prompt_token_ids=[5 + i, 6, 7, 8], sampling=sampling)
        tokens = 0
        async for chunk in client.Generate(request, timeout=600):
            tokens += len(chunk.token_ids)
        return tokens

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return sum(counts) / (time.perf_counter() - start)


async def hop_cost(worker_address: str, router_address: str, concurrency: int, max_tokens: int) -> tuple[float, float]:
    worker_channel, router_channel = aio_channel(worker_address), aio_channel(router_address)
    try:
        worker = worker_pb2_grpc.WorkerStub(worker_channel)  # grpcio's name for a generated client
        router = router_pb2_grpc.RouterStub(router_channel)
        await stream_tokens(worker, 2, 4)  # warm-up: model, channels, first compilations
        await stream_tokens(router, 2, 4)
        direct = await stream_tokens(worker, concurrency, max_tokens)
        routed = await stream_tokens(router, concurrency, max_tokens)
        return direct, routed
    finally:
        await worker_channel.close()
        await router_channel.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    worker = await start_worker(WorkerConfig(host="127.0.0.1", port=0, max_num_seqs=args.concurrency, threads=1))
    router = await start_router(RouterConfig(host="127.0.0.1", port=0, workers=worker.address))
    try:
        overhead = await scheduling_overhead(worker.address, args.queued)
        print(f"scheduling with {args.queued} queued: {overhead:.0f} us of router CPU per dispatched request")
        direct, routed = await hop_cost(worker.address, router.address, args.concurrency, args.max_tokens)
        print(
            f"{args.concurrency} streams x {args.max_tokens} tokens: worker direct {direct:.0f} tok/s, "
            f"through the router {routed:.0f} tok/s ({1 - routed / direct:+.1%} lost)"
        )
    finally:
        await router.stop(0)
        await worker.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
