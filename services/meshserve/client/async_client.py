"""The asyncio client of the gateway's meshserve.v1.Inference API: Client's calls, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from meshserve.client.base import ClientBase, cut_at_deadline
from meshserve.client.errors import MeshClientError
from meshserve.client.request import Message, make_request
from meshserve.client.retry import Attempts
from meshserve.client.types import Chunk, Completion
from meshserve.common.channels import aio_channel
from meshserve.v1 import common_pb2, inference_pb2


class AsyncClient(ClientBase):
    """Client for asyncio: `async with AsyncClient(...) as client:`, created in the loop that uses it. The
    arguments are Client's (TLS is plumbing only until the gateway serves it); calls carry the caller's
    OpenTelemetry trace context."""

    def _open_channel(self, address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        return aio_channel(address, credentials=credentials)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request: inference_pb2.GenerateRequest | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Completion:
        """The whole answer (arguments as Client.generate's)."""
        built = make_request(prompt, messages=messages, request=request, **options)
        attempts = self._attempts(timeout)
        return self._completion(await self._unary(self._stub.Generate, built, attempts), attempts)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request: inference_pb2.GenerateRequest | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncChunkStream:
        """An async iterator of Chunks (`async for chunk in client.stream(...)`); the call starts at the first
        chunk asked for. Cancelling the task that reads it, or aclose(), cancels the call."""
        built = make_request(prompt, messages=messages, request=request, **options)
        return AsyncChunkStream(self._start_stream(built), self._attempts(timeout))

    async def list_models(
        self, *, include_tokenizer_files: bool = False, timeout: float | None = None
    ) -> list[common_pb2.ModelInfo]:
        request = common_pb2.ListModelsRequest(include_tokenizer_files=include_tokenizer_files)
        return list((await self._unary(self._stub.ListModels, request, self._attempts(timeout))).models)

    async def _unary(self, method: Callable[..., Any], request: Any, attempts: Attempts) -> Any:
        while True:
            try:
                return await method(request, timeout=attempts.start(), metadata=self.metadata)
            except grpc.RpcError as exc:
                wait = attempts.failed(exc)
            await asyncio.sleep(wait)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncChunkStream:
    """The chunks of one streamed call (see ChunkStream: retried only before its first chunk)."""

    def __init__(self, start: Callable[[float | None], Any], attempts: Attempts) -> None:
        self.tokens_received = 0
        self._call: Any = None
        self._cancelled = False
        self._chunks = self._run(start, attempts)

    async def _run(self, start: Callable[[float | None], Any], attempts: Attempts) -> AsyncIterator[Chunk]:
        delivered = False
        cut = False  # an index ended "cancelled": the mesh reached the deadline before the caller's channel did
        while True:
            call = self._call = start(attempts.start())
            try:
                async for message in call:
                    delivered = True
                    self.tokens_received += len(message.token_ids)
                    chunk = Chunk.of(message)
                    cut = cut or chunk.finish_reason == "cancelled"
                    yield chunk
                if cut and attempts.deadline is not None and not self._cancelled:
                    raise cut_at_deadline(self.tokens_received, attempts)
                return
            except grpc.RpcError as exc:
                wait = attempts.failed(exc, self.tokens_received, delivered)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._cancelled or (task is not None and task.cancelling()):
                    raise  # the reading task itself is cancelled
                # grpc.aio ends a call cancelled here with CancelledError; its reader hears what a sync one does.
                raise MeshClientError(
                    grpc.StatusCode.CANCELLED,
                    "cancelled by the caller",
                    attempts=attempts.made,
                    tokens_received=self.tokens_received,
                ) from None
            finally:
                call.cancel()
            await asyncio.sleep(wait)

    def __aiter__(self) -> AsyncChunkStream:
        return self

    async def __anext__(self) -> Chunk:
        return await anext(self._chunks)

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()
        await self._chunks.aclose()

    async def __aenter__(self) -> AsyncChunkStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
