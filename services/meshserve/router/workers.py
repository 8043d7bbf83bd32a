"""The router's view of its workers: one stream to each (router/link.py) with its live load; room, choice, affinity."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from meshserve.common.channels import aio_channel
from meshserve.common.renewing_channel import RenewingChannel
from meshserve.common.tls import MeshTls
from meshserve.router.discovery import Source
from meshserve.router.link import DEFAULT_SILENCE_S, WorkerLink
from meshserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

RECONNECT_DELAYS_S = (0.1, 0.2, 0.5, 1.0, 2.0)
AFFINITY_PREFIX_TOKENS = 64  # the leading tokens that key prefix affinity (four 16-token blocks)
AFFINITY_ENTRIES = 10_000


@dataclass
class WorkerEndpoint:
    address: str
    # Made again when the TLS files change; the stream in use stays on the channel it opened on.
    channel: RenewingChannel
    # Requests the router has sent and not yet seen finish.
    in_flight: int = 0
    dispatched: int = 0
    # When it was last picked: among equally loaded workers the longest unused goes first.
    last_picked: int = 0
    model: common_pb2.ModelInfo | None = field(default=None, repr=False)
    load: worker_pb2.LoadReport | None = field(default=None, repr=False)
    # The stream its sequences and load reports travel on; replaced when it reconnects.
    link: WorkerLink | None = field(default=None, repr=False)
    # Its stream is open and has reported load.
    connected: bool = False
    # Discovery no longer lists it: no new work; it leaves the pool once idle.
    removed: bool = False

    @property
    def stub(self) -> worker_pb2_grpc.WorkerStub:
        return self.channel.derived("stub", worker_pb2_grpc.WorkerStub)

    @property
    def up(self) -> bool:
        return self.connected and not self.removed and self.load is not None and not self.load.draining

    @property
    def busy(self) -> int:
        """Sequences on it: what it reported (every router's), plus what this router sent that the report
        had not seen yet (reports lag); never less than what this router has in flight."""
        if self.load is None:
            return self.in_flight
        reported = self.load.running_sequences + self.load.waiting_sequences
        in_transit = max(0, self.in_flight - self.load.stream_sequences)
        return max(self.in_flight, reported + in_transit)

    def has_room(self, overflow: int = 0) -> bool:
        return self.up and self.load is not None and self.busy < self.load.max_num_seqs + overflow


class WorkerPool:
    def __init__(
        self,
        sources: list[Source],
        on_change: Callable[[], None],
        affinity_slack: int = 2,
        refresh_seconds: float = 10.0,
        silence_seconds: float = DEFAULT_SILENCE_S,
        tls: MeshTls | None = None,
    ) -> None:
        self.sources = sources
        self.tls = tls
        self.silence_seconds = silence_seconds
        self.workers: list[WorkerEndpoint] = []
        self.on_change = on_change
        self.affinity_slack = affinity_slack
        self.refresh_seconds = refresh_seconds
        self._picks = 0
        self._affinity: OrderedDict[int, str] = OrderedDict()  # prompt-prefix hash -> worker address
        self._watchers: dict[str, asyncio.Task] = {}
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        """Finds the workers once now, then again every refresh_seconds."""
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            await self.refresh()

    async def refresh(self) -> None:
        """Adds workers that appeared; those that disappeared get no new work and leave once idle."""
        found: set[str] = set()
        for source in self.sources:
            try:
                found |= await source.resolve()
            except Exception as exc:  # a lookup failing now must not take the known workers away
                log.warning("could not resolve workers from %s: %s", source, exc)
                found |= {w.address for w in self.workers if not w.removed}
        known = {w.address for w in self.workers}
        for address in sorted(found - known):
            # Untraced: each submission carries its trace context. With TLS the worker must prove it is one,
            # whatever address discovery gave.
            make = functools.partial(aio_channel, address, traced=False)
            worker = WorkerEndpoint(address, RenewingChannel(make, self.tls, "worker", retire_grace_s=None))
            self.workers.append(worker)
            self._watchers[address] = asyncio.create_task(self._watch(worker))
            log.info("worker %s added", address)
        for worker in self.workers:
            worker.removed = worker.address not in found
        for worker in [w for w in self.workers if w.removed and w.in_flight == 0]:
            self.workers.remove(worker)
            self._watchers.pop(worker.address).cancel()
            await worker.channel.close()
            log.info("worker %s removed", worker.address)
        self.on_change()

    async def _watch(self, worker: WorkerEndpoint) -> None:
        """Keeps a stream open to the worker (its load current through it); down while it is broken."""
        failures = 0
        while True:
            try:
                if worker.model is None:
                    worker.model = await worker.stub.DescribeModel(worker_pb2.DescribeModelRequest(), timeout=5)
                worker.channel.close_retired()  # the last stream on a replaced channel has ended

                def on_load(report: worker_pb2.LoadReport) -> None:
                    nonlocal failures
                    worker.load, worker.connected = report, True
                    if not report.draining:  # a draining worker ends the stream when idle: no quick reconnects
                        failures = 0
                    self.on_change()

                worker.link = WorkerLink(worker.stub, on_load, self.silence_seconds)
                await worker.link.run()
            except grpc.aio.AioRpcError as exc:
                if worker.connected:
                    log.warning("worker %s is down: %s", worker.address, exc.details() or exc.code().name)
            worker.connected = False
            self.on_change()
            await asyncio.sleep(RECONNECT_DELAYS_S[min(failures, len(RECONNECT_DELAYS_S) - 1)])
            failures += 1

    def mark_down(self, worker: WorkerEndpoint) -> None:
        """Its stream broke: no new work until it reconnects and reports load."""
        worker.connected = False
        self.on_change()

    def choose(
        self, request: common_pb2.TokenRequest, overflow: int | Callable[[WorkerEndpoint], int] = 0
    ) -> WorkerEndpoint | None:
        """The least busy worker with room that serves the request's model, preferring the one that last
        served the same prompt prefix (its KV cache may hold it) unless that one is busier by more than
        affinity_slack; None when no worker has room. `overflow`: seats past max_num_seqs the request may
        take (negative: seats it must leave free), or that per worker."""
        extra = overflow if callable(overflow) else lambda worker: overflow
        candidates = [
            w
            for w in self.workers
            if w.has_room(extra(w)) and (not request.model or (w.model and w.model.name == request.model))
        ]
        if not candidates:
            return None
        chosen = min(candidates, key=lambda w: (w.busy, w.last_picked))
        key = prefix_key(request.prompt_token_ids, request.cache_salt)
        preferred = next((w for w in candidates if w.address == self._affinity.get(key)), None)
        if preferred is not None and preferred.busy <= chosen.busy + self.affinity_slack:
            chosen = preferred
        self._affinity[key] = chosen.address
        self._affinity.move_to_end(key)
        while len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)
        self._picks += 1
        chosen.last_picked = self._picks
        return chosen

    def models(self) -> list[common_pb2.ModelInfo]:
        found: dict[str, common_pb2.ModelInfo] = {}
        for worker in self.workers:
            if worker.model is not None:
                found.setdefault(worker.model.name, worker.model)
        return list(found.values())

    async def describe(self, timeout: float = 5.0) -> list[common_pb2.ModelInfo]:
        """What the workers serve, asking those not yet described."""

        async def describe_one(worker: WorkerEndpoint) -> None:
            if worker.model is None:
                try:
                    worker.model = await worker.stub.DescribeModel(worker_pb2.DescribeModelRequest(), timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    log.info("worker %s did not describe its model: %s", worker.address, exc.code().name)

        await asyncio.gather(*(describe_one(w) for w in self.workers))
        return self.models()

    async def close(self) -> None:
        tasks = [*self._watchers.values(), *([self._refresher] if self._refresher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(w.channel.close() for w in self.workers))


def prefix_key(prompt_token_ids, cache_salt: str = "") -> int:
    """Prompts share a worker's cache only under the same salt, so they are steered together only then."""
    return hash((cache_salt, tuple(prompt_token_ids[:AFFINITY_PREFIX_TOKENS])))
