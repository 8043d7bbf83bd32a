"""The gateway's calls into the mesh: a single output goes to the router, a fan-out to the aggregator.

Both answer with StreamChunk, whose fields have the numbers and types of the public GenerateStreamResponse
(common.proto), so each is read as the public message straight from its bytes: one parse per message on
this hop, no copy. tests/test_wire.py holds the two messages to that.
"""

from __future__ import annotations

import grpc

from meshserve.v1 import aggregator_pb2, common_pb2, inference_pb2, router_pb2, router_pb2_grpc


def _method(module, service: str, method: str) -> str:
    return f"/{module.DESCRIPTOR.services_by_name[service].full_name}/{method}"


class MeshClient:
    def __init__(self, router: grpc.aio.Channel, aggregator: grpc.aio.Channel) -> None:
        self.router = router_pb2_grpc.RouterStub(router)  # the rest of the router's API (ListModels)
        self._generate = router.unary_stream(
            _method(router_pb2, "Router", "Generate"),
            request_serializer=common_pb2.TokenRequest.SerializeToString,
            response_deserializer=inference_pb2.GenerateStreamResponse.FromString,
        )
        self._fan_out = aggregator.unary_stream(
            _method(aggregator_pb2, "Aggregator", "Generate"),
            request_serializer=aggregator_pb2.FanOutRequest.SerializeToString,
            response_deserializer=inference_pb2.GenerateStreamResponse.FromString,
        )

    def generate(
        self, request: common_pb2.TokenRequest, timeout: float | None
    ) -> grpc.aio.UnaryStreamCall[common_pb2.TokenRequest, inference_pb2.GenerateStreamResponse]:
        return self._generate(request, timeout=timeout)

    def fan_out(
        self, request: aggregator_pb2.FanOutRequest, timeout: float | None
    ) -> grpc.aio.UnaryStreamCall[aggregator_pb2.FanOutRequest, inference_pb2.GenerateStreamResponse]:
        return self._fan_out(request, timeout=timeout)
