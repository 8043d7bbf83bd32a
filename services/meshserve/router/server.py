"""The router's gRPC service: queues each tokenised request, runs it on a worker's shared stream, relays and resumes
its outputs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from meshserve.common.config import RouterConfig
from meshserve.common.enums import priority_name
from meshserve.common.errors import MeshError, grpc_errors, invalid_argument, not_found, status_code_name
from meshserve.common.logs import current_request_id
from meshserve.common.metrics import new_registry
from meshserve.common.objectives import parse_ttft_objectives
from meshserve.common.server import RunningServer, Servicer, start_server
from meshserve.common.telemetry import tracer
from meshserve.common.tls import mesh_tls
from meshserve.router.children import ChildrenTracker
from meshserve.router.discovery import parse_sources
from meshserve.router.dispatcher import Dispatcher
from meshserve.router.metrics import RouterMetrics, class_objectives
from meshserve.router.queue import Pending, RequestQueue
from meshserve.router.workers import WorkerEndpoint, WorkerPool
from meshserve.v1 import common_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

# A worker that vanished mid-call (killed, connection reset, shutting down): resume elsewhere.
FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE,)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, dispatcher: Dispatcher, pool: WorkerPool, max_failovers: int, metrics: RouterMetrics) -> None:
        self.dispatcher = dispatcher
        self.pool = pool
        self.max_failovers = max_failovers
        self.metrics = metrics
        self.children = ChildrenTracker()

    @grpc_errors
    async def Generate(
        self, request: common_pb2.TokenRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.StreamChunk]:
        """Queues the request, runs it on a worker, and resumes it on another if that worker fails."""
        current_request_id.set(request.request_id)
        outcome: BaseException | None = None
        try:
            async for chunk in self._generate(request, context):
                yield chunk
        except BaseException as exc:
            outcome = exc
            raise
        finally:
            self.metrics.finished(request.priority, status_code_name(outcome))

    async def _generate(
        self, request: common_pb2.TokenRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.StreamChunk]:
        if request.priority not in common_pb2.Priority.values():
            raise invalid_argument([("priority", f"unknown priority {request.priority}")])
        self._check_model(request.model)
        pending = Pending.of(request)
        self.dispatcher.admit(pending, context.time_remaining())
        sent: list[int] = []  # tokens the caller already has
        failovers = 0
        while True:
            worker = await self._acquire(pending, context.time_remaining(), failovers)
            if request.parent_id:
                self.children.started(
                    request.parent_id, worker.address, pending.priority, request.tenant, request.client_request_id
                )
            attempt = request
            if sent:
                attempt = common_pb2.TokenRequest()
                attempt.CopyFrom(request)
                attempt.resume_token_ids.extend(sent)
            # One span per attempt: the worker's spans hang under it, a resumed attempt is its sibling.
            span = tracer.start_span(
                "router.dispatch",
                attributes={
                    "meshserve.worker.address": worker.address,
                    "meshserve.router.attempt": failovers + 1,
                    "meshserve.router.resumed_tokens": len(sent),
                },
            )
            stream = None
            try:
                if worker.link is None:
                    raise MeshError(grpc.StatusCode.UNAVAILABLE, "the stream to the worker is not open")
                with trace.use_span(span, end_on_exit=False):
                    # The caller's deadline goes with the sequence; its trace context too, under this span.
                    stream = worker.link.submit(attempt, context.time_remaining())
                while True:
                    chunk = await stream.next()
                    if chunk.token_ids and not sent:
                        self._first_token(pending)
                    sent.extend(chunk.token_ids)
                    pending.relayed = len(sent)
                    yield chunk
                    if chunk.finish_reason:
                        span.set_attribute("meshserve.router.tokens_relayed", len(sent))
                        if chunk.finish_reason != common_pb2.FINISH_REASON_CANCELLED:
                            self.dispatcher.model.finished(pending, len(sent))
                        return
            except MeshError as exc:
                span.set_status(Status(StatusCode.ERROR, f"{exc.code.name}: {exc.message}"))
                if exc.code not in FAILOVER_CODES:
                    raise
                self.pool.mark_down(worker)
                failovers += 1
                span.add_event("failover", {"meshserve.router.tokens_sent": len(sent)})
                if failovers > self.max_failovers:
                    raise MeshError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"gave up after {failovers} workers failed ({exc.message}); {len(sent)} tokens were sent; "
                        "retry",
                    ) from exc
                self.dispatcher.failovers += 1
                log.warning(
                    "worker %s failed (%s) after %d tokens; resuming on another", worker.address, exc, len(sent)
                )
                pending = dataclasses.replace(pending, assigned=asyncio.get_running_loop().create_future())
            finally:
                if stream is not None:
                    stream.close()
                self.dispatcher.release(worker, pending)
                span.end()
                if request.parent_id:
                    self.children.finished(request.parent_id, worker.address)

    def _first_token(self, pending: Pending) -> None:
        ttft = time.monotonic() - pending.enqueued_at
        self.metrics.first_token(pending.priority, ttft, self.dispatcher.first_token(pending, ttft))

    async def _acquire(self, pending: Pending, timeout: float | None, failovers: int) -> WorkerEndpoint:
        """Waits in the queue for a worker with room, traced and measured per priority class."""
        label = priority_name(pending.priority)
        with tracer.start_as_current_span(
            "router.queue", attributes={"meshserve.priority": label, "meshserve.router.attempt": failovers + 1}
        ):
            try:
                return await self.dispatcher.acquire(pending, timeout)
            finally:
                self.metrics.queue_wait.labels(label).observe(time.monotonic() - pending.enqueued_at)

    def _check_model(self, name: str) -> None:
        """A model no worker serves is refused at once rather than queued until its deadline; while a worker has
        not yet said what it serves, it may be that one."""
        workers = [w for w in self.pool.workers if not w.removed]
        if not name or any(w.model is None or w.model.name == name for w in workers):
            return
        served = sorted({w.model.name for w in workers if w.model is not None})
        raise not_found("model", f"no worker serves {name[:200]!r}; served: {', '.join(served) or 'none'}")

    @grpc_errors
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        models = await self.pool.describe()
        response = common_pb2.ListModelsResponse(models=models)
        if request.names_only or not request.include_tokenizer_files:
            for model in response.models:
                model.ClearField("tokenizer_files")
        return response

    @grpc_errors
    async def Stats(
        self, request: router_pb2.RouterStatsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouterStats:
        queues = [
            router_pb2.QueueStats(priority=priority, queued=count, oldest_wait_ms=int(oldest * 1000))
            for priority, (count, oldest) in self.dispatcher.queue.stats().items()
        ]
        for queue in queues:
            class_objectives(self.dispatcher, queue)
        workers = [
            router_pb2.WorkerStats(
                address=w.address,
                up=w.up,
                draining=bool(w.load and w.load.draining),
                in_flight=w.in_flight,
                model=w.model.name if w.model else "",
                load=w.load,
                dispatched=w.dispatched,
            )
            for w in self.pool.workers
        ]
        return router_pb2.RouterStats(
            queues=queues,
            workers=workers,
            dispatched=self.dispatcher.dispatched,
            shed=self.dispatcher.queue.shed,
            deadline_exceeded=self.dispatcher.deadline_exceeded,
            failovers=self.dispatcher.failovers,
            deadline_refused=self.dispatcher.deadline_refused,
            objective_shed=self.dispatcher.holdback.shed,
            parents=[
                router_pb2.ParentStats(
                    parent_id=p.parent_id,
                    in_flight=p.in_flight,
                    workers=sorted(p.running_on),
                    dispatched=p.dispatched,
                    finished=p.finished,
                    peak_in_flight=p.peak_in_flight,
                    peak_workers=p.peak_workers,
                    priority=p.priority,
                    tenant=p.tenant,
                    client_request_id=p.client_request_id,
                )
                for p in self.children.parents()
            ],
        )


async def start_router(config: RouterConfig) -> RunningServer:
    try:
        sources = parse_sources(config.workers)
    except ValueError as exc:
        raise SystemExit(f"meshserve: {exc}") from exc
    if config.worker_silence_seconds <= 1.0:  # workers report at least once a second (worker.proto)
        raise SystemExit(
            "meshserve: --worker-silence-seconds must be above 1 (a worker's heartbeat), "
            f"got {config.worker_silence_seconds}"
        )
    tls = mesh_tls(config, "router")
    dispatcher: Dispatcher | None = None
    pool = WorkerPool(
        sources,
        on_change=lambda: dispatcher.wake() if dispatcher else None,
        affinity_slack=config.affinity_slack,
        refresh_seconds=config.discovery_seconds,
        silence_seconds=config.worker_silence_seconds,
        tls=tls,
    )
    try:
        objectives = parse_ttft_objectives(config.slo_ttft)
    except ValueError as exc:
        raise SystemExit(f"meshserve: --slo-ttft {exc}") from exc
    queue = RequestQueue(config.max_queued, config.aging_seconds, tenant_share=config.tenant_queue_share)
    dispatcher = Dispatcher(queue, pool, objectives)
    registry = new_registry()
    metrics = RouterMetrics(registry, dispatcher)
    await pool.start()
    dispatcher.start()
    running = await start_server(
        config.host,
        config.port,
        [
            Servicer.of(
                RouterServicer(dispatcher, pool, config.max_failovers, metrics), router_pb2, router_pb2_grpc, "Router"
            )
        ],
        metrics=registry,
        max_connection_age_s=config.max_connection_age_seconds or None,
        tls=tls,
    )
    running.on_stop.append(pool.close)
    running.on_stop.append(dispatcher.stop)
    return running
