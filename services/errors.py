"""Errors as part of the API: one place that maps failures to gRPC status codes with google.rpc details.

Logic raises MeshError (it knows nothing of gRPC); servicer methods are wrapped with
@grpc_errors, which turns MeshError into the right status, relays a downstream service's
status unchanged, and turns anything unexpected into INTERNAL (logged with its traceback).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

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
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details:
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        return status.SerializeToString()


def invalid_argument(violations: Sequence[tuple[str, str]]) -> MeshError:
    """INVALID_ARGUMENT with a BadRequest detail; the message names every bad field."""
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


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a servicer method (coroutine or async generator) so failures leave with the right status."""

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, _as_mesh_error(exc, method))

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, _as_mesh_error(exc, method))

    return unary_wrapper


def _as_mesh_error(exc: Exception, method: Callable[..., Any]) -> MeshError:
    if isinstance(exc, MeshError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        return from_rpc_error(exc)
    log.exception("unexpected error in %s", method.__qualname__)
    return MeshError(grpc.StatusCode.INTERNAL, f"internal error in {method.__qualname__}: {type(exc).__name__}: {exc}")
