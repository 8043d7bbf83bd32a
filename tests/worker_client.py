"""A test's direct line to a worker: one sequence over the worker's Connect stream, as a router sends it."""

from __future__ import annotations

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
