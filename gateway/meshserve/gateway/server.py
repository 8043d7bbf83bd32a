"""The gateway's gRPC service, meshserve.v1.Inference: the request path of gateway/infer.py behind gRPC.

Credentials come from the call's metadata; a request whose bytes do not parse is INVALID_ARGUMENT saying
why. The same process serves the OpenAI-compatible HTTP API (gateway/http_server.py) over the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from meshserve.common.channels import aio_channel
from meshserve.common.config import GatewayConfig
from meshserve.common.errors import MeshError, abort, public_grpc_errors
from meshserve.common.metrics import new_registry
from meshserve.common.models import ModelCatalog
from meshserve.common.objectives import parse_ttft_objectives
from meshserve.common.renewing_channel import RenewingChannel
from meshserve.common.routers import Routers
from meshserve.common.server import RunningServer, Servicer, start_server
from meshserve.common.tls import mesh_tls, refuse_off_loopback
from meshserve.gateway.auth import KeyStore
from meshserve.gateway.http_server import HttpServer, start_http
from meshserve.gateway.infer import Infer
from meshserve.gateway.mesh_client import MeshClient
from meshserve.gateway.metrics import operation_name
from meshserve.gateway.rate_limit import RateLimiter
from meshserve.gateway.validation import MAX_REQUEST_BYTES
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """The gRPC methods: credentials from metadata, then the request path the HTTP API takes too."""

    def __init__(self, core: Infer) -> None:
        self.core = core

    @public_grpc_errors
    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        core = self.core
        with core.metrics.observe("grpc", operation_name(request)) as observer:
            admission = await core.admit(request, core.authenticate(_authorization(context)), observer)
            async for response in core.stream(admission, self._timeout(context)):
                yield response

    @public_grpc_errors
    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        core = self.core
        with core.metrics.observe("grpc", operation_name(request)) as observer:
            admission = await core.admit(request, core.authenticate(_authorization(context)), observer)
            return await core.complete(admission, self._timeout(context))

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The call's deadline, at most --max-request-seconds: a caller that sets none cannot hold a stream
        and its worker's seat forever."""
        remaining = context.time_remaining()
        longest = self.core.config.max_request_seconds
        return longest if remaining is None else min(remaining, longest)

    @public_grpc_errors
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        self.core.authenticate(_authorization(context))
        include = request.include_tokenizer_files and not request.names_only
        return common_pb2.ListModelsResponse(models=await self.core.list_models(include))


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return authorization_of(context.invocation_metadata())


def authorization_of(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Checks the API key of an Inference call before its request is deserialized: a caller without a valid key
    makes the gateway parse nothing (the port's message size limit bounds what it makes it receive)."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        self.prefix = "/" + inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name + "/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler  # health and reflection stay open for probes
        try:
            self.keys.authenticate(authorization_of(details.invocation_metadata))
        except MeshError as exc:
            return _refusal(handler, exc)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, error: MeshError) -> grpc.RpcMethodHandler:
    """A handler of the same kind that takes the request as raw bytes (no deserializer) and fails with `error`."""

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
        await abort(context, error)

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


@dataclass
class RunningGateway(RunningServer):
    # The OpenAI-compatible API and chat page; None with --http-port -1.
    http: HttpServer | None = None
    # The request path both APIs share (its rate limiter, catalog), for tests and tools in this process.
    infer: Infer | None = None


PREFIX_CACHE_SCOPES = ("tenant", "shared")


def key_store(config: GatewayConfig) -> KeyStore:
    """The gateway's API keys. Secure by default: no keys is allowed on loopback only, unless asked for."""
    try:
        keys = KeyStore(config.api_keys_file)
    except ValueError as exc:
        raise SystemExit(f"meshserve: {exc}") from exc
    if not keys.required:
        refuse_off_loopback(
            config.host,
            "API keys",
            "anyone who can reach it could use the mesh",
            "--api-keys-file FILE (entries from `meshserve hash-key`)",
            "--allow-unauthenticated",
            config.allow_unauthenticated,
        )
    return keys


async def start_gateway(config: GatewayConfig) -> RunningGateway:
    """Serves at once; reports SERVING on grpc.health.v1 once the router has listed at least one model."""
    if config.prefix_cache_scope not in PREFIX_CACHE_SCOPES:
        raise SystemExit(
            f"meshserve: --prefix-cache-scope must be one of {', '.join(PREFIX_CACHE_SCOPES)}, "
            f"not {config.prefix_cache_scope!r}"
        )
    try:
        parse_ttft_objectives(config.slo_ttft)
    except ValueError as exc:
        raise SystemExit(f"meshserve: --slo-ttft {exc}") from exc
    keys = key_store(config)
    tls = mesh_tls(config, "gateway")  # the public ports' certificate, and the one it shows inside the mesh
    try:
        routers = Routers(config.router, inference_pb2.GenerateStreamResponse, tls)
    except ValueError as exc:
        raise SystemExit(f"meshserve: {exc}") from exc
    aggregator_channel = RenewingChannel(functools.partial(aio_channel, config.aggregator), tls, "aggregator")
    mesh = MeshClient(routers, aggregator_channel)
    catalog = ModelCatalog(routers)
    registry = new_registry()
    core = Infer(config, catalog, mesh, keys, RateLimiter(replicas=config.gateway_replicas), registry)
    servicer = InferenceServicer(core)
    running = await start_server(
        config.host,
        config.port,
        [
            # A request that does not parse gets INVALID_ARGUMENT saying why (common/server.py), where grpc itself
            # would answer UNKNOWN.
            Servicer.of(servicer, inference_pb2, inference_pb2_grpc, "Inference")
        ],
        serving=False,
        metrics=registry,
        tls=tls,
        # What any caller, keyed or not, can make the public port receive: the largest valid request.
        max_receive_bytes=MAX_REQUEST_BYTES,
        interceptors=[ApiKeyInterceptor(keys)],
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
        await routers.close()
        await aggregator_channel.close()

    running.on_stop.append(stop_background)
    try:
        http = await start_http(core, config, tls.files if tls else None) if config.http_port >= 0 else None
    except BaseException:
        await running.stop(0)
        raise
    fields = {f.name: getattr(running, f.name) for f in dataclasses.fields(running)}
    gateway = RunningGateway(**fields, http=http, infer=core)
    if http is not None:
        # Both APIs drain together: the HTTP port closes when draining starts, its streams get the same grace.
        http_stopping: list[asyncio.Task[None]] = []
        gateway.on_drain.append(lambda: http_stopping.append(asyncio.get_running_loop().create_task(http.stop())))

        async def stop_http() -> None:
            await (http_stopping[0] if http_stopping else http.stop())

        gateway.on_stop.append(stop_http)
    return gateway
