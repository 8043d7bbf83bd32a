"""The OpenAI-compatible HTTP API and the chat page, served in the gateway's event loop beside its gRPC server.

aiohttp serves it: a mature asyncio HTTP server that streams responses (SSE) and cancels a handler
when its client disconnects (`handler_cancellation`), which is how a closed browser tab or an
aborted fetch cancels the request in the mesh.

Each handler authenticates, turns the JSON into a GenerateRequest (http_openai), then calls the
same InferenceServicer methods the gRPC API calls: one path for validation, limits and the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web
from google.rpc import error_details_pb2

from meshserve.common.config import GatewayConfig
from meshserve.common.errors import HTTP_STATUS, MeshError, from_rpc_error, retry_delay_seconds
from meshserve.gateway.http_openai import (
    OpenAIRequest,
    ResponseShaper,
    chat_request,
    completion_request,
    model_json,
    models_json,
    openai_param,
    openai_text,
    parse_body,
)
from meshserve.gateway.metrics import RequestObserver

if TYPE_CHECKING:
    from meshserve.gateway.server import InferenceServicer

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
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    504: "timeout_error",
}


@dataclass
class HttpServer:
    runner: web.AppRunner
    address: str

    @property
    def url(self) -> str:
        host, port = self.address.rsplit(":", 1)
        return f"http://{host}:{port}/"

    async def stop(self) -> None:
        """Closes the port, lets running requests finish (up to the site's shutdown timeout), then cancels them."""
        await self.runner.cleanup()


def chat_page() -> bytes:
    return (importlib.resources.files("meshserve.gateway") / "static" / "chat.html").read_bytes()


class OpenAIApi:
    def __init__(self, servicer: InferenceServicer, config: GatewayConfig) -> None:
        self.servicer = servicer
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
        self.servicer.authenticate(request.headers.get("Authorization"))
        return web.json_response(models_json(await self.servicer.list_models(names_only=True)))

    async def get_model(self, request: web.Request) -> web.Response:
        self.servicer.authenticate(request.headers.get("Authorization"))
        name = request.match_info["name"]
        for model in await self.servicer.list_models(names_only=True):
            if model.name == name:
                return web.json_response(model_json(model))
        raise MeshError(grpc.StatusCode.NOT_FOUND, f"model: unknown model {name[:200]!r}")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, completion_request, "text_completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat_request, "chat")

    async def _generate(
        self, request: web.Request, parse: Callable[[dict[str, Any]], OpenAIRequest], operation: str
    ) -> web.StreamResponse:
        # The caller's own `traceparent` header, if any, continues its trace.
        with self.servicer.metrics.observe("http", operation, request.headers) as observer:
            return await self._generate_observed(request, parse, observer)

    async def _generate_observed(
        self, request: web.Request, parse: Callable[[dict[str, Any]], OpenAIRequest], observer: RequestObserver
    ) -> web.StreamResponse:
        # Who is asking comes first: a caller without a key learns nothing about the body it sent.
        tenant = self.servicer.authenticate(request.headers.get("Authorization"))
        parsed = parse(parse_body(await self._body(request)))
        request[PARSED] = parsed
        if "X-Request-Id" in request.headers:
            parsed.request.request_id = request.headers["X-Request-Id"]
        admission = await self.servicer.admit(parsed.request, tenant, observer)
        validated = admission.validated
        request_id = validated.token_request.request_id
        shaper = ResponseShaper(parsed, validated.model.name, request_id, validated.model.tokenizer)
        timeout = self.config.http_timeout_seconds
        headers = {"X-Request-Id": request_id}
        if not parsed.stream:
            reply = await self.servicer.complete(admission, timeout)
            return web.json_response(shaper.whole(reply), headers=headers)

        messages = self.servicer.stream(admission, timeout)
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
                await response.write(_sse(error_body(error, parsed)[1]))
            await response.write_eof()
            return response

    async def _body(self, request: web.Request) -> bytes:
        limit = self.config.http_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(request.content_length, limit)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(None, limit) from None


class BodyTooLarge(MeshError):
    """HTTP's own failure (413): gRPC has no such status, its message size limit is RESOURCE_EXHAUSTED."""

    http_status = 413


def _too_large(size: int | None, limit: int) -> MeshError:
    got = f"is {size} bytes" if size is not None else "is too large"
    return BodyTooLarge(grpc.StatusCode.INVALID_ARGUMENT, f"body: {got}; at most {limit} bytes are accepted")


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def error_body(error: MeshError, parsed: OpenAIRequest | None) -> tuple[int, dict[str, Any]]:
    """OpenAI's error shape and HTTP status for a MeshError, fields named as the caller named them."""
    status = BodyTooLarge.http_status if isinstance(error, BodyTooLarge) else HTTP_STATUS.get(error.code, 500)
    violations = [
        (openai_param(v.field, parsed), openai_text(v.description, parsed))
        for detail in error.details
        if isinstance(detail, error_details_pb2.BadRequest)
        for v in detail.field_violations
    ]
    if violations:
        message = "; ".join(f"{name}: {why}" for name, why in violations)
        param = violations[0][0]
    else:
        message = openai_text(error.message, parsed) or error.code.name
        param = message.split(":", 1)[0] if ":" in message and " " not in message.split(":", 1)[0] else None
    code = {
        401: "invalid_api_key",
        404: "model_not_found" if param == "model" else "not_found",
        413: "request_too_large",
    }
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"message": message, "type": error_type, "param": param, "code": code.get(status, error.code.name.lower())}
    return status, {"error": body}


def error_response(error: MeshError, parsed: OpenAIRequest | None) -> web.Response:
    status, body = error_body(error, parsed)
    headers = {}
    delay = retry_delay_seconds(error)
    if delay is not None:
        headers["Retry-After"] = str(max(1, math.ceil(delay)))
    return web.json_response(body, status=status, headers=headers)


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
        body = {
            "message": f"{request.method} {request.path[:200]}: {exc.reason}",
            "type": ERROR_TYPES.get(exc.status, "invalid_request_error"),
            "param": None,
            "code": exc.reason.lower().replace(" ", "_"),
        }
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return web.json_response({"error": body}, status=exc.status, headers=allow)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("unexpected error in %s %s", request.method, request.path)
        error = MeshError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        return error_response(error, None)


def build_app(servicer: InferenceServicer, config: GatewayConfig) -> web.Application:
    # The body limit is checked by OpenAIApi._body (to answer 413 in OpenAI's shape); aiohttp's own stops
    # a body without a Content-Length at the same size.
    app = web.Application(middlewares=[openai_errors], client_max_size=config.http_max_body_bytes)
    app.add_routes(OpenAIApi(servicer, config).routes())
    return app


async def start_http(servicer: InferenceServicer, config: GatewayConfig) -> HttpServer:
    """Serves the HTTP API on config.host:config.http_port (0 picks a free port) in the running loop."""
    runner = web.AppRunner(
        build_app(servicer, config),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=config.drain_seconds,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.http_port)
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
    log.info("OpenAI-compatible API and chat page on http://%s/", address)
    return HttpServer(runner, address)
