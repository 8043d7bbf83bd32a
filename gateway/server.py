"""The gateway's gRPC service, meshserve.v1.Inference: validate, tokenise, send into the mesh, relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from meshserve.channels import aio_channel, relay
from meshserve.config import GatewayConfig
from meshserve.errors import grpc_errors
from meshserve.gateway.models import ModelCatalog
from meshserve.gateway.validation import ValidatedRequest, validate
from meshserve.logs import current_request_id
from meshserve.server import RunningServer, Servicer, start_server
from meshserve.v1 import (
    aggregator_pb2,
    aggregator_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    router_pb2_grpc,
)

log = logging.getLogger(__name__)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        config: GatewayConfig,
        catalog: ModelCatalog,
        router: router_pb2_grpc.RouterStub,
        aggregator: aggregator_pb2_grpc.AggregatorStub,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.router = router
        self.aggregator = aggregator

    @grpc_errors
    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        validated = await self._validate(request)
        request_id = validated.token_request.request_id
        finished: list[common_pb2.Usage] = []
        async for chunk in self._mesh_stream(validated, context.time_remaining()):
            if chunk.finish_reason:
                finished.append(chunk.usage)
            yield inference_pb2.GenerateStreamResponse(
                request_id=request_id,
                index=chunk.index,
                token_ids=chunk.token_ids,
                text=chunk.text,
                finish_reason=chunk.finish_reason,
                usage=chunk.usage if chunk.finish_reason else None,
                logprobs=chunk.logprobs,
            )
        yield inference_pb2.GenerateStreamResponse(request_id=request_id, usage=_usage(validated, finished), final=True)

    @grpc_errors
    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        validated = await self._validate(request)
        completions = [inference_pb2.Completion(index=i) for i in range(validated.n)]
        texts: list[list[str]] = [[] for _ in range(validated.n)]
        async for chunk in self._mesh_stream(validated, context.time_remaining()):
            completion = completions[chunk.index]
            completion.token_ids.extend(chunk.token_ids)
            completion.logprobs.extend(chunk.logprobs)
            texts[chunk.index].append(chunk.text)
            if chunk.finish_reason:
                completion.finish_reason = chunk.finish_reason
                completion.usage.CopyFrom(chunk.usage)
        for completion, text in zip(completions, texts, strict=True):
            completion.text = "".join(text)
        return inference_pb2.GenerateResponse(
            request_id=validated.token_request.request_id,
            model=validated.model.name,
            completions=completions,
            usage=_usage(validated, [c.usage for c in completions]),
        )

    @grpc_errors
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        await self.catalog.refresh()
        response = common_pb2.ListModelsResponse(models=[m.info for m in self.catalog.models.values()])
        if request.names_only:
            for model in response.models:
                model.ClearField("tokenizer_files")
        return response

    async def _validate(self, request: inference_pb2.GenerateRequest) -> ValidatedRequest:
        if request.model:
            await self.catalog.refresh_if_unknown(request.model)
        model = self.catalog.resolve(request.model)
        validated = validate(request, model, self.config.default_max_tokens, self.config.max_n)
        current_request_id.set(validated.token_request.request_id)
        return validated

    async def _mesh_stream(
        self, validated: ValidatedRequest, timeout: float | None
    ) -> AsyncIterator[common_pb2.TokenChunk]:
        """n = 1 goes to the router; n > 1 to the aggregator, which fans out through the router."""
        if validated.n == 1:
            call = self.router.Generate(validated.token_request, timeout=timeout)
        else:
            fan_out = aggregator_pb2.FanOutRequest(request=validated.token_request, n=validated.n)
            call = self.aggregator.Generate(fan_out, timeout=timeout)
        async for chunk in relay(call):
            yield chunk


def _usage(validated: ValidatedRequest, per_index: list[common_pb2.Usage]) -> common_pb2.Usage:
    """The prompt once, the completions of every index; cached prompt tokens of the luckiest index."""
    prompt_tokens = len(validated.token_request.prompt_token_ids)
    completion_tokens = sum(u.completion_tokens for u in per_index)
    return common_pb2.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        cached_prompt_tokens=max((u.cached_prompt_tokens for u in per_index), default=0),
    )


async def start_gateway(config: GatewayConfig) -> RunningServer:
    """Serves at once; reports SERVING on grpc.health.v1 once the router has listed at least one model."""
    router_channel = aio_channel(config.router)
    aggregator_channel = aio_channel(config.aggregator)
    router = router_pb2_grpc.RouterStub(router_channel)
    catalog = ModelCatalog(router)
    servicer = InferenceServicer(config, catalog, router, aggregator_pb2_grpc.AggregatorStub(aggregator_channel))
    running = await start_server(
        config.host,
        config.port,
        [
            Servicer(
                servicer,
                inference_pb2_grpc.add_InferenceServicer_to_server,
                inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            )
        ],
        serving=False,
    )
    ready = asyncio.Event()
    refresher = asyncio.create_task(catalog.keep_fresh(config.model_refresh_seconds, ready))

    async def become_serving() -> None:
        await ready.wait()
        await running.set_serving(True)

    serving_task = asyncio.create_task(become_serving())

    async def stop_background() -> None:
        for task in (refresher, serving_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await router_channel.close()
        await aggregator_channel.close()

    running.on_stop.append(stop_background)
    return running
