"""A gateway with its HTTP API, started against the session mesh's router and aggregator (for the HTTP tests).

`wait_for` and `worker_load` are support.py's, importable from here too.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from support import wait_for, worker_load

__all__ = ["Gateway", "running_gateway", "wait_for", "worker_load"]


@dataclass
class Gateway:
    grpc: str  # host:port
    http: str  # host:port
    server: Any

    @property
    def base_url(self) -> str:
        return f"http://{self.http}/v1"

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        host, port = self.http.rsplit(":", 1)
        return http.client.HTTPConnection(host, int(port), timeout=timeout)

    def post(
        self, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection; (status, headers, body)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection = self.connection()
        try:
            connection.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = self.connection()
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()


@contextmanager
def running_gateway(loop_thread: Any, mesh: Any, **overrides: Any) -> Iterator[Gateway]:
    from meshserve.common.channels import wait_until_serving
    from meshserve.common.config import GatewayConfig
    from meshserve.gateway.server import start_gateway

    settings = {"host": "127.0.0.1", "port": 0, "http_port": 0, "router": mesh.router, "aggregator": mesh.aggregator}
    server = loop_thread.run(start_gateway(GatewayConfig(**{**settings, **overrides})))
    try:
        if overrides.get("router", mesh.router) == mesh.router:
            assert wait_until_serving(server.address, timeout=60), "the gateway never reported SERVING"
        yield Gateway(server.address, server.http.address, server)
    finally:
        loop_thread.run(server.stop(1.0))
