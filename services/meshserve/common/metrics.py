"""Prometheus metrics shared by every service: one registry per service instance, served on /metrics.

Each service declares its own metrics (`meshserve_<service>_...`, units in the name) on the registry its
`RunningServer` carries; the process entry point serves that registry as Prometheus text on
`--metrics-port`. One registry per instance keeps two services in one process (tests, benches) apart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

# `*_created` series double every counter and histogram in the text format and no dashboard uses them.
disable_created_metrics()

# Seconds. Time to first token and end-to-end latency span milliseconds (a cached prompt on a GPU) to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Seconds between two tokens of one stream: a decode step is a few ms on a GPU, tens on a CPU.
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Sequences in one engine step.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server (a daemon thread; text format, any path answers)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, serving: Callable[[], bool] | None = None
) -> MetricsEndpoint:
    """Serves `registry` on http://host:port/metrics (port 0 picks a free one), and with `serving` also
    /healthz: 200 while the service is SERVING, else 503. A probe needs no certificate for it, while the
    gRPC port with TLS answers only the mesh's certificates (and Kubernetes' gRPC probes speak no TLS)."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise SystemExit(
            f"meshserve: cannot serve metrics on {host}:{port} ({exc}); "
            "choose another --metrics-port, or 0 to turn metrics off"
        ) from exc
    if serving is not None:
        server.set_app(_with_healthz(server.get_app(), serving))
    return MetricsEndpoint(server, thread)


def _with_healthz(app: Any, serving: Callable[[], bool]) -> Any:
    def dispatch(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != "/healthz":
            return app(environ, start_response)
        up = serving()
        start_response("200 OK" if up else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"SERVING\n" if up else b"NOT_SERVING\n"]

    return dispatch
