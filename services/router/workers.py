"""The router's view of its workers: addresses, connections, requests in flight, what each serves."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from meshserve.channels import aio_channel
from meshserve.errors import MeshError
from meshserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class WorkerEndpoint:
    address: str
    stub: worker_pb2_grpc.WorkerStub
    channel: grpc.aio.Channel
    # Requests the router has sent and not yet seen finish.
    in_flight: int = 0
    # When it was last picked: among equally loaded workers the longest unused goes first.
    last_picked: int = 0
    model: common_pb2.ModelInfo | None = field(default=None, repr=False)


class WorkerPool:
    def __init__(self, addresses: list[str]) -> None:
        if not addresses:
            raise ValueError("the router needs at least one worker address (--workers)")
        self.workers: list[WorkerEndpoint] = []
        self._picks = 0
        for address in addresses:
            channel = aio_channel(address)
            self.workers.append(WorkerEndpoint(address, worker_pb2_grpc.WorkerStub(channel), channel))

    def pick(self, model: str, exclude: set[str]) -> WorkerEndpoint:
        """The least busy worker that may serve `model`, skipping the addresses in `exclude`."""
        candidates = [
            w
            for w in self.workers
            if w.address not in exclude and (not model or w.model is None or w.model.name == model)
        ]
        if not candidates:
            tried = f" (tried {', '.join(sorted(exclude))})" if exclude else ""
            raise MeshError(grpc.StatusCode.UNAVAILABLE, f"no worker is available for model {model!r}{tried}")
        # Workers whose model is known first: an unknown one may be down or serve another model.
        chosen = min(candidates, key=lambda w: (w.model is None, w.in_flight, w.last_picked))
        self._picks += 1
        chosen.last_picked = self._picks
        return chosen

    async def describe(self, timeout: float = 5.0) -> list[common_pb2.ModelInfo]:
        """Asks every worker not yet described what it serves; returns one ModelInfo per model name."""

        async def describe_one(worker: WorkerEndpoint) -> None:
            if worker.model is not None:
                return
            try:
                worker.model = await worker.stub.DescribeModel(worker_pb2.DescribeModelRequest(), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                log.info("worker %s did not describe its model: %s", worker.address, exc.code().name)

        await asyncio.gather(*(describe_one(w) for w in self.workers))
        models: dict[str, common_pb2.ModelInfo] = {}
        for worker in self.workers:
            if worker.model is not None:
                models.setdefault(worker.model.name, worker.model)
        return list(models.values())

    async def close(self) -> None:
        await asyncio.gather(*(w.channel.close() for w in self.workers))
