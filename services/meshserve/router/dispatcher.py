"""Admission and dispatch: requests wait in the RequestQueue until a worker has room, best first.

Dispatch runs whenever something changes (an arrival, a finish, a load report) and at least every
`TICK_S` (waiting raises rank). A request goes only to a worker with room, so priority is decided
here and not lost in a worker's queue. CRITICAL and HIGH requests may overflow a full worker by
`OVERFLOW` sequences: the worker's engine then preempts its lowest-priority running sequence.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from meshserve.common.errors import MeshError
from meshserve.router.queue import Pending, RequestQueue, class_name
from meshserve.router.workers import WorkerEndpoint, WorkerPool
from meshserve.v1 import common_pb2

log = logging.getLogger(__name__)

TICK_S = 0.1
DEADLINE_SLACK_S = 0.05  # a cancellation this close to the deadline is the deadline
OVERFLOW = 2
OVERFLOW_CLASSES = (common_pb2.PRIORITY_CRITICAL, common_pb2.PRIORITY_HIGH)


class Dispatcher:
    def __init__(self, queue: RequestQueue, pool: WorkerPool) -> None:
        self.queue = queue
        self.pool = pool
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.dispatched = 0
        self.deadline_exceeded = 0
        self.failovers = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._dispatch_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def acquire(self, pending: Pending, timeout: float | None) -> WorkerEndpoint:
        """Queues the request and waits for a worker (counted in flight on it until release())."""
        self.queue.push(pending)
        self.wake()
        deadline = time.monotonic() + timeout if timeout is not None else None
        try:
            return await asyncio.wait_for(asyncio.shield(pending.assigned), timeout)
        except asyncio.CancelledError:
            # gRPC cancels the call when its deadline passes, often just before our own timer fires.
            if deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S:
                self.deadline_exceeded += 1
            raise
        except TimeoutError:
            self.deadline_exceeded += 1
            waited = time.monotonic() - pending.enqueued_at
            raise MeshError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the deadline passed after {waited:.2f}s in the {class_name(pending.priority)} queue, "
                "before a worker had room; it never reached one",
            ) from None
        finally:
            if not pending.assigned.done():
                self.queue.remove(pending)
                pending.assigned.cancel()
            elif not pending.assigned.cancelled() and pending.assigned.exception() is None:
                worker = pending.assigned.result()
                if asyncio.current_task().cancelling():  # the caller left right as it was dispatched
                    self.release(worker)

    def release(self, worker: WorkerEndpoint) -> None:
        worker.in_flight -= 1
        self.wake()

    async def _dispatch_forever(self) -> None:
        while True:
            try:
                async with asyncio.timeout(TICK_S):  # no inner task to outlive a cancelled loop
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                self.dispatch()
            except Exception:  # the loop must outlive any one bad request
                log.exception("dispatch failed")

    def dispatch(self) -> None:
        """Sends the best waiting requests to workers until the best one (per model) finds no room."""
        blocked: set[str] = set()  # a model whose best request found no room: nothing behind it may pass
        now = time.monotonic()
        while self.queue:
            # Checked first so that a full mesh costs no pass over the queue.
            if not any(w.has_room(OVERFLOW) for w in self.pool.workers):
                return
            only = None if any(w.has_room() for w in self.pool.workers) else OVERFLOW_CLASSES
            pending = self.queue.best(blocked, now, only)
            if pending is None:
                return
            overflow = OVERFLOW if pending.priority in OVERFLOW_CLASSES else 0
            worker = self.pool.choose(pending.request, overflow)
            if worker is None:
                blocked.add(pending.request.model)
                continue
            self.queue.dispatched(pending)
            worker.in_flight += 1
            worker.dispatched += 1
            self.dispatched += 1
            pending.assigned.set_result(worker)
