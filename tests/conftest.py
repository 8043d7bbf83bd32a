"""Fixtures: the built-in model in a private cache, and real services on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

T = TypeVar("T")


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (for services started as separate processes)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# Triton kernels run on CPU tensors through its interpreter; it must be chosen before triton is imported.
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private MESHSERVE_CACHE, so tests never touch (or depend on) the user's cache."""
    path = tmp_path_factory.mktemp("meshserve-cache")
    previous = os.environ.get("MESHSERVE_CACHE")
    os.environ["MESHSERVE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("MESHSERVE_CACHE", None)
    else:
        os.environ["MESHSERVE_CACHE"] = previous


@pytest.fixture(scope="session")
def model_dir(cache_dir: Path) -> Path:
    from meshserve.worker.builtin_model import ensure_builtin_model

    return ensure_builtin_model(cache_dir)


class EventLoopThread:
    """An asyncio loop in a background thread: servers live there, tests call them with blocking stubs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="servers", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class Mesh:
    gateway: str
    router: str
    aggregator: str
    worker: str
    servers: dict[str, Any]

    def channel(self, address: str) -> grpc.Channel:
        from meshserve.common.channels import sync_channel

        return sync_channel(address)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[EventLoopThread]:
    thread = EventLoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def mesh(model_dir: Path, loop_thread: EventLoopThread) -> Iterator[Mesh]:
    """gateway, router, aggregator and one worker, each a real gRPC server on 127.0.0.1:<free port>."""
    from meshserve.aggregator.server import start_aggregator
    from meshserve.common.channels import wait_until_serving
    from meshserve.common.config import AggregatorConfig, GatewayConfig, RouterConfig, WorkerConfig
    from meshserve.gateway.server import start_gateway
    from meshserve.router.server import start_router
    from meshserve.worker.server import start_worker

    host = "127.0.0.1"
    servers: dict[str, Any] = {}
    servers["worker"] = loop_thread.run(
        start_worker(WorkerConfig(host=host, port=0, max_num_seqs=8, threads=1))  # built-in model
    )
    worker = servers["worker"].address
    servers["router"] = loop_thread.run(start_router(RouterConfig(host=host, port=0, workers=worker)))
    router = servers["router"].address
    servers["aggregator"] = loop_thread.run(start_aggregator(AggregatorConfig(host=host, port=0, router=router)))
    aggregator = servers["aggregator"].address
    servers["gateway"] = loop_thread.run(
        start_gateway(GatewayConfig(host=host, port=0, http_port=0, router=router, aggregator=aggregator))
    )
    gateway = servers["gateway"].address
    assert wait_until_serving(gateway, timeout=60), "the gateway never reported SERVING"
    yield Mesh(gateway, router, aggregator, worker, servers)
    for name in ("gateway", "aggregator", "router", "worker"):
        loop_thread.run(servers[name].stop(1.0))


@pytest.fixture(scope="session")
def spans() -> Any:
    """Every span this process ends, in memory (an InMemorySpanExporter); tests clear() it first.

    A process has one tracer provider: installed here once, for the services the tests run in-process.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from meshserve.common.telemetry import setup_tracing

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        setup_tracing("tests", "none", processor=SimpleSpanProcessor(exporter))
    return exporter
