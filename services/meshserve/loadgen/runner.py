"""Runs load levels against a target and keeps every request's record: the Python API of `meshserve bench`.

    async with GrpcTarget("127.0.0.1:50051") as target:
        result = await run_level(target, Workload(output_tokens=parse_length("48")), LoadLevel(concurrency=8,
                                 duration=30))
    result.records   # one RequestRecord per request: status, TTFT, inter-token latencies, token ids
    result.summary   # tok/s, req/s, errors by status, percentiles

A soak test calls run_level while it injects faults, then checks each record's token ids.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable

from meshserve.loadgen.levels import LoadLevel
from meshserve.loadgen.records import RequestRecord, record_of
from meshserve.loadgen.results import LevelResult
from meshserve.loadgen.target import Target
from meshserve.loadgen.workload import Workload

OnRecord = Callable[[RequestRecord], None]
# After a failure a closed-loop slot waits this long before its next request: a target that fails at once
# (refused connections) must not be hammered with thousands of requests a second.
FAILED_PAUSE_S = 0.1


async def run_level(
    target: Target, workload: Workload, level: LoadLevel, on_record: OnRecord | None = None
) -> LevelResult:
    """Sends the level's load until its duration or request count runs out, waits for what is in flight, and
    returns every request's record (in the order sent). `on_record` sees each one as it ends."""
    result = LevelResult(level)
    start = time.perf_counter()
    deadline = start + level.duration if level.duration is not None else math.inf
    budget = level.requests if level.requests is not None else math.inf
    sent = 0

    def may_send() -> bool:
        return sent < budget and time.perf_counter() < deadline

    async def one() -> RequestRecord:
        request = workload.next_request()
        record = record_of(request, await target.send(request), start)
        result.records.append(record)
        if on_record is not None:
            on_record(record)
        return record

    if level.concurrency is not None:

        async def slot() -> None:
            nonlocal sent
            while may_send():
                sent += 1
                if not (await one()).ok:
                    await asyncio.sleep(FAILED_PAUSE_S)

        await asyncio.gather(*(slot() for _ in range(level.concurrency)))
    else:
        assert level.rate is not None
        # Arrivals of their own generator: the same seed gives the same schedule, whatever the server does.
        arrivals = random.Random(f"{workload.seed}:arrivals:{level.rate}")
        in_flight: set[asyncio.Task[RequestRecord]] = set()
        next_at = start
        try:
            while may_send():
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                if time.perf_counter() >= deadline:
                    break
                sent += 1
                task = asyncio.create_task(one())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                next_at += arrivals.expovariate(level.rate)
            await asyncio.gather(*in_flight)
        finally:  # cancelled (Ctrl-C): so is every request in flight
            for task in in_flight:
                task.cancel()
    result.wall = time.perf_counter() - start
    result.records.sort(key=lambda record: record.request.number)  # the order they were sent
    return result


async def run_levels(
    target: Target, workload: Workload, levels: list[LoadLevel], on_record: OnRecord | None = None
) -> list[LevelResult]:
    """Each level in turn, one workload across them (request numbers, so prompts, never repeat)."""
    return [await run_level(target, workload, level, on_record) for level in levels]


async def warm_up(target: Target, workload: Workload, requests: int) -> list[RequestRecord]:
    """`requests` requests at once, before measuring (a server may compile or allocate on first use)."""
    start = time.perf_counter()
    specs = [workload.next_request() for _ in range(requests)]
    replies = await asyncio.gather(*(target.send(spec) for spec in specs))
    return [record_of(spec, reply, start) for spec, reply in zip(specs, replies, strict=True)]
