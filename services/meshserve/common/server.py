"""The one gRPC server builder every service uses: health, reflection, free ports, graceful drain."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from meshserve.common.channels import SERVER_OPTIONS
from meshserve.common.errors import MeshError, abort, invalid_argument
from meshserve.common.metrics import new_registry
from meshserve.common.telemetry import server_interceptors
from meshserve.common.tls import MeshTls

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Servicer:
    """One gRPC service implementation and how to add it to a server."""

    implementation: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    full_name: str  # e.g. "meshserve.v1.Worker", from the generated descriptor

    @classmethod
    def of(cls, implementation: Any, pb2: ModuleType, pb2_grpc: ModuleType, service: str) -> Servicer:
        """The generated code's way to add `service` ("Worker") and its full name, from its two modules; a request
        whose bytes do not parse is refused naming it (see refusing_undecodable)."""
        add_generated = getattr(pb2_grpc, f"add_{service}Servicer_to_server")
        return cls(
            implementation,
            functools.partial(_add_refusing_undecodable, add_generated),
            pb2.DESCRIPTOR.services_by_name[service].full_name,
        )


@dataclass(frozen=True)
class _Undecodable:
    """What a request whose bytes did not parse (bad UTF-8 in a string, a truncated message) becomes."""

    error: MeshError


def refusing_undecodable(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` (a generated one, of async servicer methods), except that a request or stream message whose bytes
    do not parse is refused INVALID_ARGUMENT saying why, where grpc itself would answer UNKNOWN."""
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Undecodable(
                invalid_argument([("request", f"is not a valid message (every string is UTF-8): {exc}")])
            )

    async def refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await abort(context, request.error)
        return request

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            yield await refuse_undecodable(request, context)

    behaviors: dict[str, Callable[..., Any]] = {}
    if handler.unary_unary:
        method = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await method(await refuse_undecodable(request, context), context)

        behaviors["unary_unary"] = unary_unary
    if handler.unary_stream:
        stream_method = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in stream_method(await refuse_undecodable(request, context), context):
                yield response

        behaviors["unary_stream"] = unary_stream
    if handler.stream_stream:
        bidi_method = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in bidi_method(checked(requests, context), context):
                yield response

        behaviors["stream_stream"] = stream_stream
    assert not handler.stream_unary, "no meshserve method takes a stream and answers once"
    return handler._replace(request_deserializer=deserialize, **behaviors)


class _Captured:
    """Stands in for the server while generated code adds its handlers, so that they can be wrapped first."""

    def __init__(self) -> None:
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come to add_registered_method_handlers

    def add_registered_method_handlers(self, name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.registered[name] = handlers


def _add_refusing_undecodable(add_generated: Callable[[Any, Any], None], implementation: Any, server: Any) -> None:
    captured = _Captured()
    add_generated(implementation, captured)
    assert captured.registered, "the generated code registered no handlers (stubs older than grpcio 1.63?)"
    for name, handlers in captured.registered.items():
        wrapped = {method: refusing_undecodable(handler) for method, handler in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, wrapped),))
        server.add_registered_method_handlers(name, wrapped)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    address: str
    service_names: list[str]
    health: health.aio.HealthServicer
    # The service's Prometheus metrics; the process entry point serves them on --metrics-port.
    metrics: CollectorRegistry = field(default_factory=new_registry)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Called when stopping begins, before the grace period (e.g. to report draining to subscribers).
    on_drain: list[Callable[[], None]] = field(default_factory=list)
    # What grpc.health.v1 says for the whole server; also /healthz on the metrics port (probes without TLS).
    serving: bool = False
    # Why the service stopped itself (it cannot serve any more); its process then exits non-zero.
    failure: str = ""
    _stopped: bool = False

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        self.serving = serving
        await self.health.set("", status)
        for name in self.service_names:
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        """Stops taking calls, gives running ones `grace` seconds, then releases the service's resources."""
        if self._stopped:
            return
        self._stopped = True
        await self.set_serving(False)
        for drain in self.on_drain:
            drain()
        await self.server.stop(grace)
        for cleanup in reversed(self.on_stop):
            await cleanup()


async def start_server(
    host: str,
    port: int,
    servicers: Sequence[Servicer],
    *,
    serving: bool = True,
    metrics: CollectorRegistry | None = None,
    max_connection_age_s: float | None = None,
    tls: MeshTls | None = None,
    max_receive_bytes: int | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Starts a grpc.aio server with health, reflection and tracing on host:port (port 0 picks a free one).

    `max_connection_age_s`: clients are asked (GOAWAY) to reconnect after this long, so that callers that
    spread over every address of a DNS name find replicas added since they connected; calls still running
    get as long again to finish. `tls`: the service's certificate (None: plaintext) and, inside the mesh, the
    check of each caller's identity (common/tls.py). `max_receive_bytes`: the largest request message (a public
    port takes far less than the mesh's own); `interceptors` run before the request is deserialized."""
    options = list(SERVER_OPTIONS)
    if max_connection_age_s:
        age_ms = int(max_connection_age_s * 1000)
        options += [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", age_ms)]
    if max_receive_bytes:
        options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", max_receive_bytes))
    chain = [*(tls.interceptors() if tls else []), *interceptors, *server_interceptors()]
    server = grpc.aio.server(options=options, interceptors=chain)
    for servicer in servicers:
        servicer.add_to_server(servicer.implementation, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.full_name for s in servicers]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is None:
            bound_port = server.add_insecure_port(bind)
        else:
            bound_port = server.add_secure_port(bind, tls.server_credentials())
    except RuntimeError as exc:
        raise SystemExit(f"meshserve: cannot listen on {bind} ({exc}); is another process using the port?") from exc
    await server.start()
    running = RunningServer(
        server, f"{bind.rsplit(':', 1)[0]}:{bound_port}", names, health_servicer, metrics or new_registry()
    )
    await running.set_serving(serving)
    return running


async def serve_until_signalled(running: RunningServer, service: str, drain_seconds: float) -> None:
    """Serves until SIGTERM or SIGINT, then drains: NOT_SERVING, in-flight calls get drain_seconds to end."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    log.info("%s serving on %s", service, running.address)
    stop_requested_task = asyncio.create_task(stop_requested.wait())
    terminated_task = asyncio.create_task(running.server.wait_for_termination())
    await asyncio.wait({stop_requested_task, terminated_task}, return_when=asyncio.FIRST_COMPLETED)
    log.info("%s draining for up to %.0f s", service, drain_seconds)
    await running.stop(drain_seconds)
    for task in (stop_requested_task, terminated_task):
        task.cancel()
    log.info("%s stopped", service)
