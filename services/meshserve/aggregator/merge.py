"""Merging several streams into one: items leave as they arrive; a slow stream never holds up a fast one.

Order within each stream is kept because one task pumps each stream into a shared queue in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Yields the items of all streams as they come; order within each stream is kept.

    The first stream to fail cancels the others and its error is raised (fail fast).
    Closing the merged stream early (or cancelling its consumer) cancels every stream.
    """
    async for batch in merge_batches(streams):
        for item in batch:
            yield item


async def merge_batches(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[list[T]]:
    """As merge_streams, but every item that is ready when the consumer asks comes in one list: a consumer
    that was slow can send what piled up as one message."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as exc:
            await queue.put(exc)
        else:
            await queue.put(_DONE)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            ready = [await queue.get()]
            while not queue.empty():
                ready.append(queue.get_nowait())
            batch: list[T] = []
            for item in ready:
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    batch.append(item)  # type: ignore[arg-type]
            if batch:
                yield batch
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
