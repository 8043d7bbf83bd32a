"""Client side of the mesh: channels with one set of options, and health checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.common.telemetry import client_interceptors

# Tokenizer files travel in ModelInfo; large vocabularies reach tens of MB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# A peer that stops answering without closing the connection (a frozen process, a dropped network path)
# is found by HTTP/2 pings: one after KEEPALIVE_TIME_MS of quiet, dead if unanswered for KEEPALIVE_TIMEOUT_MS,
# so a stream on it fails (UNAVAILABLE, and resumes elsewhere) within about 5 s. A busy but live peer
# answers pings from gRPC's own threads, whatever its event loop is doing.
KEEPALIVE_TIME_MS = 3_000
KEEPALIVE_TIMEOUT_MS = 2_000
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC also bounds each ping by its own ping timeout (a minute by default), whichever is shorter.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
]
# Servers accept those pings (gRPC's default would answer pings this frequent with GOAWAY too_many_pings).
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
]


def aio_channel(
    address: str,
    traced: bool = True,
    round_robin: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A channel to another service; calls on it carry the caller's trace context. Untraced: no interceptor
    wraps its calls (a long-lived stream that carries each request's trace context in its messages).
    `round_robin`: calls spread over every address the target resolves to (gRPC's default uses the first).
    `credentials`: TLS (grpc.ssl_channel_credentials); None: plaintext. `options`: more channel options (the
    TLS name the server must have: common/tls.py)."""
    interceptors = client_interceptors() if traced else None
    balancing = [("grpc.lb_policy_name", "round_robin")] if round_robin else []
    options = [*CHANNEL_OPTIONS, *balancing, *options]
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def sync_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=[*CHANNEL_OPTIONS, *options])
    return grpc.insecure_channel(address, options=[*CHANNEL_OPTIONS, *options])


def health_status(
    address: str,
    service: str = "",
    timeout: float = 2.0,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> str:
    """The grpc.health.v1 status name of a server ("SERVING", "NOT_SERVING", ...) or "UNREACHABLE".
    `credentials` and `options`: as sync_channel's, for a server with TLS."""
    with sync_channel(address, credentials, options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return (
                "UNREACHABLE"
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                else exc.code().name
            )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_until_serving(address: str, timeout: float, service: str = "", poll_seconds: float = 0.2) -> bool:
    """Polls a server's health until it says SERVING or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if health_status(address, service, timeout=min(2.0, max(0.1, deadline - time.monotonic()))) == "SERVING":
            return True
        if time.monotonic() + poll_seconds > deadline:
            return False
        time.sleep(poll_seconds)


async def aio_wait_until_serving(address: str, timeout: float, poll_seconds: float = 0.2) -> bool:
    return await asyncio.to_thread(wait_until_serving, address, timeout, "", poll_seconds)
