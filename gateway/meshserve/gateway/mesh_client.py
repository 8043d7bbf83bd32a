"""The gateway's calls into the mesh: a single output goes to a router, a fan-out to the aggregator.

Both answer with StreamChunk, whose fields have the numbers and types of the public GenerateStreamResponse
(common.proto), so each is read as the public message straight from its bytes: one parse per message on
this hop, no copy. tests/test_wire.py holds the two messages to that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from meshserve.common.errors import from_rpc_error
from meshserve.common.renewing_channel import RenewingChannel
from meshserve.common.routers import Routers
from meshserve.v1 import aggregator_pb2, inference_pb2


def _method(module, service: str, method: str) -> str:
    return f"/{module.DESCRIPTOR.services_by_name[service].full_name}/{method}"


def _fan_out_method(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamMultiCallable:
    return channel.unary_stream(
        _method(aggregator_pb2, "Aggregator", "Generate"),
        request_serializer=aggregator_pb2.FanOutRequest.SerializeToString,
        response_deserializer=inference_pb2.GenerateStreamResponse.FromString,
    )


class MeshClient:
    def __init__(self, routers: Routers, aggregator: RenewingChannel) -> None:
        self.routers = routers  # spread over, and resumed across when one is lost (common/routers.py)
        self.aggregator = aggregator  # made again when the TLS files change

    def generate(
        self, request, timeout: float | None, parent: Context | None = None
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        """`parent`: the trace context its calls into the mesh are made in (every attempt's)."""
        return self.routers.generate(request, timeout, parent)

    async def fan_out(
        self, request: aggregator_pb2.FanOutRequest, timeout: float | None, parent: Context | None = None
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        token = otel_context.attach(parent) if parent is not None else None
        try:
            call = self.aggregator.derived("fan_out", _fan_out_method)(request, timeout=timeout)
        finally:
            if token is not None:
                otel_context.detach(token)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            call.cancel()
