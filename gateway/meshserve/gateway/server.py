"""The gateway's gRPC service, meshserve.v1.Inference: validate, tokenise, send into the mesh, relay."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry

from meshserve.common.channels import aio_channel, relay
from meshserve.common.config import GatewayConfig
from meshserve.common.errors import grpc_errors, invalid_argument, not_found
from meshserve.common.logs import current_request_id
from meshserve.common.metrics import new_registry
from meshserve.common.models import ModelCatalog
from meshserve.common.server import RunningServer, Servicer, start_server
from meshserve.gateway.auth import KeyStore, Tenant, is_loopback
from meshserve.gateway.http_server import HttpServer, start_http
from meshserve.gateway.metrics import GatewayMetrics, RequestObserver, operation_name
from meshserve.gateway.rate_limit import RateLimiter, Reservation
from meshserve.gateway.validation import ValidatedRequest, validate
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
        keys: KeyStore | None = None,
        limits: RateLimiter | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.router = router
        self.aggregator = aggregator
        self.keys = keys or KeyStore()
        self.limits = limits or RateLimiter()
        self.metrics = GatewayMetrics(metrics_registry or new_registry())

    # The gRPC methods: credentials from metadata, then the same calls the HTTP API makes.

    @grpc_errors
    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        request = _parsed(request)
        with self.metrics.observe("grpc", operation_name(request)) as observer:
            admission = await self.admit(request, self.authenticate(_authorization(context)), observer)
            async for response in self.stream(admission, context.time_remaining()):
                yield response

    @grpc_errors
    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        request = _parsed(request)
        with self.metrics.observe("grpc", operation_name(request)) as observer:
            admission = await self.admit(request, self.authenticate(_authorization(context)), observer)
            return await self.complete(admission, context.time_remaining())

    @grpc_errors
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        self.authenticate(_authorization(context))
        return common_pb2.ListModelsResponse(models=await self.list_models(_parsed(request).names_only))

    # What both APIs call.

    def authenticate(self, authorization: str | None) -> Tenant:
        """The caller's tenant; UNAUTHENTICATED before anything reaches the router."""
        return self.keys.authenticate(authorization)

    async def admit(
        self, request: inference_pb2.GenerateRequest, tenant: Tenant, observer: RequestObserver | None = None
    ) -> Admission:
        """Priority ceiling, requests/s, validation, then tokens/min: a request that passes may run.

        `observer` (from `metrics.observe`) follows it from here: metrics by model and priority, its span.
        """
        priority = tenant.priority_for(request.priority)
        self.limits.admit(tenant)
        validated = await self._validate(request)
        validated.token_request.tenant = tenant.name
        validated.token_request.priority = priority
        reservation = self.limits.reserve(tenant, _token_budget(request, validated))
        if observer is not None:
            observer.accepted(validated.token_request, validated.model.name, max(validated.n, request.best_of))
        if self.config.log_text:
            log.info("request text", extra={"fields": {"prompts": _prompt_texts(request, validated)}})
        return Admission(validated, tenant, reservation, observer)

    async def stream(
        self, admission: Admission, timeout: float | None
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        used = len(admission.validated.token_request.prompt_token_ids)
        texts: dict[int, list[str]] = {}
        try:
            async for response in self._stream(admission.validated, timeout, admission.observer):
                used = response.usage.total_tokens if response.final else used + len(response.token_ids)
                if self.config.log_text and response.text:
                    texts.setdefault(response.index, []).append(response.text)
                yield response
        finally:
            admission.reservation.settle(used)
            if self.config.log_text:
                _log_output({index: "".join(parts) for index, parts in texts.items()})

    async def complete(self, admission: Admission, timeout: float | None) -> inference_pb2.GenerateResponse:
        used = len(admission.validated.token_request.prompt_token_ids)
        try:
            reply = await self._complete(admission.validated, timeout, admission.observer)
            used = reply.usage.total_tokens
            if self.config.log_text:
                _log_output({c.index: c.text for c in reply.completions})
            return reply
        finally:
            admission.reservation.settle(used)

    async def list_models(self, names_only: bool) -> list[common_pb2.ModelInfo]:
        await self.catalog.refresh()
        models = []
        for served in self.catalog.models.values():
            info = common_pb2.ModelInfo()
            info.CopyFrom(served.info)  # a copy: the catalog's own keeps its tokenizer files
            if names_only:
                info.ClearField("tokenizer_files")
            models.append(info)
        return models

    async def _stream(
        self, validated: ValidatedRequest, timeout: float | None, observer: RequestObserver | None
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        request_id = validated.token_request.request_id
        finished: list[common_pb2.Usage] = []
        total: common_pb2.Usage | None = None  # a fan-out's, counted by the aggregator
        async for message in self._mesh_stream(validated, timeout, observer):
            if message.final:
                total = message.usage
                continue
            chunk = message.chunk
            if chunk.finish_reason:
                finished.append(chunk.usage)
            response = inference_pb2.GenerateStreamResponse(
                request_id=request_id,
                index=chunk.index,
                token_ids=chunk.token_ids,
                text=chunk.text,
                finish_reason=chunk.finish_reason,
                usage=chunk.usage if chunk.finish_reason else None,
                logprobs=chunk.logprobs,
                error=message.error if message.HasField("error") else None,
            )
            if message.HasField("mean_logprob"):
                response.mean_logprob = message.mean_logprob
            yield response
        usage = total if total is not None else _usage(validated, finished)
        yield inference_pb2.GenerateStreamResponse(request_id=request_id, usage=usage, final=True)

    async def _complete(
        self, validated: ValidatedRequest, timeout: float | None, observer: RequestObserver | None
    ) -> inference_pb2.GenerateResponse:
        # By index: a fan-out may leave indices out (dedupe) and finish them in any order.
        completions: dict[int, inference_pb2.Completion] = {}
        texts: dict[int, list[str]] = {}
        total: common_pb2.Usage | None = None
        async for message in self._mesh_stream(validated, timeout, observer):
            if message.final:
                total = message.usage
                continue
            chunk = message.chunk
            completion = completions.setdefault(chunk.index, inference_pb2.Completion(index=chunk.index))
            completion.token_ids.extend(chunk.token_ids)
            completion.logprobs.extend(chunk.logprobs)
            texts.setdefault(chunk.index, []).append(chunk.text)
            if message.HasField("error"):
                completion.errors.append(message.error)
            if message.HasField("mean_logprob"):
                completion.mean_logprob = message.mean_logprob
            if chunk.finish_reason:
                completion.finish_reason = chunk.finish_reason
                completion.usage.CopyFrom(chunk.usage)
        ordered = [completions[index] for index in sorted(completions)]
        for completion in ordered:
            completion.text = "".join(texts[completion.index])
        return inference_pb2.GenerateResponse(
            request_id=validated.token_request.request_id,
            model=validated.model.name,
            completions=ordered,
            usage=total if total is not None else _usage(validated, [c.usage for c in ordered]),
        )

    async def _validate(self, request: inference_pb2.GenerateRequest) -> ValidatedRequest:
        if request.model:
            await self.catalog.refresh_if_unknown(request.model)
            if request.model not in self.catalog.models:
                available = ", ".join(sorted(self.catalog.models)) or "none yet (the workers are still starting)"
                raise not_found("model", f"unknown model {request.model[:200]!r}; available: {available}")
        model = self.catalog.resolve(request.model)
        validated = validate(request, model, self.config.default_max_tokens, self.config.max_n)
        current_request_id.set(validated.token_request.request_id)
        return validated

    async def _mesh_stream(
        self, validated: ValidatedRequest, timeout: float | None, observer: RequestObserver | None
    ) -> AsyncIterator[aggregator_pb2.FanOutChunk]:
        """A single output goes to the router; a fan-out to the aggregator, which sends its sub-requests through
        the router. Either way the messages come as the aggregator's (a router chunk wrapped)."""
        with observer.calling() if observer is not None else contextlib.nullcontext():
            if validated.fan_out is None:
                call = self.router.Generate(validated.token_request, timeout=timeout)
            else:
                # The parent as admitted (tenant, priority), which may differ from what validation saw.
                validated.fan_out.request.CopyFrom(validated.token_request)
                call = self.aggregator.Generate(validated.fan_out, timeout=timeout)
        async for message in relay(call):
            if validated.fan_out is None:
                message = aggregator_pb2.FanOutChunk(chunk=message)
            if observer is not None and not message.final:
                observer.tokens(message.chunk.index, len(message.chunk.token_ids), message.chunk.finish_reason)
            yield message


@dataclass
class Admission:
    """A request that passed authentication, validation and its tenant's limits."""

    validated: ValidatedRequest
    tenant: Tenant
    reservation: Reservation
    observer: RequestObserver | None = None


LOGGED_TEXT_CHARS = 4000  # per text, with --log-text: enough to debug, not a copy of a book


def _prompt_texts(request: inference_pb2.GenerateRequest, validated: ValidatedRequest) -> list[str]:
    """What the model is asked, as text: the prompt as tokenised (chat template applied), or each input."""
    tokenizer = validated.model.tokenizer
    if validated.token_request.prompt_token_ids:
        texts = [tokenizer.decode(validated.token_request.prompt_token_ids, skip_special_tokens=False)]
    elif request.HasField("map_reduce"):
        texts = [request.map_reduce.text]
    else:  # a batch, tokenised for the aggregator
        inputs = validated.fan_out.inputs if validated.fan_out is not None else []
        texts = [tokenizer.decode(item.prompt_token_ids, skip_special_tokens=False) for item in inputs]
    return [text[:LOGGED_TEXT_CHARS] for text in texts]


def _log_output(texts: dict[int, str]) -> None:
    outputs = {str(index): text[:LOGGED_TEXT_CHARS] for index, text in sorted(texts.items())}
    log.info("generated text", extra={"fields": {"outputs": outputs}})


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


def _token_budget(request: inference_pb2.GenerateRequest, validated: ValidatedRequest) -> int:
    """The most tokens a request may use: its prompt and max_tokens for every completion it generates."""
    completions = max(validated.n, request.best_of)
    inputs = max(1, len(request.batch.inputs))
    prompt = len(validated.token_request.prompt_token_ids)
    return inputs * (prompt + completions * validated.token_request.sampling.max_tokens)


@dataclass
class Undecodable:
    """A request whose bytes did not parse (bad UTF-8 in a string, a truncated message)."""

    type_name: str
    reason: str


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(exc))

    return parse


def _parsed(request: Any) -> Any:
    if isinstance(request, Undecodable):
        why = f"is not a valid {request.type_name} (every string must be UTF-8): {request.reason}"
        raise invalid_argument([("request", why)])
    return request


def add_inference_servicer(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """As the generated add_InferenceServicer_to_server, except that a request that does not parse gets
    INVALID_ARGUMENT saying why, where grpc itself would answer UNKNOWN."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_lenient(inference_pb2.GenerateRequest),
            response_serializer=inference_pb2.GenerateResponse.SerializeToString,
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream,
            request_deserializer=_lenient(inference_pb2.GenerateRequest),
            response_serializer=inference_pb2.GenerateStreamResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=_lenient(common_pb2.ListModelsRequest),
            response_serializer=common_pb2.ListModelsResponse.SerializeToString,
        ),
    }
    name = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


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


@dataclass
class RunningGateway(RunningServer):
    # The OpenAI-compatible API and chat page; None with --http-port -1.
    http: HttpServer | None = None


def key_store(config: GatewayConfig) -> KeyStore:
    """The gateway's API keys. Secure by default: no keys is allowed on loopback only, unless asked for."""
    try:
        keys = KeyStore(config.api_keys_file)
    except ValueError as exc:
        raise SystemExit(f"meshserve: {exc}") from exc
    if not keys.required and not is_loopback(config.host):
        if not config.allow_unauthenticated:
            raise SystemExit(
                f"meshserve: refusing to serve on {config.host} without API keys: anyone who can reach it could "
                "use the mesh. Pass --api-keys-file FILE (entries from `meshserve hash-key`), or "
                "--allow-unauthenticated to serve without keys on purpose."
            )
        log.warning("serving on %s without API keys (--allow-unauthenticated)", config.host)
    return keys


async def start_gateway(config: GatewayConfig) -> RunningGateway:
    """Serves at once; reports SERVING on grpc.health.v1 once the router has listed at least one model."""
    keys = key_store(config)
    router_channel = aio_channel(config.router)
    aggregator_channel = aio_channel(config.aggregator)
    router = router_pb2_grpc.RouterStub(router_channel)
    catalog = ModelCatalog(router)
    registry = new_registry()
    servicer = InferenceServicer(
        config, catalog, router, aggregator_pb2_grpc.AggregatorStub(aggregator_channel), keys, RateLimiter(), registry
    )
    running = await start_server(
        config.host,
        config.port,
        [
            Servicer(
                servicer,
                add_inference_servicer,
                inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            )
        ],
        serving=False,
        metrics=registry,
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
    try:
        http = await start_http(servicer, config) if config.http_port >= 0 else None
    except BaseException:
        await running.stop(0)
        raise
    gateway = RunningGateway(**{f.name: getattr(running, f.name) for f in dataclasses.fields(running)}, http=http)
    if http is not None:
        # Both APIs drain together: the HTTP port closes when draining starts, its streams get the same grace.
        http_stopping: list[asyncio.Task[None]] = []
        gateway.on_drain.append(lambda: http_stopping.append(asyncio.get_running_loop().create_task(http.stop())))

        async def stop_http() -> None:
            await (http_stopping[0] if http_stopping else http.stop())

        gateway.on_stop.append(stop_http)
    return gateway
