"""The aggregator's gRPC service: one request with n samples becomes n sub-requests through the router."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import grpc

from meshserve.aggregator.merge import merge_streams
from meshserve.channels import aio_channel, relay
from meshserve.config import AggregatorConfig
from meshserve.errors import grpc_errors, invalid_argument
from meshserve.logs import current_request_id
from meshserve.server import RunningServer, Servicer, start_server
from meshserve.v1 import aggregator_pb2, aggregator_pb2_grpc, common_pb2, router_pb2_grpc

SEED_MODULUS = 2**64


def sub_requests(parent: common_pb2.TokenRequest, n: int) -> list[common_pb2.TokenRequest]:
    """Sub-request i is the parent with index i and seed (seed + i): each equals that seeded request alone.

    Without a seed, a random base seed is drawn, so the n samples still differ.
    """
    base_seed = parent.sampling.seed if parent.sampling.HasField("seed") else int.from_bytes(os.urandom(8), "little")
    subs = []
    for index in range(n):
        sub = common_pb2.TokenRequest()
        sub.CopyFrom(parent)
        sub.index = index
        sub.request_id = f"{parent.request_id}/{index}"
        sub.sampling.seed = (base_seed + index) % SEED_MODULUS
        subs.append(sub)
    return subs


class AggregatorServicer(aggregator_pb2_grpc.AggregatorServicer):
    def __init__(self, router: router_pb2_grpc.RouterStub, max_n: int) -> None:
        self.router = router
        self.max_n = max_n

    @grpc_errors
    async def Generate(
        self, request: aggregator_pb2.FanOutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.TokenChunk]:
        current_request_id.set(request.request.request_id)
        if not 1 <= request.n <= self.max_n:
            raise invalid_argument([("n", f"must be between 1 and {self.max_n}")])
        timeout = context.time_remaining()
        streams = [self._stream(sub, timeout) for sub in sub_requests(request.request, request.n)]
        async for chunk in merge_streams(streams):
            yield chunk

    async def _stream(
        self, sub: common_pb2.TokenRequest, timeout: float | None
    ) -> AsyncIterator[common_pb2.TokenChunk]:
        async for chunk in relay(self.router.Generate(sub, timeout=timeout)):
            yield chunk


async def start_aggregator(config: AggregatorConfig) -> RunningServer:
    channel = aio_channel(config.router)
    servicer = AggregatorServicer(router_pb2_grpc.RouterStub(channel), config.max_n)
    running = await start_server(
        config.host,
        config.port,
        [
            Servicer(
                servicer,
                aggregator_pb2_grpc.add_AggregatorServicer_to_server,
                aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"].full_name,
            )
        ],
    )
    running.on_stop.append(channel.close)
    return running
