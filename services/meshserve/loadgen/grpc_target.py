"""The mesh's public gRPC API as a benchmark target: one Inference.GenerateStream call per request.

The stream returns the output's token ids, so each record can be checked token by token (the soak does).
The API key travels as `meshserve generate` sends it: `authorization: Bearer KEY` metadata.
"""

from __future__ import annotations

import time
from types import TracebackType

import grpc

from meshserve.common.channels import aio_channel
from meshserve.common.enums import FINISH_REASON_NAMES
from meshserve.common.errors import MeshError, from_rpc_error, retry_delay_seconds
from meshserve.loadgen.target import OK, Chunk, Reply, TargetError
from meshserve.loadgen.workload import Endpoint, RequestSpec
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

CONNECT_TIMEOUT_S = 10.0


class GrpcTarget:
    def __init__(
        self,
        address: str,
        *,
        api_key: str = "",
        model: str = "",
        endpoint: Endpoint = "completions",
        timeout: float = 300.0,
    ) -> None:
        self.address = address
        self.endpoint = endpoint
        self.timeout = timeout  # seconds each request may take, as its gRPC deadline
        self._model = model
        self._metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self._channel: grpc.aio.Channel | None = None
        self._stub: inference_pb2_grpc.InferenceStub | None = None

    @property
    def name(self) -> str:
        return f"grpc {self.address}"

    @property
    def model(self) -> str:
        return self._model

    def describe(self) -> dict[str, object]:
        return {"api": "grpc", "address": self.address, "model": self._model, "endpoint": self.endpoint}

    async def __aenter__(self) -> GrpcTarget:
        # Untraced: a benchmark's calls are not part of anyone's trace, and interceptors cost client CPU.
        self._channel = aio_channel(self.address, traced=False)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        try:
            listed = await self._stub.ListModels(
                common_pb2.ListModelsRequest(), timeout=CONNECT_TIMEOUT_S, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            await self._channel.close()
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise TargetError(f"cannot reach the gateway at {self.address} ({exc.code().name})") from None
            raise TargetError(f"the gateway at {self.address} answered {exc.code().name}: {exc.details()}") from None
        names = [m.name for m in listed.models]
        if not names:
            await self._channel.close()
            raise TargetError(f"the gateway at {self.address} serves no model yet")
        if self._model and self._model not in names:
            await self._channel.close()
            raise TargetError(f"the gateway at {self.address} serves {', '.join(names)}, not {self._model}")
        self._model = self._model or names[0]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._channel is not None:
            await self._channel.close()

    def generate_request(self, request: RequestSpec) -> inference_pb2.GenerateRequest:
        sampling = common_pb2.SamplingParams(
            max_tokens=request.max_tokens, temperature=request.temperature, ignore_eos=request.ignore_eos
        )
        if request.seed is not None:
            sampling.seed = request.seed
        message = inference_pb2.GenerateRequest(model=self._model, sampling=sampling, request_id=request.request_id)
        if request.prompt_token_ids is not None:
            message.token_ids.ids.extend(request.prompt_token_ids)
        elif self.endpoint == "chat":
            message.messages.messages.add(role="user", content=request.prompt_text)
        else:
            message.prompt = request.prompt_text or ""
        return message

    async def send(self, request: RequestSpec) -> Reply:
        assert self._stub is not None, "use the target as `async with GrpcTarget(...) as target`"
        reply = Reply(sent_at=time.perf_counter(), token_ids=[])
        call = self._stub.GenerateStream(self.generate_request(request), timeout=self.timeout, metadata=self._metadata)
        try:
            async for message in call:
                if message.token_ids:
                    reply.chunks.append(Chunk(time.perf_counter(), len(message.token_ids), message.text))
                    reply.token_ids.extend(message.token_ids)  # type: ignore[union-attr]
                if message.finish_reason:
                    reply.finish_reason = FINISH_REASON_NAMES.get(message.finish_reason, "?")
                    if message.HasField("error"):  # this index failed inside the mesh (best_effort)
                        error = MeshError.of_status(message.error)
                        reply.status, reply.error = error.code.name, error.message
                        reply.retry_delay = retry_delay_seconds(error)
                if message.final or message.finish_reason:
                    reply.completion_tokens = message.usage.completion_tokens
                    reply.prompt_tokens = message.usage.prompt_tokens
        except grpc.aio.AioRpcError as exc:
            reply.status, reply.error = exc.code().name, exc.details() or ""
            reply.retry_delay = retry_delay_seconds(from_rpc_error(exc))
        if reply.status == OK and not reply.finish_reason:
            reply.status, reply.error = "INCOMPLETE_STREAM", "the stream ended before any finish_reason"
        reply.ended_at = time.perf_counter()
        return reply
