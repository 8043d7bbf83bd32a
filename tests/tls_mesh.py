"""A mesh with mutual TLS, as processes: a worker, a router over it and an aggregator over the router, each with
its certificate from the project's own `write_certs`, for tests that call the internal services directly as
the one role each lets in (common/tls.py: routers call workers, gateways and aggregators call routers, gateways
call the aggregator)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from meshserve.cli.certs import write_certs
from meshserve.common.channels import health_status, sync_channel
from meshserve.common.tls import role_files, target_options
from meshserve.v1 import router_pb2, router_pb2_grpc
from support import HOST, WAIT_S, ServiceProcess, free_ports, service_env, start_service, stop_processes, wait_for

# The role each internal service answers (one of them), for a test that calls it directly.
CALLER = {"worker": "router", "router": "gateway", "aggregator": "gateway"}


@dataclass
class TlsMesh:
    certs: Path
    services: dict[str, ServiceProcess]  # "worker", "router", "aggregator"

    def address(self, service: str) -> str:
        return self.services[service].address

    def channel(self, service: str, as_role: str | None = None) -> grpc.Channel:
        """A channel to `service` showing the certificate of `as_role` (default: the caller it answers)."""
        files = role_files(self.certs, as_role or CALLER[service])
        return sync_channel(self.address(service), files.channel_credentials(), target_options(service))

    def health(self, service: str) -> str:
        # Health answers any certificate of the mesh CA.
        files = role_files(self.certs, "worker")
        return health_status(
            self.address(service), timeout=5, credentials=files.channel_credentials(), options=target_options(service)
        )

    def assert_serving(self) -> None:
        """Every service still runs (none exited, so none was restarted) and answers its health check SERVING."""
        for name, service in self.services.items():
            code = service.process.poll()
            assert code is None, f"the {name} exited ({code}):\n{service.log_text()[-5000:]}"
            assert self.health(name) == "SERVING", f"the {name} is not serving:\n{service.log_text()[-5000:]}"

    def assert_no_tracebacks(self) -> None:
        """No service logged an unexpected exception (one a status check cannot see: a task that died quietly).
        OpenTelemetry's own complaint about a stream closed in another context (a cancelled call) is not one."""
        for name, service in self.services.items():
            for line in service.log_text().splitlines():
                # Lines that are not JSON come from libraries writing to stderr (the engine's process, warnings).
                try:
                    record = json.loads(line)
                except ValueError:
                    record = {"msg": line}
                if "Traceback" in line:
                    record.setdefault("exc", line)
                if "exc" in record and not record.get("logger", "").startswith("opentelemetry"):
                    raise AssertionError(f"the {name} logged an exception: {record['msg']}\n{record['exc']}")


def _wait_serving(mesh: TlsMesh, name: str) -> None:
    service = mesh.services[name]

    def serving() -> bool:
        if service.process.poll() is not None:
            raise AssertionError(f"the {name} exited ({service.process.returncode}):\n{service.log_text()}")
        return mesh.health(name) == "SERVING"

    wait_for(serving, f"the {name} at {service.address} to serve", WAIT_S, details=service.log_text)


@contextmanager
def running_tls_mesh(
    cache_dir: Path, directory: Path, worker_args: tuple[str, ...] = (), aggregator_args: tuple[str, ...] = ()
) -> Iterator[TlsMesh]:
    """The three services on free loopback ports, all SERVING and the router seeing the worker; stopped after."""
    certs = directory / "certs"
    write_certs(certs)
    env = service_env(cache_dir)
    worker_port, router_port, aggregator_port = free_ports(3)

    def tls(role: str) -> list[str]:
        files = role_files(certs, role)
        return ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]

    commands = {
        "worker": ["worker", "--port", str(worker_port), "--threads", "1", *worker_args],
        "router": ["router", "--port", str(router_port), "--workers", f"{HOST}:{worker_port}"],
        "aggregator": [
            "aggregator",
            "--port",
            str(aggregator_port),
            "--router",
            f"{HOST}:{router_port}",
            *aggregator_args,
        ],
    }
    ports = {"worker": worker_port, "router": router_port, "aggregator": aggregator_port}
    mesh = TlsMesh(certs, {})
    try:
        for name, args in commands.items():
            log = directory / f"{name}.log"
            mesh.services[name] = start_service(
                [*args, "--metrics-port", "0", *tls(name)], f"{HOST}:{ports[name]}", env, log
            )
        for name in commands:
            _wait_serving(mesh, name)
        with mesh.channel("router") as channel:
            stats = router_pb2_grpc.RouterStub(channel).Stats
            wait_for(
                lambda: any(w.up for w in stats(router_pb2.RouterStatsRequest(), timeout=5).workers),
                "the router to see its worker up",
                WAIT_S,
            )
        yield mesh
    finally:
        stop_processes([s.process for s in mesh.services.values()], grace=10)
