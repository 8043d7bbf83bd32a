"""Fixtures: the built-in model in a private cache, and real services on free loopback ports (see support.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import EventLoopThread, Mesh, in_process_mesh

# Triton kernels run on CPU tensors through its interpreter; it must be chosen before triton is imported.
os.environ["TRITON_INTERPRET"] = "1"
# Worker processes the tests start read it (support.TEST_DTYPE says why float32).
os.environ.setdefault("MESHSERVE_DTYPE", "float32")


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


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[EventLoopThread]:
    thread = EventLoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def mesh(model_dir: Path, loop_thread: EventLoopThread) -> Iterator[Mesh]:
    """gateway, router, aggregator and one worker, each a real gRPC server on 127.0.0.1:<free port>."""
    with in_process_mesh(loop_thread, seats=[8], grace=1.0) as started:
        yield started


@pytest.fixture(scope="module")
def gateway(mesh: Mesh, loop_thread: EventLoopThread) -> Iterator[Any]:
    """A keyless gateway (gRPC and HTTP) in front of the session's mesh, one per test module."""
    from http_gateway import running_gateway

    with running_gateway(loop_thread, mesh) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def client(gateway: Any) -> Any:
    """The official OpenAI client on that gateway."""
    import openai

    # max_retries=0: a test must see the server's first answer, not the client's retry of it.
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused-on-loopback", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def fan_out_mesh(model_dir: Path, loop_thread: EventLoopThread) -> Iterator[Any]:
    """The aggregator tests' mesh: two workers behind a router, an aggregator with small bounds, a gateway
    (a fan_out.FanOutMesh); those tests take it as their `mesh`."""
    from fan_out import running_fan_out_mesh

    with running_fan_out_mesh(loop_thread) as started:
        yield started


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    from meshserve.common.tokenizer import ModelTokenizer

    return ModelTokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def rendered() -> dict[str, dict[str, str]]:
    """The Helm chart rendered with each of chart_checks.VALUE_SETS: {values set: {template path: text}}."""
    from chart_checks import VALUE_SETS, render

    return {name: render(values) for name, values in VALUE_SETS.items()}


@pytest.fixture(scope="session")
def docs(rendered: dict[str, dict[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """The Kubernetes objects of each rendering in `rendered`."""
    from chart_checks import objects

    return {name: objects(files) for name, files in rendered.items()}


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
