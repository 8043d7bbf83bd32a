"""Admission and dispatch: requests wait in the RequestQueue until a worker has room, best first.

Admission (acquire) refuses at once what cannot go well: a BATCH or LOW request while a more urgent class
keeps missing its objective with lower classes already held back (router/holdback.py), and a request whose
deadline is shorter than its predicted time to first token (router/ttft_model.py), which never reaches a
worker. The rest queue.

Dispatch runs whenever something changes (an arrival, a finish, a load report) and at least every
`TICK_S` (waiting raises rank); a CRITICAL or HIGH arrival is dispatched in the call that queues it, not
on the loop's next turn. A request goes only to a worker with room for its class, so priority is decided
here and not lost in a worker's queue. CRITICAL and HIGH requests may overflow a full worker by
`OVERFLOW` sequences: the worker's engine then gives it the seat of its lowest-priority running
sequence. Lower classes may be held back from some seats while a more urgent class nears its objective.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

import grpc

from meshserve.common.enums import PRIORITY_CLASSES
from meshserve.common.errors import MeshError
from meshserve.common.objectives import RecentLatencies
from meshserve.router.holdback import HoldBack
from meshserve.router.queue import Pending, RequestQueue, class_name
from meshserve.router.ttft_model import Prediction, SeatView, TtftModel
from meshserve.router.workers import WorkerEndpoint, WorkerPool
from meshserve.v1 import common_pb2

log = logging.getLogger(__name__)

TICK_S = 0.1
DEADLINE_SLACK_S = 0.05  # a cancellation this close to the deadline is the deadline
OVERFLOW = 2
OVERFLOW_CLASSES = (common_pb2.PRIORITY_CRITICAL, common_pb2.PRIORITY_HIGH)
RECENT_WINDOW_S = 10.0  # "recent" TTFTs: at most this old, at most RECENT_SAMPLES per class
RECENT_SAMPLES = 256
DEFAULT_BATCHED_TOKENS = 512  # a worker's step budget when its report does not say


class Dispatcher:
    def __init__(self, queue: RequestQueue, pool: WorkerPool, objectives: dict[int, float] | None = None) -> None:
        self.queue = queue
        self.pool = pool
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.dispatched = 0
        self.deadline_exceeded = 0
        self.deadline_refused = 0
        self.failovers = 0
        self.recent_ttft = RecentLatencies(RECENT_WINDOW_S, RECENT_SAMPLES)
        self.holdback = HoldBack(objectives or {}, self.recent_ttft)
        self.model = TtftModel()
        self.running: dict[str, set[Pending]] = defaultdict(set)  # worker address -> this router's requests on it

    def start(self) -> None:
        self._task = asyncio.create_task(self._dispatch_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    def admit(self, pending: Pending, timeout: float | None) -> None:
        """Refuses, with the reason, a request that is to be shed or cannot meet its deadline; notes the TTFT
        predicted for the rest."""
        self.holdback.update(self._oldest_waits)
        shed = self.holdback.shed_error(pending.priority)
        if shed is not None:
            raise shed
        pending.prediction = self.predict(pending)
        if timeout is not None and pending.prediction is not None and pending.prediction.seconds > timeout:
            self.deadline_refused += 1
            self.deadline_exceeded += 1
            raise MeshError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"refused on arrival: the predicted time to first token of this {class_name(pending.priority)} "
                f"request is {pending.prediction.describe()}, longer than the {timeout:.3f} s left to its "
                "deadline; it never reached a worker",
            )

    async def acquire(self, pending: Pending, timeout: float | None) -> WorkerEndpoint:
        """Queues the request and waits for a worker (counted in flight on it until release())."""
        self.queue.push(pending)
        if pending.priority in OVERFLOW_CLASSES:
            self.dispatch()  # now: one turn of a loop busy relaying streams is a wait of its own
        else:
            self.wake()
        deadline = time.monotonic() + timeout if timeout is not None else None
        try:
            if pending.assigned.done():
                return pending.assigned.result()
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
                    self.release(worker, pending)

    def release(self, worker: WorkerEndpoint, pending: Pending | None = None) -> None:
        worker.in_flight -= 1
        if pending is not None:
            self.running[worker.address].discard(pending)
        self.wake()

    def first_token(self, pending: Pending, ttft: float) -> float | None:
        """A request's first token reached its caller `ttft` after it arrived: returns the prediction's error."""
        self.recent_ttft.observe(pending.priority, ttft)
        waited = (pending.dispatched_at or pending.enqueued_at) - pending.enqueued_at
        return self.model.observed(pending, ttft, waited)

    def predict(self, pending: Pending) -> Prediction | None:
        """Its time to first token if it were queued now (None while nothing is known of the workers' steps)."""
        model = pending.request.model
        views = [
            SeatView(
                limit=w.load.max_num_seqs + self._extra_seats(w, pending.priority),
                busy=w.busy,
                step_seconds=w.load.step_seconds,
                max_num_batched_tokens=w.load.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS,
                ours=list(self.running[w.address]),
            )
            for w in self.pool.workers
            if w.up and w.load is not None and (not model or (w.model is not None and w.model.name == model))
        ]
        return self.model.predict(pending, self.queue.ahead_of(pending), views)

    def _extra_seats(self, worker: WorkerEndpoint, priority: int) -> int:
        """Seats past the worker's max_num_seqs a request of this class may take (negative: held free)."""
        overflow = OVERFLOW if priority in OVERFLOW_CLASSES else 0
        max_num_seqs = worker.load.max_num_seqs if worker.load is not None else 0
        return overflow - self.holdback.held_seats(priority, max_num_seqs)

    def _oldest_waits(self) -> dict[int, float]:
        return {priority: oldest for priority, (_, oldest) in self.queue.stats().items()}

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
        if not self.queue:
            return
        self.holdback.update(self._oldest_waits)
        blocked: set[str] = set()  # a model whose best request found no room: nothing behind it may pass
        now = time.monotonic()
        while self.queue:
            # Classes some worker has room for, checked first so that a full mesh costs no pass over the queue.
            open_classes = tuple(
                c for c in PRIORITY_CLASSES if any(w.has_room(self._extra_seats(w, c)) for w in self.pool.workers)
            )
            if not open_classes:
                return
            only = None if len(open_classes) == len(PRIORITY_CLASSES) else open_classes
            pending = self.queue.best(blocked, now, only)
            if pending is None:
                return
            worker = self.pool.choose(pending.request, lambda w, p=pending.priority: self._extra_seats(w, p))
            if worker is None:
                blocked.add(pending.request.model)
                continue
            self.queue.dispatched(pending)
            worker.in_flight += 1
            worker.dispatched += 1
            self.dispatched += 1
            pending.dispatched_at = now
            self.running[worker.address].add(pending)
            pending.assigned.set_result(worker)
