"""The engine as an event loop sees it. A client (one per router stream) submits and cancels sequences by
its own keys, and takes, once per engine step, the outputs of all of its sequences that advanced: the
output processor hands a step over in one call on the loop, so a step costs one wake-up per client, not
one per token per sequence."""

from __future__ import annotations

import asyncio
import functools
import time

import grpc

from meshserve.common.enums import served_priority
from meshserve.common.errors import MeshError, invalid_argument, unavailable
from meshserve.v1 import common_pb2
from meshserve.worker.engine_process import EngineProcess
from meshserve.worker.protocol import ModelLimits, sampling_options
from meshserve.worker.sequence import Sequence, SequenceOutput


class EngineClient:
    def __init__(self, engine: EngineProcess, limits: ModelLimits, max_open: int) -> None:
        self.engine = engine
        self.limits = limits
        self.max_open = max_open
        self._loop = asyncio.get_running_loop()
        self._open: dict[int, Sequence] = {}
        self._outputs: list[tuple[int, Sequence, SequenceOutput]] = []
        self._ready = asyncio.Event()

    @property
    def open_sequences(self) -> int:
        return len(self._open)

    def submit(self, key: int, request: common_pb2.TokenRequest, timeout: float | None) -> Sequence:
        """Checks the request and puts its sequence into the engine; MeshError says why it cannot run."""
        if key in self._open:
            raise invalid_argument([("sequence_id", f"{key} is still open on this stream; use a new one")])
        if len(self._open) >= self.max_open:
            raise MeshError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this stream already has {len(self._open)} open sequences, the most one stream may hold; "
                "wait for some to finish",
            )
        options = sampling_options(request, self.limits)
        sequence = self.engine.new_sequence(
            request.request_id,
            list(request.prompt_token_ids),
            options,
            emit=functools.partial(self._emit, key),
            loop=self._loop,
            priority=served_priority(request.priority),
            deadline=time.monotonic() + timeout if timeout is not None else None,
            cache_salt=request.cache_salt,
        )
        try:
            # Failover: it continues after the tokens the caller already has.
            ended = self.engine.submit(sequence, list(request.resume_token_ids))
        except RuntimeError as exc:
            raise unavailable(f"the worker is shutting down ({exc}); retry on another worker") from exc
        self._open[key] = sequence
        if ended is not None:  # those tokens were all of it: the caller gets the end it missed
            self._emit(key, ended)
        return sequence

    def cancel(self, key: int) -> Sequence | None:
        """Drops the sequence at the engine's next step; it sends nothing more."""
        sequence = self._open.pop(key, None)
        if sequence is not None and not sequence.finished:
            self.engine.cancel(sequence)
        return sequence

    def close(self) -> None:
        for key in list(self._open):
            self.cancel(key)

    def wake(self) -> None:
        """Something besides outputs is ready for the consumer (a load report, the end of its stream)."""
        self._ready.set()

    async def next_outputs(self) -> list[tuple[int, Sequence, SequenceOutput]]:
        """Every output since the last call, in order (one step's, or several when the consumer was slow)."""
        await self._ready.wait()
        self._ready.clear()
        outputs, self._outputs = self._outputs, []
        return outputs

    def _emit(self, key: int, output: SequenceOutput) -> None:
        sequence = self._open.get(key)
        if sequence is None:
            return  # cancelled by the client: it wants nothing more
        if output.finish is not None:
            del self._open[key]
        self._outputs.append((key, sequence, output))
        self._ready.set()
