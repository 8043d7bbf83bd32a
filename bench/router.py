"""The router's scheduling overhead per request with 1,000 queued, in one run.

    python bench/router.py [--queued 1000] [--seats 16]

1,000 requests (mixed classes and tenants) wait before a real worker (a gRPC server on 127.0.0.1,
built-in model, its load reports over its one stream to the router) whose seats are full; each finish
frees one seat and the dispatcher picks the next request. Prints microseconds of router CPU per
dispatched request.

The router hop itself (tokens/s and inter-token latency straight into a worker, through the router,
and through gateway + router) is measured by bench/hops.py.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from meshserve.common.config import WorkerConfig
from meshserve.common.enums import PRIORITY_CLASSES
from meshserve.router.discovery import parse_sources
from meshserve.router.dispatcher import Dispatcher
from meshserve.router.queue import Pending, RequestQueue
from meshserve.router.workers import WorkerPool
from meshserve.v1 import common_pb2
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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--seats", type=int, default=16, help="the worker's max_num_seqs")
    args = parser.parse_args()
    worker = await start_worker(WorkerConfig(host="127.0.0.1", port=0, max_num_seqs=args.seats, threads=1))
    try:
        overhead = await scheduling_overhead(worker.address, args.queued)
        print(f"scheduling with {args.queued} queued: {overhead:.0f} us of router CPU per dispatched request")
    finally:
        await worker.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
