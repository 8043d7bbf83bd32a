"""Workers as separate processes behind a router in the test process: what failover and drain tests need
(a worker that can be killed or SIGTERMed like a pod)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import free_ports
from meshserve.common.channels import sync_channel, wait_until_serving
from meshserve.v1 import router_pb2, router_pb2_grpc

WAIT_S = 120
MESHSERVE_WORKER = [sys.executable, "-m", "meshserve.cli", "worker", "--threads", "1", "--metrics-port", "0"]


@dataclass
class WorkerProcesses:
    addresses: list[str]
    processes: list[subprocess.Popen]
    logs: list[Path]
    router: router_pb2_grpc.RouterStub

    def process(self, address: str) -> subprocess.Popen:
        return self.processes[self.addresses.index(address)]

    def log(self, address: str) -> str:
        return self.logs[self.addresses.index(address)].read_text()


@contextmanager
def workers_behind_a_router(
    loop_thread: Any, count: int, cache_dir: Path, tmp_path: Path, env: dict[str, str] | None = None
) -> Iterator[WorkerProcesses]:
    """`count` worker processes (built-in model) and an in-process router over them, all up; stopped after."""
    from meshserve.cli.launcher import child_env
    from meshserve.common.config import RouterConfig
    from meshserve.router.server import start_router

    environment = child_env({**os.environ, "MESHSERVE_CACHE": str(cache_dir), **(env or {})})
    ports = free_ports(count)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    logs = [tmp_path / f"worker-{port}.log" for port in ports]
    processes = []
    for port, log_path in zip(ports, logs, strict=True):
        with open(log_path, "w") as log:  # the child keeps its own descriptor
            processes.append(
                subprocess.Popen(
                    [*MESHSERVE_WORKER, "--port", str(port)], env=environment, stdout=log, stderr=subprocess.STDOUT
                )
            )
    router = None
    try:
        for address, process, log_path in zip(addresses, processes, logs, strict=True):
            _wait_for_worker(address, process, log_path)
        router = loop_thread.run(start_router(RouterConfig(host="127.0.0.1", port=0, workers=",".join(addresses))))
        stub = router_pb2_grpc.RouterStub(sync_channel(router.address))
        wait_for_workers_up(stub, count)
        yield WorkerProcesses(addresses, processes, logs, stub)
    finally:
        if router is not None:
            loop_thread.run(router.stop(0))
        for process in processes:
            process.kill()
            process.wait(30)


def wait_for_workers_up(stub: router_pb2_grpc.RouterStub, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
        if sum(w.up for w in stats.workers) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("the router never saw its workers up")


def _wait_for_worker(address: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"worker {address} exited ({process.returncode}):\n{log_path.read_text()}")
        if wait_until_serving(address, timeout=1):
            return
    raise AssertionError(f"worker {address} never became ready:\n{log_path.read_text()}")
