"""The router's one stream to a worker: every sequence it runs there is submitted, cancelled and streamed
back on it, and the worker's load reports ride on it too.

Each sequence's outputs land in its SequenceStream; a reader that was slow takes everything that piled
up as one message. When the stream breaks, every sequence still open on it fails with UNAVAILABLE, so
the router resumes each one elsewhere from the tokens it already relayed. A worker that goes silent
without closing the connection (a frozen process, a dropped network path) counts as broken: it reports
its load at least once a second, so `silence_seconds` without any event ends the stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry import propagate

from meshserve.common.errors import MeshError
from meshserve.common.stream_chunks import joined
from meshserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_SILENCE_S = 3.0  # three of the worker's heartbeats


class SequenceStream:
    """One sequence's outputs as they come off the shared stream."""

    def __init__(self, link: WorkerLink, sequence_id: int) -> None:
        self.link = link
        self.sequence_id = sequence_id
        self.ended = False  # its last chunk came (finish or error), or the link broke
        self._chunks: list[common_pb2.StreamChunk] = []
        self._failure: MeshError | None = None
        self._ready = asyncio.Event()

    async def next(self) -> common_pb2.StreamChunk:
        """Every chunk that is ready, as one (tokens, text and logprobs joined; the finish of the last).
        MeshError when the worker ended the sequence with an error or the stream to it broke."""
        while not self._chunks:
            if self._failure is not None:
                raise self._failure
            await self._ready.wait()
            self._ready.clear()
        chunks, self._chunks = self._chunks, []
        merged = joined(chunks)
        if merged.HasField("error"):
            raise MeshError.of_status(merged.error)
        return merged

    def close(self) -> None:
        """The caller is done with it: a sequence still running on the worker is cancelled there."""
        if not self.ended:
            self.ended = True
            self.link.cancel(self.sequence_id)

    def _put(self, chunk: common_pb2.StreamChunk) -> None:
        if chunk.finish_reason or chunk.HasField("error"):
            self.ended = True
        self._chunks.append(chunk)
        self._ready.set()

    def _fail(self, error: MeshError) -> None:
        self.ended = True
        self._failure = error
        self._ready.set()


class WorkerLink:
    """One connection of the stream; when it ends, a new WorkerLink makes the next."""

    def __init__(
        self,
        stub: worker_pb2_grpc.WorkerStub,
        on_load: Callable[[worker_pb2.LoadReport], None],
        silence_seconds: float = DEFAULT_SILENCE_S,
    ) -> None:
        self.stub = stub
        self.on_load = on_load
        self.silence_seconds = silence_seconds
        self.open = False  # the worker answered and the stream has not broken
        self.silent = False  # it was ended because the worker sent nothing for silence_seconds
        self._commands: asyncio.Queue[worker_pb2.LinkCommand | None] = asyncio.Queue()
        self._streams: dict[int, SequenceStream] = {}
        self._ids = itertools.count(1)

    async def run(self) -> None:
        """Holds the stream until it ends; raises grpc.aio.AioRpcError when it broke. Either way every
        sequence still open on it fails with UNAVAILABLE."""
        call = self.stub.Connect(self._command_stream())
        why = "the worker closed the stream"
        self._heard = time.monotonic()
        watchdog = asyncio.create_task(self._end_if_silent(call))
        try:
            async for event in call:
                self._heard = time.monotonic()
                self.open = True
                if event.HasField("load"):
                    self.on_load(event.load)
                for output in event.outputs:
                    stream = self._streams.get(output.sequence_id)
                    if stream is not None:
                        if output.chunk.finish_reason or output.chunk.HasField("error"):
                            del self._streams[output.sequence_id]
                        stream._put(output.chunk)
        except grpc.aio.AioRpcError as exc:
            why = exc.details() or exc.code().name
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self.silent or (task is not None and task.cancelling()):
                raise
            why = f"the worker sent nothing for {self.silence_seconds:g} s"
            log.warning("%s; its stream is ended and its sequences resume elsewhere", why)
        finally:
            watchdog.cancel()
            self.open = False
            call.cancel()
            self._commands.put_nowait(None)
            failure = MeshError(grpc.StatusCode.UNAVAILABLE, f"the stream to the worker broke ({why})")
            for stream in self._streams.values():
                stream._fail(failure)
            self._streams.clear()

    def submit(self, request: common_pb2.TokenRequest, timeout: float | None) -> SequenceStream:
        """Sends the sequence to the worker under the current span (its trace continues there)."""
        if not self.open:
            raise MeshError(grpc.StatusCode.UNAVAILABLE, "the stream to the worker is not open")
        sequence_id = next(self._ids)
        stream = SequenceStream(self, sequence_id)
        self._streams[sequence_id] = stream
        submit = worker_pb2.SubmitSequence(sequence_id=sequence_id, request=request)
        if timeout is not None:
            submit.timeout_ms = max(1, int(timeout * 1000))
        propagate.inject(submit.trace_context)
        self._commands.put_nowait(worker_pb2.LinkCommand(submit=submit))
        return stream

    def cancel(self, sequence_id: int) -> None:
        if self._streams.pop(sequence_id, None) is not None and self.open:
            cancel = worker_pb2.CancelSequence(sequence_id=sequence_id)
            self._commands.put_nowait(worker_pb2.LinkCommand(cancel=cancel))

    async def _end_if_silent(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            await asyncio.sleep(self.silence_seconds / 4)
            if time.monotonic() - self._heard > self.silence_seconds:
                self.silent = True
                call.cancel()
                return

    async def _command_stream(self) -> AsyncIterator[worker_pb2.LinkCommand]:
        while (command := await self._commands.get()) is not None:
            yield command
