"""The OpenAI-compatible HTTP API and the chat page, served in the gateway's event loop beside its gRPC server.

aiohttp serves it: a mature asyncio HTTP server that streams responses (SSE) and cancels a handler
when its client disconnects (`handler_cancellation`), which is how a closed browser tab or an
aborted fetch cancels the request in the mesh.

Each handler authenticates, turns the JSON into a GenerateRequest (http_openai), then calls the
request path the gRPC API calls too (gateway/infer.py): one path for validation, limits and the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from pydantic import BaseModel

from meshserve.common.config import GatewayConfig
from meshserve.common.errors import MeshError, for_clients, from_rpc_error, retry_delay_seconds
from meshserve.common.logs import current_request_id
from meshserve.common.tls import TlsFiles
from meshserve.gateway.http_openai import (
    OpenAIRequest,
    ResponseShaper,
    chat_request,
    completion_request,
    model_card,
    model_list,
    parse_body,
)
from meshserve.gateway.http_origin import BrowserGuard
from meshserve.gateway.infer import Infer
from meshserve.gateway.metrics import RequestObserver
from meshserve.gateway.openai_errors import ERROR_TYPES, BodyTimeout, BodyTooLarge, UnsupportedMediaType, error_body
from meshserve.gateway.openai_responses import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

# Where a handler keeps the parsed body on its request, so errors can use the caller's field names.
PARSED = web.RequestKey("parsed", OpenAIRequest)
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies such as nginx must not hold events back
}
# The page is one file with inline script and style; it may talk only to this server.
PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class HttpServer:
    runner: web.AppRunner
    address: str
    tls: bool = False

    @property
    def url(self) -> str:
        host, port = self.address.rsplit(":", 1)
        return f"{'https' if self.tls else 'http'}://{host}:{port}/"

    async def stop(self) -> None:
        """Closes the port, lets running requests finish (up to the site's shutdown timeout), then cancels them."""
        await self.runner.cleanup()


def chat_page() -> bytes:
    return (importlib.resources.files("meshserve.gateway") / "static" / "chat.html").read_bytes()


def json_response(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, headers=headers, content_type="application/json")


class OpenAIApi:
    def __init__(self, infer: Infer, config: GatewayConfig) -> None:
        self.infer = infer
        self.config = config
        self.page = chat_page()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.index),
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{name:.+}", self.get_model),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
        ]

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=self.page, headers=PAGE_HEADERS)

    async def list_models(self, request: web.Request) -> web.Response:
        self.infer.authenticate(request.headers.get("Authorization"))
        return json_response(model_list(await self.infer.list_models()))

    async def get_model(self, request: web.Request) -> web.Response:
        self.infer.authenticate(request.headers.get("Authorization"))
        name = request.match_info["name"]
        for model in await self.infer.list_models():
            if model.name == name:
                return json_response(model_card(model))
        raise MeshError(grpc.StatusCode.NOT_FOUND, f"model: unknown model {name[:200]!r}")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, completion_request, "text_completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat_request, "chat")

    async def _generate(
        self, request: web.Request, parse: Callable[[dict[str, Any]], OpenAIRequest], operation: str
    ) -> web.StreamResponse:
        # The caller's own `traceparent` header, if any, continues its trace.
        with self.infer.metrics.observe("http", operation, request.headers) as observer:
            return await self._generate_observed(request, parse, observer)

    async def _generate_observed(
        self, request: web.Request, parse: Callable[[dict[str, Any]], OpenAIRequest], observer: RequestObserver
    ) -> web.StreamResponse:
        # Who is asking comes first: a caller without a key learns nothing about the body it sent.
        tenant = self.infer.authenticate(request.headers.get("Authorization"))
        body = await self._body(request)
        # In a thread, as tokenising is: parsing megabytes of JSON must not stall other streams.
        parsed = await asyncio.to_thread(lambda: parse(parse_body(body)))
        request[PARSED] = parsed
        if "X-Request-Id" in request.headers:
            parsed.request.request_id = request.headers["X-Request-Id"]
        admission = await self.infer.admit(parsed.request, tenant, observer)
        validated = admission.validated
        shaper = ResponseShaper(parsed, validated.model.name, validated.response_id, validated.model.tokenizer)
        timeout = self.config.http_timeout_seconds
        headers = {"X-Request-Id": validated.response_id}
        if not parsed.stream:
            reply = await self.infer.complete(admission, timeout)
            return json_response(shaper.whole(reply), headers=headers)

        messages = self.infer.stream(admission, timeout)
        async with contextlib.aclosing(messages):
            # Wait for the first message before answering 200, so a request the mesh refuses (shed,
            # over a limit, no worker) still gets its own HTTP status.
            first = await anext(messages)
            response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
            await response.prepare(request)
            try:
                message: Any = first
                while message is not None:
                    event = shaper.chunk(message)
                    if event is not None:
                        await response.write(_sse(event))
                    message = await anext(messages, None)
                await response.write(b"data: [DONE]\n\n")
            except (MeshError, grpc.aio.AioRpcError) as exc:
                # Headers are gone: the error travels as an event, which OpenAI clients raise.
                error = exc if isinstance(exc, MeshError) else from_rpc_error(exc)
                observer.outcome = error
                error = for_clients(error, validated.token_request.request_id)
                await response.write(_sse(error_body(error, parsed.body)[1].model_dump_json()))
            await response.write_eof()
            return response

    async def _body(self, request: web.Request) -> bytes:
        if request.content_type != "application/json":
            declared = request.headers.get("Content-Type", "")[:100] or "none"
            raise UnsupportedMediaType(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Content-Type: the body must be sent as application/json, got {declared!r}",
            )
        limit = self.config.http_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(request.content_length, limit)
        try:
            async with asyncio.timeout(self.config.http_body_seconds):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(None, limit) from None
        except TimeoutError:
            raise BodyTimeout(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"body: not all of it arrived within {self.config.http_body_seconds:g} s (--http-body-seconds)",
            ) from None


def _too_large(size: int | None, limit: int) -> MeshError:
    got = f"is {size} bytes" if size is not None else "is too large"
    return BodyTooLarge(grpc.StatusCode.INVALID_ARGUMENT, f"body: {got}; at most {limit} bytes are accepted")


def _sse(event_json: str) -> bytes:
    return b"data: " + event_json.encode("utf-8") + b"\n\n"


def error_response(error: MeshError, parsed: OpenAIRequest | None) -> web.Response:
    """The error in OpenAI's shape; a private one (an address, an exception's text) in the stable words of
    for_clients, its details logged under the request id, which the response carries."""
    request_id = current_request_id.get()  # the mesh's: the one the logs are under
    status, body = error_body(for_clients(error, request_id), parsed.body if parsed is not None else None)
    response_id = (parsed.request.request_id if parsed is not None else "") or request_id
    headers = {"X-Request-Id": response_id} if response_id else {}
    delay = retry_delay_seconds(error)
    if delay is not None:
        headers["Retry-After"] = str(max(1, math.ceil(delay)))
    return json_response(body, status=status, headers=headers)


@web.middleware
async def openai_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """Every failure leaves in OpenAI's error shape with its HTTP status; nothing leaves as a bare 500."""
    try:
        return await handler(request)
    except MeshError as exc:
        return error_response(exc, request.get(PARSED))
    except grpc.aio.AioRpcError as exc:
        return error_response(from_rpc_error(exc), request.get(PARSED))
    except web.HTTPException as exc:  # no such path, wrong method
        if exc.status < 400:
            raise
        info = ErrorInfo(
            message=f"{request.method} {request.path[:200]}: {exc.reason}",
            type=ERROR_TYPES.get(exc.status, "invalid_request_error"),
            param=None,
            code=exc.reason.lower().replace(" ", "_"),
        )
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return json_response(ErrorResponse(error=info), status=exc.status, headers=allow)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(MeshError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"), None)


def bound_connections(server: web.Server, limit: int) -> None:
    """Past `limit` open connections, each new one is closed as it arrives: descriptors stay bounded."""
    accept = server.connection_made

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        accept(handler, transport)
        if len(server.connections) > limit:
            log.warning("closing a new HTTP connection: %d are open (--http-max-connections)", limit)
            handler.force_close()
            transport.close()

    server.connection_made = connection_made  # type: ignore[method-assign]


def build_app(infer: Infer, config: GatewayConfig) -> web.Application:
    # The body limit is checked by OpenAIApi._body (to answer 413 in OpenAI's shape); aiohttp's own stops
    # a body without a Content-Length at the same size.
    guard = BrowserGuard(config.host, config.http_allowed_origins, config.http_allowed_hosts)
    app = web.Application(middlewares=[openai_errors, guard.middleware], client_max_size=config.http_max_body_bytes)
    app.add_routes(OpenAIApi(infer, config).routes())
    return app


async def start_http(infer: Infer, config: GatewayConfig, tls: TlsFiles | None = None) -> HttpServer:
    """Serves the HTTP API on config.host:config.http_port (0 picks a free port) in the running loop; HTTPS
    with `tls` (its certificate re-read when the files change; no client certificate asked for)."""
    runner = web.AppRunner(
        build_app(infer, config),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=config.drain_seconds,
        # Closes a connection idle this long, or one still sending a request's headers (aiohttp arms it when the
        # connection opens and after each response): slow-loris headers are cut.
        keepalive_timeout=config.http_keepalive_seconds,
    )
    await runner.setup()
    assert runner.server is not None
    bound_connections(runner.server, config.http_max_connections)
    site = web.TCPSite(runner, config.host, config.http_port, ssl_context=tls.ssl_context() if tls else None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(
            f"meshserve: cannot serve HTTP on {config.host}:{config.http_port} ({exc}); "
            "choose another --http-port, or -1 for none"
        ) from exc
    host, port = runner.addresses[0][:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    served = HttpServer(runner, address, tls is not None)
    log.info("OpenAI-compatible API and chat page on %s", served.url)
    return served
