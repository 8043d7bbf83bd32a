"""The routers a gateway or an aggregator calls: requests spread over all of them, and a request whose router
is lost mid-stream resumes on another from the tokens already relayed.

`--router` names one router, a comma-separated list, or `dns:///name:port` (every address of the name,
balanced by gRPC's round_robin and re-resolved as routers come and go). A router is lost when its
connection fails without an answer from it (killed, frozen past the keep-alive, a dropped path, or closed
after its maximum connection age): the request goes to another router with `resume_token_ids` set to every
token its caller already has, so the worker that continues it replays them and the caller sees each token
exactly once (the promise of worker failover, one hop further out). A router's own refusal, which carries
meshserve's status details, is final.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from meshserve.common.channels import aio_channel
from meshserve.common.errors import STATUS_DETAILS_KEY, MeshError, from_rpc_error
from meshserve.common.renewing_channel import RenewingChannel
from meshserve.common.tls import MeshTls
from meshserve.v1 import common_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

GENERATE = f"/{router_pb2.DESCRIPTOR.services_by_name['Router'].full_name}/Generate"
# Another router per lost one, up to this many: enough for a rolling restart, not a retry storm.
MAX_RESUMES = 3


def router_targets(spec: str) -> list[str]:
    """The gRPC targets of a --router value; ValueError says what is wrong with it."""
    targets = [part.strip() for part in spec.split(",") if part.strip()]
    if not targets:
        raise ValueError("--router names no router (host:port, a comma-separated list, or dns:///name:port)")
    for target in targets:
        if "://" in target and not target.startswith("dns:///"):
            raise ValueError(f"--router {target!r}: only host:port and dns:///name:port are understood")
        if target.rsplit(":", 1)[-1] == target or not target.rsplit(":", 1)[-1].isdigit():
            raise ValueError(f"--router {target!r} has no port (host:port)")
    return targets


def router_lost(error: grpc.aio.AioRpcError) -> bool:
    """The call failed because its router went away, not because the router answered with an error."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return not any(key == STATUS_DETAILS_KEY for key, _ in error.trailing_metadata() or ())


class Routers:
    def __init__(self, spec: str, response_type: Any = common_pb2.StreamChunk, tls: MeshTls | None = None) -> None:
        self.targets = router_targets(spec)
        # round_robin spreads one dns:/// channel's calls over every address of the name. Each channel is made
        # again when the TLS files change (a rotated certificate), its running calls finishing on the old one.
        self._channels = [
            RenewingChannel(
                functools.partial(aio_channel, target, round_robin=target.startswith("dns:///")), tls, "router"
            )
            for target in self.targets
        ]
        self._response_type = response_type
        self._turn = itertools.count()
        self.resumed = 0  # requests moved to another router (for metrics and tests)

    @property
    def stub(self) -> router_pb2_grpc.RouterStub:
        """A router for a unary call (ListModels, Stats): the next one that is not known to be down."""
        return self._channels[self._pick(set())].derived("stub", router_pb2_grpc.RouterStub)

    async def generate(
        self, request: common_pb2.TokenRequest, timeout: float | None, parent: Context | None = None
    ) -> AsyncIterator[Any]:
        """The request's stream through a router; through another one, resumed, if its router is lost.

        `parent`: the trace context every attempt's call is made in (the generator runs its body on the
        consumer's schedule, outside whatever span was current when it was created)."""
        deadline = time.monotonic() + timeout if timeout is not None else None
        relayed: list[int] = []
        lost: set[int] = set()
        while True:
            index = self._pick(lost)
            attempt = request
            if relayed:
                attempt = common_pb2.TokenRequest()
                attempt.CopyFrom(request)
                attempt.resume_token_ids.extend(relayed)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            token = otel_context.attach(parent) if parent is not None else None
            try:
                call = self._channels[index].derived("generate", self._generate_method)(attempt, timeout=remaining)
            finally:
                if token is not None:
                    otel_context.detach(token)
            try:
                async for message in call:
                    relayed.extend(message.token_ids)
                    yield message
                return
            except grpc.aio.AioRpcError as exc:
                if not router_lost(exc) or len(lost) >= MAX_RESUMES:
                    raise from_rpc_error(exc) from exc
                lost.add(index)
                self.resumed += 1
                log.warning(
                    "router %s was lost (%s) after %d tokens; resuming on another",
                    self.targets[index], exc.details(), len(relayed),
                )  # fmt: skip
                if deadline is not None and time.monotonic() >= deadline:
                    passed = "the deadline passed as a router failed"
                    raise MeshError(grpc.StatusCode.DEADLINE_EXCEEDED, passed) from exc
            finally:
                call.cancel()

    def _generate_method(self, channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamMultiCallable:
        return channel.unary_stream(
            GENERATE,
            request_serializer=common_pb2.TokenRequest.SerializeToString,
            response_deserializer=self._response_type.FromString,
        )

    def _pick(self, avoid: set[int]) -> int:
        """Round robin over the routers, skipping those this request lost and those whose channel is down;
        when every one is, the next in turn (its channel reconnects, or the call fails)."""
        count = len(self._channels)
        start = next(self._turn)
        fallback = None
        for step in range(count):
            index = (start + step) % count
            if index in avoid:
                continue
            state = self._channels[index].channel.get_state(try_to_connect=True)
            if state not in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                return index
            fallback = index if fallback is None else fallback
        if fallback is not None:
            return fallback
        return start % count  # every router lost once already: try them again in turn

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
