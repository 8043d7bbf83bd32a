"""A test's direct line to a worker: one sequence over the worker's Connect stream, as a router sends it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
from google.rpc import error_details_pb2

from meshserve.common.errors import MeshError
from meshserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc


def generate_on_worker(
    channel: grpc.Channel, request: common_pb2.TokenRequest, timeout: float = 60
) -> list[common_pb2.StreamChunk]:
    """The sequence's chunks up to its finish; MeshError with the worker's status when it refused or failed."""
    done = threading.Event()

    def commands() -> Iterator[worker_pb2.LinkCommand]:
        submit = worker_pb2.SubmitSequence(sequence_id=1, request=request, timeout_ms=int(timeout * 1000))
        yield worker_pb2.LinkCommand(submit=submit)
        done.wait(timeout)  # the stream stays open while the sequence runs: closing it cancels the sequence

    call = worker_pb2_grpc.WorkerStub(channel).Connect(commands(), timeout=timeout)
    chunks: list[common_pb2.StreamChunk] = []
    try:
        for event in call:
            for output in event.outputs:
                assert output.sequence_id == 1
                if output.chunk.HasField("error"):
                    raise MeshError.of_status(output.chunk.error)
                chunks.append(output.chunk)
                if output.chunk.finish_reason:
                    return chunks
    finally:
        done.set()
        call.cancel()
    raise AssertionError("the worker closed the stream before the sequence finished")


def violated_fields(error: MeshError) -> list[str]:
    return [v.field for d in error.details if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations]


class LinkClient:
    """A router's stream to a worker, held by hand: submit and cancel by id, read the events as they come."""

    def __init__(self, channel: grpc.Channel, timeout: float = 120) -> None:
        self._commands: queue.Queue[worker_pb2.LinkCommand | None] = queue.Queue()
        self.call = worker_pb2_grpc.WorkerStub(channel).Connect(self._stream(), timeout=timeout)

    def _stream(self) -> Iterator[worker_pb2.LinkCommand]:
        while (command := self._commands.get()) is not None:
            yield command

    def submit(self, sequence_id: int, request: common_pb2.TokenRequest) -> None:
        submit = worker_pb2.SubmitSequence(sequence_id=sequence_id, request=request)
        self._commands.put(worker_pb2.LinkCommand(submit=submit))

    def cancel(self, sequence_id: int) -> None:
        self._commands.put(worker_pb2.LinkCommand(cancel=worker_pb2.CancelSequence(sequence_id=sequence_id)))

    def events(self) -> Iterator[worker_pb2.LinkEvent]:
        return iter(self.call)

    def close(self) -> None:
        self._commands.put(None)
        self.call.cancel()

    def __enter__(self) -> LinkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
