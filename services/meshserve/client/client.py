"""The blocking client of the gateway's meshserve.v1.Inference API."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from meshserve.client.base import ClientBase, cut_at_deadline
from meshserve.client.errors import MeshClientError
from meshserve.client.request import Message, make_request
from meshserve.client.retry import Attempts
from meshserve.client.types import Chunk, Completion
from meshserve.common.channels import sync_channel
from meshserve.v1 import common_pb2, inference_pb2


class Client(ClientBase):
    """Calls the mesh's gateway; `with Client(...) as client:` closes its channel at the end.

    `api_key` goes with every call as `authorization: Bearer KEY`. `root_certificates`, and
    `certificate_chain` with `private_key` for mutual TLS (PEM bytes or file paths), make the channel TLS;
    the gateway does not serve TLS yet, so today these are for a TLS-terminating proxy in front of it and
    for the gateway's TLS to come. `timeout`: each call's deadline in seconds unless the call gives its own
    (None: no deadline); it covers every attempt and the waits between them. `retry`: when UNAVAILABLE and
    RESOURCE_EXHAUSTED are tried again (RetryPolicy(); NO_RETRIES: never).
    """

    def _open_channel(self, address: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
        return sync_channel(address, credentials)

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request: inference_pb2.GenerateRequest | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Completion:
        """The whole answer to a prompt, chat `messages` or a whole GenerateRequest. `options`: model, n,
        priority ("high", ...), request_id, and SamplingParams fields (max_tokens=32, temperature=0, ...)."""
        built = make_request(prompt, messages=messages, request=request, **options)
        attempts = self._attempts(timeout)
        return self._completion(self._unary(self._stub.Generate, built, attempts), attempts)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request: inference_pb2.GenerateRequest | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> ChunkStream:
        """The answer as it is generated, as an iterator of Chunks (arguments as generate's). The call starts
        at the first chunk asked for; closing the stream (or leaving its `with`) cancels it."""
        built = make_request(prompt, messages=messages, request=request, **options)
        return ChunkStream(self._start_stream(built), self._attempts(timeout))

    def list_models(
        self, *, include_tokenizer_files: bool = False, timeout: float | None = None
    ) -> list[common_pb2.ModelInfo]:
        """The models the gateway serves (with `include_tokenizer_files`, those too: megabytes each)."""
        request = common_pb2.ListModelsRequest(include_tokenizer_files=include_tokenizer_files)
        return list(self._unary(self._stub.ListModels, request, self._attempts(timeout)).models)

    def _unary(self, method: Callable[..., Any], request: Any, attempts: Attempts) -> Any:
        while True:
            try:
                return method(request, timeout=attempts.start(), metadata=self.metadata)
            except grpc.RpcError as exc:
                wait = attempts.failed(exc)
            time.sleep(wait)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ChunkStream:
    """The chunks of one streamed call, as they come. A failure before the first chunk is retried as the
    client's RetryPolicy says; one after it raises MeshClientError with `tokens_received`, never retried.
    `cancel()` (from any thread) or `close()` (from the iterating one) cancels the call."""

    def __init__(self, start: Callable[[float | None], Any], attempts: Attempts) -> None:
        self.tokens_received = 0
        self._call: Any = None
        self._cancelled = threading.Event()
        self._chunks = self._run(start, attempts)

    def _run(self, start: Callable[[float | None], Any], attempts: Attempts) -> Iterator[Chunk]:
        delivered = False
        cut = False  # an index ended "cancelled": the mesh reached the deadline before the caller's channel did
        while True:
            call = self._call = start(attempts.start())
            try:
                for message in call:
                    delivered = True
                    self.tokens_received += len(message.token_ids)
                    chunk = Chunk.of(message)
                    cut = cut or chunk.finish_reason == "cancelled"
                    yield chunk
                if cut and attempts.deadline is not None and not self._cancelled.is_set():
                    raise cut_at_deadline(self.tokens_received, attempts)
                return
            except grpc.RpcError as exc:
                wait = attempts.failed(exc, self.tokens_received, delivered or self._cancelled.is_set())
            finally:
                call.cancel()
            if self._cancelled.wait(wait):
                raise MeshClientError(
                    grpc.StatusCode.CANCELLED, "cancelled while waiting to retry", attempts=attempts.made
                )

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def cancel(self) -> None:
        self._cancelled.set()
        if self._call is not None:
            self._call.cancel()

    def close(self) -> None:
        self.cancel()
        self._chunks.close()

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
