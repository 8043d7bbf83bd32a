"""Errors as part of the API: one place that maps failures to gRPC status codes with google.rpc details.

Logic raises MeshError (it knows nothing of gRPC); servicer methods are wrapped with
@grpc_errors, which turns MeshError into the right status, relays a downstream service's
status unchanged, and turns anything unexpected into INTERNAL (logged with its traceback).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from meshserve.common.logs import current_request_id
from meshserve.v1 import common_pb2

log = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class MeshError(Exception):
    """A failure with the gRPC status code a caller should see and what they can do about it."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details)

    def status_details_bin(self) -> bytes:
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=self._packed_details())
        return status.SerializeToString()

    def error_status(self) -> common_pb2.ErrorStatus:
        """As it travels inside a stream message (one sequence of a shared stream, one index of a fan-out)."""
        return common_pb2.ErrorStatus(code=self.code.value[0], message=self.message, details=self._packed_details())

    @classmethod
    def of_status(cls, status: common_pb2.ErrorStatus) -> MeshError:
        details = [d for d in (_unpack(packed) for packed in status.details) if d is not None]
        return cls(STATUS_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN), status.message, details)

    def _packed_details(self) -> list[any_pb2.Any]:
        packed = []
        for detail in self.details:
            one = any_pb2.Any()
            one.Pack(detail)
            packed.append(one)
        return packed


STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


MAX_REPORTED_VIOLATIONS = 16


def invalid_argument(violations: Sequence[tuple[str, str]]) -> MeshError:
    """INVALID_ARGUMENT with a BadRequest detail; the message names the bad fields, the first
    MAX_REPORTED_VIOLATIONS of them: a hostile body with a million bad items gets a short answer."""
    if len(violations) > MAX_REPORTED_VIOLATIONS:
        more = len(violations) - MAX_REPORTED_VIOLATIONS
        violations = [*violations[:MAX_REPORTED_VIOLATIONS], ("...", f"and {more} more like these")]
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=name, description=why) for name, why in violations
        ]
    )
    message = "; ".join(f"{name}: {why}" for name, why in violations)
    return MeshError(grpc.StatusCode.INVALID_ARGUMENT, message, [bad_request])


def unavailable(message: str, retry_after_seconds: float | None = None) -> MeshError:
    return retry_later(grpc.StatusCode.UNAVAILABLE, message, retry_after_seconds)


def resource_exhausted(message: str, retry_after_seconds: float | None = None) -> MeshError:
    return retry_later(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_seconds)


def unauthenticated(message: str) -> MeshError:
    return MeshError(grpc.StatusCode.UNAUTHENTICATED, message)


def permission_denied(message: str, reason: str, **metadata: str) -> MeshError:
    """PERMISSION_DENIED with a google.rpc.ErrorInfo whose reason a program can match on."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain="meshserve", metadata=metadata)
    return MeshError(grpc.StatusCode.PERMISSION_DENIED, message, [info])


def not_found(field_name: str, why: str) -> MeshError:
    """NOT_FOUND for a named thing that does not exist (a model); BadRequest names the field that named it."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field_name, description=why)
    return MeshError(
        grpc.StatusCode.NOT_FOUND, f"{field_name}: {why}", [error_details_pb2.BadRequest(field_violations=[violation])]
    )


# The HTTP status of each gRPC code (as google.rpc.Code documents them; 499 is "client closed request").
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def retry_delay_seconds(error: MeshError) -> float | None:
    """The delay of the error's RetryInfo, if it has one."""
    for detail in error.details:
        if isinstance(detail, error_details_pb2.RetryInfo):
            return detail.retry_delay.ToMilliseconds() / 1000
    return None


def retry_later(code: grpc.StatusCode, message: str, retry_after_seconds: float | None) -> MeshError:
    """An error with a google.rpc.RetryInfo saying when to try again."""
    details = []
    if retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry_after_seconds * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return MeshError(code, message, details)


def from_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> MeshError:
    """Keeps a downstream service's status (code, message, details) as it crosses this hop."""
    details_bin = None
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            details_bin = value
    err = MeshError(error.code(), error.details() or "")
    if details_bin:
        status = status_pb2.Status.FromString(details_bin)
        err.details = [_unpack(detail) for detail in status.details]
        err.details = [d for d in err.details if d is not None]
    return err


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    """The field names in a BadRequest detail of a received error (for clients and tests)."""
    return [
        v.field
        for d in from_rpc_error(error).details
        if isinstance(d, error_details_pb2.BadRequest)
        for v in d.field_violations
    ]


def _unpack(packed: any_pb2.Any) -> Any:
    for detail_type in (
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
        error_details_pb2.ErrorInfo,
    ):
        if packed.Is(detail_type.DESCRIPTOR):
            detail = detail_type()
            packed.Unpack(detail)
            return detail
    return None


async def abort(context: grpc.aio.ServicerContext, error: MeshError) -> None:
    await context.abort(
        error.code, error.message, trailing_metadata=((STATUS_DETAILS_KEY, error.status_details_bin()),)
    )


# Codes whose messages are written inside the mesh (an address, a connection's failure, an exception's text) and
# not by a check the caller can act on. At the public edge they become a stable message with the request id.
PRIVATE_CODES = (
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAVAILABLE,
)
PUBLIC_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "the mesh cannot serve this request right now; retry",
}


def for_clients(error: MeshError, request_id: str) -> MeshError:
    """The error as a caller outside the mesh sees it: a private code's message is replaced (it is logged here,
    under the request id, for whoever runs the mesh); RetryInfo stays."""
    if error.code not in PRIVATE_CODES:
        return error
    log.warning("request %s failed: %s: %s", request_id or "-", error.code.name, error.message)
    said = PUBLIC_MESSAGES.get(error.code, "internal error")
    message = f"{said} (request id {request_id}: its details are in the gateway's logs)" if request_id else said
    return MeshError(error.code, message, [d for d in error.details if isinstance(d, error_details_pb2.RetryInfo)])


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a servicer method (coroutine or async generator) so failures leave with the right status."""
    return _with_status(method, public=False)


def public_grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """As grpc_errors, for a public service: private failures leave as `for_clients` words them."""
    return _with_status(method, public=True)


def _with_status(method: Callable[..., Any], public: bool) -> Callable[..., Any]:
    def status_of(exc: Exception) -> MeshError:
        error = _as_mesh_error(exc, method)
        return for_clients(error, current_request_id.get()) if public else error

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, status_of(exc))

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, status_of(exc))

    return unary_wrapper


def status_code_name(exc: BaseException | None) -> str:
    """The gRPC status name a caller sees when a handler ends with `exc` (None: OK), for metrics and spans."""
    if exc is None:
        return "OK"
    if isinstance(exc, MeshError):
        return exc.code.name
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "INTERNAL"


def _as_mesh_error(exc: Exception, method: Callable[..., Any]) -> MeshError:
    if isinstance(exc, MeshError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        return from_rpc_error(exc)
    log.exception("unexpected error in %s", method.__qualname__)
    return MeshError(grpc.StatusCode.INTERNAL, f"internal error in {method.__qualname__}: {type(exc).__name__}: {exc}")
