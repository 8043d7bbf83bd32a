"""What the tests share: free loopback ports, bounded waiting, and real services, in this process or as processes.

Services in this process run in one asyncio loop on a background thread (`EventLoopThread`); tests call them
through blocking stubs. Services as processes are `python -m meshserve.cli ...`, each writing a log file that a
failure message shows. Everything started here is stopped by the context manager that started it.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from meshserve.common.channels import sync_channel, wait_until_serving
from meshserve.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

T = TypeVar("T")

# The mesh tests compare streams with float32 references (transformers generate(), uninterrupted runs), and only
# float32 promises that a resumed sequence continues exactly (README: exactness); bf16 has its own engine tests.
TEST_DTYPE = "float32"
HOST = "127.0.0.1"
WAIT_S = 120  # for a service process to start (it loads the model), or a long stream to end
POLL_S = 0.02
MESHSERVE = [sys.executable, "-m", "meshserve.cli"]


# ---- ports and waiting -----------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (for services started as separate processes)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind((HOST, 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_for(
    condition: Callable[[], T],
    what: str | None = None,
    timeout: float = 30.0,
    *,
    details: Callable[[], object] | None = None,
) -> T:
    """Polls `condition` until it returns something true, for at most `timeout` seconds, and returns that value.

    On timeout it fails saying what was awaited (`what`, else the condition's source), the last value it saw
    and `details()` (a log, say) if given.
    """
    deadline = time.monotonic() + timeout
    for _ in range(math.ceil(timeout / POLL_S) + 1):
        value = condition()
        if value or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    if value:
        return value
    message = f"waited {timeout:g} s for {what or _source_of(condition)}; the last check gave {repr(value)[:500]}"
    if details is not None:
        message += f"\n{details()}"
    raise AssertionError(message)


def _source_of(condition: Callable[[], Any]) -> str:
    if getattr(condition, "__name__", "") != "<lambda>":
        return getattr(condition, "__qualname__", repr(condition))
    try:
        return inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return repr(condition)


# ---- services in this process ----------------------------------------------------------------------------------


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
    worker: str  # the first worker
    servers: dict[str, Any]  # "gateway", "router", "aggregator", "worker" (the first): the running servers
    workers: list[str] = field(default_factory=list)  # every worker's address

    def channel(self, address: str) -> grpc.Channel:
        return sync_channel(address)


@contextmanager
def in_process(loop_thread: EventLoopThread, start: Coroutine[Any, Any, Any], grace: float = 0.0) -> Iterator[Any]:
    """The server that `start` (a start_* coroutine) brings up in loop_thread's loop; stopped after."""
    server = loop_thread.run(start)
    try:
        yield server
    finally:
        loop_thread.run(server.stop(grace))


@contextmanager
def in_process_workers(loop_thread: EventLoopThread, seats: Sequence[int], grace: float = 0.0) -> Iterator[list[Any]]:
    """One worker per entry of `seats` (its max_num_seqs): the built-in model, one torch thread each."""
    from meshserve.common.config import WorkerConfig
    from meshserve.worker.server import start_worker

    with ExitStack() as stack:
        yield [
            stack.enter_context(
                in_process(
                    loop_thread,
                    start_worker(WorkerConfig(host=HOST, port=0, max_num_seqs=n, threads=1, dtype=TEST_DTYPE)),
                    grace,
                )
            )
            for n in seats
        ]


@contextmanager
def in_process_router(loop_thread: EventLoopThread, workers: str, grace: float = 0.0, **settings: Any) -> Iterator[Any]:
    """A router over `workers` (its --workers value); `settings` are other RouterConfig fields."""
    from meshserve.common.config import RouterConfig
    from meshserve.router.server import start_router

    config = RouterConfig(host=HOST, port=0, workers=workers, **settings)
    with in_process(loop_thread, start_router(config), grace) as router:
        yield router


@contextmanager
def workers_and_router(
    loop_thread: EventLoopThread, seats: Sequence[int], grace: float = 0.0, **router_settings: Any
) -> Iterator[tuple[Any, list[Any]]]:
    """(router, workers): in-process workers as in_process_workers and a router that sees them all up."""
    with (
        in_process_workers(loop_thread, seats, grace) as workers,
        in_process_router(loop_thread, ",".join(w.address for w in workers), grace, **router_settings) as router,
    ):
        with sync_channel(router.address) as channel:
            wait_for_workers_up(router_pb2_grpc.RouterStub(channel), len(workers))
        yield router, workers


@contextmanager
def in_process_mesh(
    loop_thread: EventLoopThread,
    seats: Sequence[int] = (8,),
    aggregator: dict[str, Any] | None = None,
    gateway: dict[str, Any] | None = None,
    grace: float = 0.0,
) -> Iterator[Mesh]:
    """Gateway, router, aggregator and one worker per entry of `seats`, each a real gRPC server on 127.0.0.1:<free
    port>, the gateway SERVING; `aggregator` and `gateway` are more fields of their configs."""
    from meshserve.aggregator.server import start_aggregator
    from meshserve.common.config import AggregatorConfig, GatewayConfig
    from meshserve.gateway.server import start_gateway

    with ExitStack() as stack:
        router, workers = stack.enter_context(workers_and_router(loop_thread, seats, grace))
        aggregator_config = AggregatorConfig(host=HOST, port=0, router=router.address, **(aggregator or {}))
        aggregator_server = stack.enter_context(in_process(loop_thread, start_aggregator(aggregator_config), grace))
        gateway_settings = {"http_port": 0, **(gateway or {})}
        gateway_config = GatewayConfig(
            host=HOST, port=0, router=router.address, aggregator=aggregator_server.address, **gateway_settings
        )
        gateway_server = stack.enter_context(in_process(loop_thread, start_gateway(gateway_config), grace))
        assert wait_until_serving(gateway_server.address, timeout=60), "the gateway never reported SERVING"
        servers = {"worker": workers[0], "router": router, "aggregator": aggregator_server, "gateway": gateway_server}
        addresses = [w.address for w in workers]
        yield Mesh(gateway_server.address, router.address, aggregator_server.address, addresses[0], servers, addresses)


def router_stub(address: str) -> router_pb2_grpc.RouterStub:
    return router_pb2_grpc.RouterStub(sync_channel(address))


def worker_stats(stub: router_pb2_grpc.RouterStub) -> dict[str, router_pb2.WorkerStats]:
    """The router's view of each worker (up, draining, in flight, dispatched), by address."""
    return {w.address: w for w in stub.Stats(router_pb2.RouterStatsRequest(), timeout=5).workers}


def wait_for_workers_up(stub: router_pb2_grpc.RouterStub, count: int, timeout: float = 60.0) -> None:
    def enough_up() -> bool:
        return sum(w.up for w in worker_stats(stub).values()) >= count

    wait_for(enough_up, f"the router to see {count} worker(s) up", timeout)


def token_request(
    prompt: list[int], max_tokens: int, priority: int = common_pb2.PRIORITY_NORMAL, tenant: str = "", **sampling: Any
) -> common_pb2.TokenRequest:
    """A router request: greedy unless `sampling` says otherwise, exactly max_tokens long (EOS ignored)."""
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling)
    return common_pb2.TokenRequest(prompt_token_ids=prompt, sampling=params, priority=priority, tenant=tenant)


def worker_load(mesh: Mesh) -> worker_pb2.LoadReport:
    """The (first) worker's load report, asked once."""
    return worker_pb2_grpc.WorkerStub(mesh.channel(mesh.worker)).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)


# ---- services as processes -------------------------------------------------------------------------------------


def service_env(cache_dir: Path, **variables: str) -> dict[str, str]:
    """The environment of a service process: this one's, the tests' model cache, and `variables`."""
    from meshserve.cli.launcher import child_env

    return child_env({**os.environ, "MESHSERVE_CACHE": str(cache_dir), **variables})


@dataclass
class ServiceProcess:
    """`meshserve <args>` running as a process, its output in a log file."""

    address: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text()


def start_service(args: Sequence[str], address: str, env: dict[str, str], log: Path) -> ServiceProcess:
    with open(log, "w") as out:  # the child keeps its own descriptor
        process = subprocess.Popen([*MESHSERVE, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    return ServiceProcess(address, process, log)


def wait_until_ready(service: ServiceProcess, timeout: float = WAIT_S) -> None:
    """Until the service answers its health check SERVING; fails with its log if it exits or never does."""

    def serving() -> bool:
        if service.process.poll() is not None:
            raise AssertionError(f"{service.address} exited ({service.process.returncode}):\n{service.log_text()}")
        return wait_until_serving(service.address, timeout=1)

    wait_for(serving, f"{service.address} to serve", timeout, details=service.log_text)


def stop_processes(processes: Iterable[subprocess.Popen], grace: float = 30.0) -> None:
    """Stops every process still running, SIGTERM first and up to `grace` seconds to exit, then SIGKILL
    (at once when grace is 0); reaps them all."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        if grace:
            process.terminate()
        else:
            process.kill()
    for process in running:
        try:
            process.wait(timeout=grace or 30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@dataclass
class WorkerProcesses:
    workers: list[ServiceProcess]
    router: router_pb2_grpc.RouterStub
    env: dict[str, str] = field(default_factory=dict)

    def restart(self, address: str) -> None:
        """Starts a killed worker again on its port (as its supervisor would) and waits until the router
        has it back."""
        index = self.addresses.index(address)
        old = self.workers[index]
        assert old.process.wait(WAIT_S) is not None
        port = address.rsplit(":", 1)[1]
        args = ["worker", "--threads", "1", "--metrics-port", "0", "--port", port]
        self.workers[index] = start_service(args, address, self.env, old.log.with_suffix(".restarted.log"))
        wait_until_ready(self.workers[index])
        wait_for_workers_up(self.router, len(self.workers))

    @property
    def addresses(self) -> list[str]:
        return [w.address for w in self.workers]

    def process(self, address: str) -> subprocess.Popen:
        return self.workers[self.addresses.index(address)].process

    def log(self, address: str) -> str:
        return self.workers[self.addresses.index(address)].log_text()


@contextmanager
def workers_behind_a_router(
    loop_thread: EventLoopThread, count: int, cache_dir: Path, tmp_path: Path, env: dict[str, str] | None = None
) -> Iterator[WorkerProcesses]:
    """`count` worker processes (built-in model, one torch thread each) that a test may kill or SIGTERM like pods,
    and an in-process router over them, all up; all stopped after."""
    environment = service_env(cache_dir, **(env or {}))
    workers: list[ServiceProcess] = []
    try:
        for port in free_ports(count):
            args = ["worker", "--threads", "1", "--metrics-port", "0", "--port", str(port)]
            workers.append(start_service(args, f"{HOST}:{port}", environment, tmp_path / f"worker-{port}.log"))
        for worker in workers:
            wait_until_ready(worker)
        with in_process_router(loop_thread, ",".join(w.address for w in workers)) as router:
            stub = router_stub(router.address)
            wait_for_workers_up(stub, count)
            yield WorkerProcesses(workers, stub, environment)
    finally:
        stop_processes((w.process for w in workers), grace=0)
