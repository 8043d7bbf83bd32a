"""A `meshserve up` of the soak's own, run as a child process: its own free ports, state file and logs, so the
soak knows every service's pid (to kill or freeze it) and its restarts, and stops all it started.

Its cache folder holds its own `mesh.json` and links the caller's `inductor/` folder, so workers start from the
compiled code already there (README: the worker engine); the built-in model is the caller's, made here first
if need be, and named to `up` with --model (`up` would make it in a child of its own that takes the soak's
MESHSERVE_PARENT_PID for its parent's and stops itself). Workers run in float32 unless told otherwise: only
float32 promises that a sequence resumed after a failover continues exactly as it would have uninterrupted
(README: exactness).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from meshserve.cli.launcher import MAX_ROUTERS, PARENT_PID_ENV, STATE_FILE_NAME, child_env, router_port
from meshserve.common.channels import health_status, sync_channel
from meshserve.common.config import DEFAULT_HOST, cache_dir
from meshserve.v1 import router_pb2, router_pb2_grpc

SHARED_CACHE_ENTRIES = ("inductor",)
STOP_GRACE_S = 40.0  # `up` gives each service 15 s to drain; a frozen one is thawed first


class MeshStartError(Exception):
    """The mesh did not come up: one line for a person, and the log to read."""


@dataclass(frozen=True)
class Service:
    """One service as the supervisor last wrote it into mesh.json."""

    name: str  # worker-0, router-1, aggregator, gateway
    address: str
    pid: int | None  # None while it is restarting
    restarts: int
    last_exit: str

    @property
    def kind(self) -> str:
        return self.name.split("-")[0]


@dataclass(frozen=True)
class Ports:
    gateway: int
    aggregator: int
    first_router: int  # router i at first_router + 100 * i (`up`'s rule)
    first_worker: int  # worker i at first_worker + i


def free_ports(workers: int, routers: int, host: str = DEFAULT_HOST) -> Ports:
    """Ports free right now for a whole mesh, the workers' consecutive and the routers' 100 apart."""
    for _ in range(100):
        gateway, aggregator, first_router, first_worker = (_any_free_port(host) for _ in range(4))
        wanted = [gateway, aggregator]
        wanted += [router_port(first_router, i) for i in range(routers)]
        wanted += [first_worker + i for i in range(workers)]
        if len(set(wanted)) == len(wanted) and all(_is_free(host, port) for port in wanted):
            return Ports(gateway, aggregator, first_router, first_worker)
    raise MeshStartError("found no free ports for the mesh")


def _any_free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _is_free(host: str, port: int) -> bool:
    if not 0 < port < 65536:
        return False
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class LocalMesh:
    def __init__(self, workers: int, routers: int, work_dir: Path, model: str = "", dtype: str = "float32") -> None:
        assert workers >= 1 and 1 <= routers <= MAX_ROUTERS, (workers, routers)
        self.workers, self.routers = workers, routers
        self.work_dir = work_dir
        self.cache = work_dir / "cache"
        self.log_dir = work_dir / "logs"
        self.up_log = work_dir / "up.log"
        self.model, self.dtype = model, dtype
        self.ports = free_ports(workers, routers)
        self.gateway = f"{DEFAULT_HOST}:{self.ports.gateway}"
        self.frozen: set[int] = set()  # pids stopped with SIGSTOP: thawed before anything else stops them
        self._up: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._up.pid if self._up is not None else None

    def start(self, timeout: float) -> None:
        """Runs `meshserve up` and returns once it has written its state file (every service SERVING)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._link_shared_cache()
        ports = self.ports
        command = [sys.executable, "-m", "meshserve.cli", "up", "--workers", str(self.workers)]
        command += ["--routers", str(self.routers), "--port", str(ports.gateway)]
        command += ["--router-port", str(ports.first_router), "--aggregator-port", str(ports.aggregator)]
        command += ["--worker-port", str(ports.first_worker), "--metrics-port", "0", "--http-port", "-1"]
        command += ["--log-dir", str(self.log_dir), "--start-timeout", str(timeout)]
        command += ["--model", self.model or _builtin_model()]
        env = child_env({**os.environ, "MESHSERVE_CACHE": str(self.cache), "PYTHONUNBUFFERED": "1"})
        if self.dtype:
            env["MESHSERVE_DTYPE"] = self.dtype
        with open(self.up_log, "wb") as log:
            # Its own session: the soak stops it (after thawing what it froze), not a Ctrl-C meant for the soak.
            self._up = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout + 30
        while not self._state():
            if self._up.poll() is not None:
                raise MeshStartError(f"`meshserve up` exited ({self._up.returncode}):\n{self.up_log_tail()}")
            if time.monotonic() > deadline:
                raise MeshStartError(f"`meshserve up` was not up after {timeout:.0f} s:\n{self.up_log_tail()}")
            time.sleep(0.25)

    def _link_shared_cache(self) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        shared = cache_dir()
        for entry in SHARED_CACHE_ENTRIES:
            (shared / entry).mkdir(parents=True, exist_ok=True)
            link = self.cache / entry
            if not link.exists():
                link.symlink_to((shared / entry).resolve(), target_is_directory=True)

    def _state(self) -> dict[str, object] | None:
        """The state file, once `up` (this one) has written it."""
        try:
            state = json.loads((self.cache / STATE_FILE_NAME).read_text())
        except (OSError, ValueError):
            return None
        return state if state.get("pid") == self.pid else None

    def services(self) -> list[Service]:
        """Every service, as the supervisor last wrote them (it rewrites the file on every exit and restart)."""
        state = self._state() or {"services": []}
        return [
            Service(s["name"], s["address"], s["pid"], s["restarts"], s["last_exit"])
            for s in state["services"]  # type: ignore[union-attr]
        ]

    def serving(self, service: Service, timeout: float = 1.0) -> bool:
        """Running, not frozen by us, and its health check says SERVING."""
        if service.pid is None or service.pid in self.frozen:
            return False
        return health_status(service.address, timeout=timeout) == "SERVING"

    def routed_workers(self) -> set[str]:
        """Addresses of the workers that some router has a live stream to (its Stats say up): a worker that has
        just turned SERVING is not one yet, and freezing or killing it would test nothing."""
        routed: set[str] = set()
        for router in self.services():
            if router.kind != "router" or router.pid is None or router.pid in self.frozen:
                continue
            try:
                with sync_channel(router.address) as channel:
                    stats = router_pb2_grpc.RouterStub(channel).Stats(router_pb2.RouterStatsRequest(), timeout=1.0)
            except grpc.RpcError:
                continue
            routed |= {worker.address for worker in stats.workers if worker.up}
        return routed

    def wait_all_serving(self, timeout: float) -> list[Service]:
        """Polls until every service runs and is SERVING, for at most `timeout` s; returns those that are not."""
        deadline = time.monotonic() + timeout
        while True:
            down = [s for s in self.services() if not self.serving(s)]
            if not down and self.services():
                return []
            if time.monotonic() >= deadline:
                return down or self.services()
            time.sleep(0.5)

    def signal(self, service: Service, sig: signal.Signals) -> None:
        assert service.pid is not None, service
        os.kill(service.pid, sig)
        if sig == signal.SIGSTOP:
            self.frozen.add(service.pid)
        elif sig == signal.SIGCONT:
            self.frozen.discard(service.pid)

    def log_lines(self, needle: str) -> list[str]:
        """Every line of every service's log that contains `needle`, prefixed with the log's name."""
        found = []
        for path in sorted(self.log_dir.glob("*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if needle in line:
                    found.append(f"{path.stem}: {line}")
        return found

    def up_log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.up_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Thaws what was frozen, stops `up` (which stops every service), and kills whatever is left."""
        pids = [s.pid for s in self.services() if s.pid is not None]
        for pid in {*self.frozen, *pids}:
            _signal_quietly(pid, signal.SIGCONT)
        self.frozen.clear()
        if self._up is None or self._up.poll() is not None:
            return
        self._up.send_signal(signal.SIGINT)
        try:
            self._up.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._up.kill()
            self._up.wait()
            for pid in pids:  # `up` killed before it could stop them: they are still ours to end
                _signal_quietly(pid, signal.SIGKILL)


def _builtin_model() -> str:
    """The built-in model's folder in the caller's cache, made there if need be (in a child: no torch here)."""
    env = {k: v for k, v in os.environ.items() if k != PARENT_PID_ENV}
    made = subprocess.run(
        [sys.executable, "-m", "meshserve.cli", "builtin-model"], capture_output=True, text=True, env=env, check=False
    )
    if made.returncode != 0:
        raise MeshStartError(f"could not make the built-in model:\n{made.stderr}")
    return made.stdout.strip().splitlines()[-1]


def _signal_quietly(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
