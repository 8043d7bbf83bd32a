"""The router's gRPC service: forwards each tokenised request to a worker and relays its stream."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from meshserve.config import RouterConfig
from meshserve.errors import grpc_errors
from meshserve.logs import current_request_id
from meshserve.router.workers import WorkerPool
from meshserve.server import RunningServer, Servicer, start_server
from meshserve.v1 import common_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    @grpc_errors
    async def Generate(
        self, request: common_pb2.TokenRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.TokenChunk]:
        current_request_id.set(request.request_id)
        tried: set[str] = set()
        while True:
            worker = self.pool.pick(request.model, exclude=tried)
            tried.add(worker.address)
            worker.in_flight += 1
            # The caller's deadline bounds the worker's call; cancelling ours cancels it.
            call = worker.stub.Generate(request, timeout=context.time_remaining())
            relayed_any = False
            try:
                async for chunk in call:
                    relayed_any = True
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                # A worker that cannot be reached before it sent anything: try another one.
                if exc.code() == grpc.StatusCode.UNAVAILABLE and not relayed_any:
                    log.warning("worker %s unavailable (%s); trying another", worker.address, exc.details())
                    continue
                raise
            finally:
                call.cancel()
                worker.in_flight -= 1

    @grpc_errors
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        models = await self.pool.describe()
        response = common_pb2.ListModelsResponse(models=models)
        if request.names_only:
            for model in response.models:
                model.ClearField("tokenizer_files")
        return response


async def start_router(config: RouterConfig) -> RunningServer:
    pool = WorkerPool([a.strip() for a in config.workers.split(",") if a.strip()])
    running = await start_server(
        config.host,
        config.port,
        [
            Servicer(
                RouterServicer(pool),
                router_pb2_grpc.add_RouterServicer_to_server,
                router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
            )
        ],
    )
    running.on_stop.append(pool.close)
    return running
