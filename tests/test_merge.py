from __future__ import annotations

import asyncio
import contextlib

import pytest

from meshserve.aggregator.merge import merge_streams


async def ticking(name: str, delays: list[float], fail_after: int | None = None):
    for i, delay in enumerate(delays):
        await asyncio.sleep(delay)
        if fail_after is not None and i == fail_after:
            raise RuntimeError(f"{name} failed")
        yield (name, i)


def test_fast_stream_is_not_held_up_by_a_slow_one():
    async def main():
        return [item async for item in merge_streams([ticking("slow", [0.2, 0.2]), ticking("fast", [0.01] * 3)])]

    merged = asyncio.run(main())
    assert merged[:3] == [("fast", 0), ("fast", 1), ("fast", 2)]
    assert [i for n, i in merged if n == "slow"] == [0, 1]


def test_first_failure_cancels_the_others():
    cancelled = asyncio.Event()

    async def endless():
        try:
            for _ in range(100_000):  # far longer than the test: only being cancelled ends it in time
                await asyncio.sleep(0.01)
                yield ("endless", 0)
        finally:
            cancelled.set()

    async def main():
        with pytest.raises(RuntimeError, match="bad failed"):
            async for _ in merge_streams([endless(), ticking("bad", [0.05, 0.05], fail_after=1)]):
                pass
        # The endless stream's cleanup runs once its cancellation reaches it: await that, boundedly.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cancelled.wait(), timeout=10)
        return cancelled.is_set()

    assert asyncio.run(main())


def test_items_that_piled_up_while_the_consumer_was_slow_come_as_one_batch():
    from meshserve.aggregator.merge import merge_batches

    async def main():
        batches = []
        async for batch in merge_batches([ticking("a", [0.0] * 5), ticking("b", [0.0] * 5)]):
            batches.append(batch)
            await asyncio.sleep(0.05)  # a slow consumer: everything else is ready meanwhile
        return batches

    batches = asyncio.run(main())
    items = [item for batch in batches for item in batch]
    assert sorted(items) == sorted([(n, i) for n in "ab" for i in range(5)])
    assert [i for n, i in items if n == "a"] == list(range(5))  # order within each stream kept
    assert len(batches) <= 3, batches
