"""Many streams: one gateway holds 1,000 concurrent GenerateStream calls on loopback, every one ends with its full
token count and no error, and the memory each open stream costs is measured and printed (`pytest -s`).

The mesh runs in this process (support.py): two workers, a router, an aggregator and a gateway. The streams come
from the test's own asyncio loop, on one grpc.aio channel. To have all 1,000 open at the same moment, whatever the
machine's speed, they are opened while no worker is up: the gateway forwards each to the router, whose queue holds
it (the gateway's catalog keeps the model it saw). Once the router holds all of them, memory is sampled, the workers
come back on their ports, the router reconnects and every stream runs to its end.

Limits that could refuse the load, none of which needs changing: the router queues at most RouterConfig.max_queued
(1,024 by default) requests, above the 1,000 waiting here; the gateway's anonymous tenant (no keys file, loopback)
has no requests/s or tokens/min limit; the services' grpc servers set no maximum_concurrent_rpcs, and one client
connection carries all 1,000 streams.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from meshserve.common.channels import wait_until_serving
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc
from support import (
    HOST,
    TEST_DTYPE,
    EventLoopThread,
    free_ports,
    in_process,
    in_process_router,
    router_stub,
    wait_for,
    wait_for_workers_up,
    worker_stats,
)

STREAMS = 1000
MAX_TOKENS = 8
WORKERS = 2
SEATS = 32  # per worker: 64 sequences decode at once, the rest wait in the router's queue
TOTAL_S = 240.0  # the streams' part, opening to the last token; the test's own 300 s timeout covers the rest
OPEN_S = 120.0  # for the router to hold every stream
# Opened in waves, each once the router holds the last: a server cancels a call that waits 30 s for its handler
# to start (grpc's server_max_unrequested_time_in_server), and one event loop runs every service here, the
# workers' included, with tracemalloc on. The streams are open together all the same.
OPEN_WAVE = 250
TRACE_FRAMES = 16  # deep enough that an allocation made under the gateway's code has a gateway frame
# Generous: a stream's three ends (client, gateway, router) cost a few tens of KiB; 1 MiB would be a leak.
SANE_BYTES_PER_STREAM = 1024 * 1024


@dataclass
class StreamResult:
    tokens: int = 0
    finish_reason: int = 0
    final_usage: common_pb2.Usage | None = None
    error: str = ""


@dataclass
class MemorySample:
    """What opening every stream (all held in the router's queue) added to this process."""

    rss_bytes: int  # VmRSS growth of the whole process, less tracemalloc's own bookkeeping
    traced_bytes: dict[str, int]  # Python-heap growth (tracemalloc) by who allocated it (OWNERS, else "other")


# Whose an allocation is: the innermost frame of its traceback in one of these.
OWNERS = {
    "gateway": f"{os.sep}meshserve{os.sep}gateway{os.sep}",
    "router": f"{os.sep}meshserve{os.sep}router{os.sep}",
    "client": __file__,
}


def traced_by_owner(snapshot: tracemalloc.Snapshot) -> dict[str, int]:
    sizes = dict.fromkeys([*OWNERS, "other"], 0)
    for trace in snapshot.traces:
        owner = next(
            (o for frame in reversed(trace.traceback) for o, path in OWNERS.items() if path in frame.filename),
            "other",
        )
        sizes[owner] += trace.size
    return sizes


def request(i: int) -> inference_pb2.GenerateRequest:
    """Greedy, exactly MAX_TOKENS tokens (EOS ignored); a prompt of its own (no prefix shared with another)."""
    prompt = [10 + i % 100, 200 + i // 100, 300 + i % 7, 400 + i % 11]
    sampling = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=prompt), sampling=sampling)


@contextmanager
def workers_on(loop_thread: EventLoopThread, ports: Sequence[int]) -> Iterator[list[Any]]:
    """In-process workers on these ports (the router is told of them by address, so they can come back on them)."""
    from meshserve.common.config import WorkerConfig
    from meshserve.worker.server import start_worker

    with ExitStack() as stack:
        yield [
            stack.enter_context(
                in_process(
                    loop_thread,
                    start_worker(
                        WorkerConfig(host=HOST, port=p, max_num_seqs=SEATS, threads=1, dtype=TEST_DTYPE, metrics_port=0)
                    ),
                )
            )
            for p in ports
        ]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def queued(stub: router_pb2_grpc.RouterStub) -> int:
    return sum(q.queued for q in stub.Stats(router_pb2.RouterStatsRequest(), timeout=5).queues)


async def one_stream(stub: inference_pb2_grpc.InferenceStub, i: int) -> StreamResult:
    result = StreamResult()
    try:
        call = stub.GenerateStream(request(i), timeout=TOTAL_S)
        async for message in call:
            if message.final:
                result.final_usage = message.usage
            else:
                result.tokens += len(message.token_ids)
                result.finish_reason = message.finish_reason or result.finish_reason
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    return result


async def streams_through_one_gateway(
    gateway: str, router: router_pb2_grpc.RouterStub, bring_workers_back: Callable[[], Awaitable[None]]
) -> tuple[list[StreamResult], MemorySample, dict[str, float]]:
    """Opens STREAMS streams while no worker is up; samples memory once the router holds them all; brings the
    workers back; returns every stream's result, the memory sample and how long each phase took."""
    async with grpc.aio.insecure_channel(gateway) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = inference_pb2_grpc.InferenceStub(channel)
        # Both, for neither alone is the gateway's: in-process services share this process, so its RSS counts each
        # stream's client, gateway and router ends (bench/streams.py reads a gateway process's own RSS);
        # tracemalloc counts Python objects only (not grpc's C core, nor protobuf's arenas) and tells whose they
        # are by the frames they were allocated under. The gateway's share is then a lower bound: grpc calls the
        # servicer from Cython, which leaves no Python frame, so some of its allocations count as "other".
        gc.collect()  # garbage of the stopped workers (their KV caches) must not be freed mid-sample
        rss_before = rss_bytes()
        tracemalloc.start(TRACE_FRAMES)
        started = time.monotonic()
        tasks: list[asyncio.Task[StreamResult]] = []
        for wave in range(0, STREAMS, OPEN_WAVE):
            tasks += [asyncio.create_task(one_stream(stub, i)) for i in range(wave, min(STREAMS, wave + OPEN_WAVE))]
            while (holding := queued(router)) < len(tasks) and not any(t.done() for t in tasks):  # done: failed
                assert time.monotonic() - started < OPEN_S, f"the router held {holding} of {STREAMS} after {OPEN_S:g} s"
                await asyncio.sleep(0.2)
        open_s = time.monotonic() - started
        snapshot = tracemalloc.take_snapshot()
        rss_after = rss_bytes() - tracemalloc.get_tracemalloc_memory()
        tracemalloc.stop()
        memory = MemorySample(rss_after - rss_before, traced_by_owner(snapshot))
        del snapshot
        back = time.monotonic()
        await bring_workers_back()
        back_s = time.monotonic() - back
        results = await asyncio.gather(*tasks)
        return results, memory, {"open_s": open_s, "workers_back_s": back_s, "total_s": time.monotonic() - started}


def test_one_gateway_holds_1000_streams_to_their_last_token(
    loop_thread: EventLoopThread, model_dir: Path, record_property: Callable[[str, object], None]
) -> None:
    from meshserve.aggregator.server import start_aggregator
    from meshserve.common.config import AggregatorConfig, GatewayConfig
    from meshserve.gateway.server import start_gateway

    ports = free_ports(WORKERS)
    with ExitStack() as stack:
        later_workers = stack.enter_context(ExitStack())  # stopped last, after the services that call them
        first_workers = stack.enter_context(ExitStack())
        first_workers.enter_context(workers_on(loop_thread, ports))
        router = stack.enter_context(in_process_router(loop_thread, ",".join(f"{HOST}:{p}" for p in ports)))
        stats = router_stub(router.address)
        wait_for_workers_up(stats, WORKERS)
        aggregator = stack.enter_context(
            in_process(loop_thread, start_aggregator(AggregatorConfig(host=HOST, port=0, router=router.address)))
        )
        # The catalog, once it lists the model, keeps it while no worker is up; an hour: no re-read mid-test.
        config = GatewayConfig(
            host=HOST,
            port=0,
            router=router.address,
            aggregator=aggregator.address,
            http_port=-1,
            model_refresh_seconds=3600,
        )
        gateway = stack.enter_context(in_process(loop_thread, start_gateway(config)))
        assert wait_until_serving(gateway.address, timeout=60), "the gateway never reported SERVING"
        first_workers.close()
        wait_for(lambda: not any(w.up for w in worker_stats(stats).values()), "the router to see no worker up")

        async def bring_workers_back() -> None:
            await asyncio.to_thread(later_workers.enter_context, workers_on(loop_thread, ports))

        results, memory, times = asyncio.run(
            asyncio.wait_for(streams_through_one_gateway(gateway.address, stats, bring_workers_back), TOTAL_S)
        )

    errors = collections.Counter(r.error for r in results if r.error)
    kib = {"rss": memory.rss_bytes / STREAMS / 1024}
    kib |= {f"python_{owner}": size / STREAMS / 1024 for owner, size in memory.traced_bytes.items()}
    heap = ", ".join(f"{owner} {kib[f'python_{owner}']:.1f}" for owner in memory.traced_bytes)
    print(
        f"\n{STREAMS} streams open through one gateway after {times['open_s']:.1f} s, the workers back after "
        f"{times['workers_back_s']:.1f} s more, all done after {times['total_s']:.1f} s. KiB per open stream: "
        f"process RSS {kib['rss']:.1f} (its client, gateway and router ends, all in this process); Python heap "
        f"{sum(memory.traced_bytes.values()) / STREAMS / 1024:.1f}, by the frames that allocated it: {heap}"
    )
    for name, value in {**{f"{k}_kib_per_open_stream": v for k, v in kib.items()}, **times}.items():
        record_property(name, round(value, 2))

    assert not errors, f"{sum(errors.values())} of {STREAMS} streams failed: {errors.most_common(5)}"
    wrong = [(i, r.tokens, r.final_usage) for i, r in enumerate(results) if r.tokens != MAX_TOKENS]
    assert not wrong, f"{len(wrong)} streams did not get {MAX_TOKENS} tokens, e.g. {wrong[:5]}"
    assert all(r.finish_reason == common_pb2.FINISH_REASON_LENGTH for r in results)
    unfinished = [i for i, r in enumerate(results) if r.final_usage is None]
    assert not unfinished, f"{len(unfinished)} streams ended without their final message, e.g. {unfinished[:5]}"
    assert all(r.final_usage.completion_tokens == MAX_TOKENS for r in results)  # type: ignore[union-attr]
    assert sum(memory.traced_bytes.values()) / STREAMS < SANE_BYTES_PER_STREAM, memory
