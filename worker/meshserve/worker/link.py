"""One router's stream on the worker: its commands go to the engine, and each engine step's outputs of its
sequences (with the worker's load when it changed) come back as one LinkEvent."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import propagate

from meshserve.common.errors import MeshError, invalid_argument
from meshserve.common.logs import current_request_id
from meshserve.v1 import worker_pb2
from meshserve.worker.async_engine import EngineClient
from meshserve.worker.engine_load import EngineLoad
from meshserve.worker.engine_process import EngineProcess
from meshserve.worker.metrics import WorkerMetrics
from meshserve.worker.protocol import ModelLimits, error_chunk, load_report, stream_chunk
from meshserve.worker.sequence import Sequence, SequenceOutput
from meshserve.worker.sequence_trace import SequenceTrace

log = logging.getLogger(__name__)

LOAD_INTERVAL_S = 0.02  # how often a change in load is looked for
LOAD_HEARTBEAT_S = 1.0
OPEN_SEQUENCES_PER_SEAT = 4  # one stream may hold this many sequences per seat of the engine


@dataclass
class _Open:
    index: int
    trace: SequenceTrace
    # Outputs held back under a stream interval above 1, and whether the sequence's first token went out.
    held: list[SequenceOutput] = field(default_factory=list)
    held_tokens: int = 0
    started: bool = False


class Link:
    def __init__(
        self, engine: EngineProcess, limits: ModelLimits, metrics: WorkerMetrics, stream_interval: int = 1
    ) -> None:
        self.engine = engine
        self.stream_interval = stream_interval
        self.limits = limits
        self.metrics = metrics
        self.client = EngineClient(engine, limits, OPEN_SEQUENCES_PER_SEAT * engine.max_num_seqs)
        self._open: dict[int, _Open] = {}
        self._refused: list[worker_pb2.SequenceChunk] = []
        self._sent_key: tuple | None = None
        self._sent_at = 0.0
        self._ended = False

    async def events(self, commands: AsyncIterator[worker_pb2.LinkCommand]) -> AsyncIterator[worker_pb2.LinkEvent]:
        """The stream's events until the router closes its side (or the worker drains and this link is idle)."""
        reader = asyncio.create_task(self._read(commands))
        loads = asyncio.create_task(self._watch_load())
        self.client.wake()  # the load at once: the router counts the worker up from its first report
        try:
            while True:
                outputs = await self.client.next_outputs()
                event = self._event(outputs)
                if event.outputs or event.HasField("load"):
                    yield event
                if self._ended:
                    return
        finally:
            for task in (reader, loads):
                task.cancel()
            await asyncio.gather(reader, loads, return_exceptions=True)
            self.client.close()
            for key in list(self._open):
                self._end(key)

    async def _read(self, commands: AsyncIterator[worker_pb2.LinkCommand]) -> None:
        try:
            async for command in commands:
                kind = command.WhichOneof("command")
                if kind == "submit":
                    self._submit(command.submit)
                elif kind == "cancel":
                    if self.client.cancel(command.cancel.sequence_id) is not None:
                        self._end(command.cancel.sequence_id)
        finally:
            self._ended = True
            self.client.wake()

    def _submit(self, submit: worker_pb2.SubmitSequence) -> None:
        request, key = submit.request, submit.sequence_id
        current_request_id.set(request.request_id)
        trace = SequenceTrace(request, self.limits.name, self.metrics, propagate.extract(dict(submit.trace_context)))
        try:
            try:
                if key in self._open:  # ended in the engine, but its end is not sent yet: still open on this stream
                    raise invalid_argument([("sequence_id", f"{key} is still open on this stream; use a new one")])
                self.client.submit(key, request, submit.timeout_ms / 1000 if submit.timeout_ms else None)
            except MeshError:
                raise
            except Exception as exc:  # one bad submission fails alone, never the stream it came on
                log.exception("submitting sequence %s failed", request.request_id[:200])
                raise MeshError(grpc.StatusCode.INTERNAL, "the worker could not start this sequence") from exc
        except MeshError as exc:
            trace.failed(exc)
            trace.end()
            self._refused.append(worker_pb2.SequenceChunk(sequence_id=key, chunk=error_chunk(request.index, exc)))
            self.client.wake()
            return
        self._open[key] = _Open(request.index, trace)

    def _event(self, outputs: list[tuple[int, Sequence, SequenceOutput]]) -> worker_pb2.LinkEvent:
        event = worker_pb2.LinkEvent(outputs=self._refused)
        self._refused = []
        for key, sequence, output in outputs:
            opened = self._open.get(key)
            if opened is None:
                continue
            opened.trace.tokens(len(output.token_ids), sequence)
            opened.held.append(output)
            opened.held_tokens += len(output.token_ids)
            ends = bool(output.error) or output.finish is not None
            if ends or not opened.started or opened.held_tokens >= self.stream_interval:
                event.outputs.add(sequence_id=key, chunk=stream_chunk(opened.index, opened.held))
                opened.started = opened.started or opened.held_tokens > 0
                opened.held, opened.held_tokens = [], 0
            if output.error:
                opened.trace.failed(MeshError(grpc.StatusCode.INTERNAL, output.error))
                self._end(key)
            elif output.finish is not None:
                opened.trace.finished(output, sequence.num_preemptions)
                self._end(key)
        # With the outputs, the load they leave behind: a router sees the seats they freed in the same message.
        load = self.engine.load()
        key = (_scheduling_key(load), self.client.open_sequences)
        if key != self._sent_key or time.monotonic() - self._sent_at >= LOAD_HEARTBEAT_S:
            event.load.CopyFrom(load_report(load))
            event.load.stream_sequences = self.client.open_sequences
            self._sent_key, self._sent_at = key, time.monotonic()
        return event

    def _end(self, key: int) -> None:
        opened = self._open.pop(key, None)
        if opened is not None:
            opened.trace.end()

    async def _watch_load(self) -> None:
        """Wakes the stream when the load changed without an output of its own (another router's sequences, a
        preemption) and for the heartbeat; the event itself decides what is news."""
        while True:
            await asyncio.sleep(LOAD_INTERVAL_S)
            load = self.engine.load()
            key = (_scheduling_key(load), self.client.open_sequences)
            if key != self._sent_key or time.monotonic() - self._sent_at >= LOAD_HEARTBEAT_S:
                self.client.wake()
            if load.draining and self.client.open_sequences == 0:
                # Draining and idle: an open stream would hold the server (and the pod's termination) until
                # the drain timeout. The router has seen the draining load and sends nothing new.
                self._ended = True
                self.client.wake()
                return


def _scheduling_key(load: EngineLoad) -> tuple:
    """What a scheduler acts on; tokens/s and the running totals move every step and wait for the heartbeat."""
    return (
        load.running_sequences,
        load.waiting_sequences,
        load.waiting_by_priority,
        load.free_kv_blocks,
        load.max_num_seqs,
        load.draining,
    )
