"""The aggregator's gRPC service: one request becomes many sub-requests through the router, merged into one stream.

The servicer turns a FanOutRequest into groups (plan.py) or a map-reduce plan (mapreduce.py), checks
the bounds (limits.py), and hands them to FanOut (fanout.py), which knows nothing of gRPC. Each
sub-request is its own router call made inside this handler, so the parent's deadline, cancellation
and trace context reach every one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from meshserve.aggregator.fanout import FanOut, RunSubRequest
from meshserve.aggregator.limits import TenantLimiter, check_width
from meshserve.aggregator.mapreduce import plan_map_reduce
from meshserve.aggregator.metrics import AggregatorMetrics
from meshserve.aggregator.plan import Group
from meshserve.common.config import AggregatorConfig
from meshserve.common.errors import grpc_errors, invalid_argument, status_code_name
from meshserve.common.logs import current_request_id
from meshserve.common.metrics import new_registry
from meshserve.common.models import ModelCatalog
from meshserve.common.routers import Routers
from meshserve.common.server import RunningServer, Servicer, start_server
from meshserve.common.telemetry import tracer
from meshserve.common.tls import mesh_tls
from meshserve.v1 import aggregator_pb2, aggregator_pb2_grpc, common_pb2

DEFAULT_REDUCE_MAX_TOKENS = 256


class AggregatorServicer(aggregator_pb2_grpc.AggregatorServicer):
    def __init__(
        self,
        routers: Routers,
        catalog: ModelCatalog,
        max_fanout: int,
        tenants: TenantLimiter,
        metrics: AggregatorMetrics,
    ) -> None:
        self.routers = routers
        self.metrics = metrics
        self.catalog = catalog
        # A request wider than one tenant's whole budget could never run: it is refused as too wide instead.
        self.max_fanout = min(max_fanout, tenants.max_in_flight)
        self.tenants = tenants

    @grpc_errors
    async def Generate(
        self, request: aggregator_pb2.FanOutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.StreamChunk]:
        parent = request.request
        current_request_id.set(parent.request_id)
        n = request.n or 1
        best_of = request.best_of or n
        if best_of < n:
            raise invalid_argument([("best_of", f"must be at least n ({n}), got {best_of}")])
        fan_out = FanOut(
            parent,
            self._sub_request_runner(context),
            best_effort=request.failure_policy == common_pb2.FAILURE_POLICY_BEST_EFFORT,
            dedupe=request.dedupe,
            order_by_score=request.order_by_score,
        )
        kind = _kind(request, n, best_of)
        outcome: BaseException | None = None
        try:
            if request.HasField("map_reduce"):
                width, stream = await self._map_reduce(request.map_reduce, parent, fan_out, n, best_of)
            else:
                width, stream = self._samples_or_batch(request, fan_out, n, best_of)
            self.metrics.fan_out.labels(kind).observe(width)
            # The handler's span is the fan-out; each sub-request is a child of it (see _sub_request_runner).
            trace.get_current_span().set_attributes({"meshserve.fanout.kind": kind, "meshserve.fanout.width": width})
            with self.tenants.reserve(parent.tenant, width):
                async for message in stream:
                    yield message
        except BaseException as exc:
            outcome = exc
            raise
        finally:
            self.metrics.requests.labels(kind, status_code_name(outcome)).inc()

    def _samples_or_batch(
        self, request: aggregator_pb2.FanOutRequest, fan_out: FanOut, n: int, best_of: int
    ) -> tuple[int, AsyncIterator[common_pb2.StreamChunk]]:
        """One group per input (the parent's prompt, or each of a batch), best_of candidates each."""
        parent = request.request
        held = fan_out.is_held(n, best_of)
        if request.inputs:
            width = len(request.inputs) * best_of
            check_width("batch.inputs", width, self.max_fanout, f"{len(request.inputs)} inputs x {best_of}")
            groups = [
                Group(
                    i,
                    list(item.prompt_token_ids),
                    item.sampling if item.HasField("sampling") else parent.sampling,
                    n,
                    best_of,
                    held,
                )
                for i, item in enumerate(request.inputs)
            ]
            labels = [f"batch.inputs[{i}]" for i in range(len(groups))]
        else:
            width = best_of
            field = "best_of" if best_of > n else "n"
            check_width(field, width, self.max_fanout, f"{field} = {best_of}")
            groups = [Group(0, list(parent.prompt_token_ids), parent.sampling, n, best_of, held)]
            labels = ["the prompt"]
        return width, fan_out.run(groups, labels)

    async def _map_reduce(
        self,
        task: aggregator_pb2.MapReduceTask,
        parent: common_pb2.TokenRequest,
        fan_out: FanOut,
        n: int,
        best_of: int,
    ) -> tuple[int, AsyncIterator[common_pb2.StreamChunk]]:
        await self.catalog.refresh_if_unknown(parent.model)
        model = self.catalog.resolve(parent.model)
        reduce_sampling = common_pb2.SamplingParams()
        reduce_sampling.CopyFrom(parent.sampling)
        if not reduce_sampling.HasField("max_tokens"):
            reduce_sampling.max_tokens = DEFAULT_REDUCE_MAX_TOKENS
        check_width("best_of", best_of, self.max_fanout, f"best_of = {best_of}")
        # Off the loop: splitting a long text tokenises it piece by piece, and other fan-outs stream meanwhile.
        plan = await asyncio.to_thread(
            plan_map_reduce,
            task.text,
            task.map_template,
            task.reduce_template,
            task.chunk_tokens,
            task.map_sampling if task.HasField("map_sampling") else _without_max_tokens(parent.sampling),
            reduce_sampling.max_tokens,
            model.tokenizer,
            model.info.max_context_length,
            max_chunks=self.max_fanout,
        )
        width = max(len(plan.chunks), best_of)
        return width, fan_out.map_reduce(plan, model.tokenizer, reduce_sampling, n, best_of)

    def _sub_request_runner(self, context: grpc.aio.ServicerContext) -> RunSubRequest:
        async def run(sub: common_pb2.TokenRequest) -> AsyncIterator[common_pb2.StreamChunk]:
            span = tracer.start_span(
                "aggregator.sub_request",
                attributes={"meshserve.request_id": sub.request_id, "meshserve.index": sub.index},
            )
            outcome: BaseException | None = None
            # Whatever is left of the parent's deadline bounds every sub-request, the reduce's too; a lost
            # router's sub-requests resume on another (common/routers.py).
            stream = self.routers.generate(sub, context.time_remaining(), trace.set_span_in_context(span))
            try:
                async for chunk in stream:
                    yield chunk
            except BaseException as exc:
                outcome = exc
                raise
            finally:
                await stream.aclose()
                code = status_code_name(outcome)
                self.metrics.sub_requests.labels(code).inc()
                if outcome is not None:
                    span.set_status(Status(StatusCode.ERROR, code))
                span.end()

        return run


def _kind(request: aggregator_pb2.FanOutRequest, n: int, best_of: int) -> str:
    if request.HasField("map_reduce"):
        return "map_reduce"
    if request.inputs:
        return "batch"
    return "best_of" if best_of > n else "samples"


def _without_max_tokens(sampling: common_pb2.SamplingParams) -> common_pb2.SamplingParams:
    """The parent's max_tokens is the reduce's; the map calls get their share of the reduce prompt instead."""
    copy = common_pb2.SamplingParams()
    copy.CopyFrom(sampling)
    copy.ClearField("max_tokens")
    return copy


async def start_aggregator(config: AggregatorConfig) -> RunningServer:
    tls = mesh_tls(config, "aggregator")
    try:
        routers = Routers(config.router, tls=tls)
    except ValueError as exc:
        raise SystemExit(f"meshserve: {exc}") from exc
    catalog = ModelCatalog(routers)
    registry = new_registry()
    servicer = AggregatorServicer(
        routers, catalog, config.max_n, TenantLimiter(config.tenant_max_in_flight), AggregatorMetrics(registry)
    )
    running = await start_server(
        config.host,
        config.port,
        [Servicer.of(servicer, aggregator_pb2, aggregator_pb2_grpc, "Aggregator")],
        metrics=registry,
        tls=tls,
    )
    # Tokenizers are needed for map-reduce only; kept fresh in the background as the gateway does.
    refresher = asyncio.create_task(catalog.keep_fresh(config.model_refresh_seconds, asyncio.Event()))

    async def stop_background() -> None:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await routers.close()

    running.on_stop.append(stop_background)
    return running
