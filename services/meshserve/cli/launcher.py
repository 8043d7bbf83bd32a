"""`meshserve up`: every service in its own process on this machine, started in order, kept running
(supervisor.py), stopped together."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from meshserve.cli.supervisor import Child, exit_reason, stop_all, supervise, write_state_file
from meshserve.common.channels import health_status
from meshserve.common.config import WORKER_METRICS_OFFSET, cache_dir
from meshserve.common.tls import ROLES, TlsFiles, role_files, target_options

STATE_FILE_NAME = "mesh.json"


def state_file() -> Path:
    """Where `meshserve up` writes the addresses of the mesh it runs (read by `meshserve status`)."""
    return cache_dir() / STATE_FILE_NAME


def certs_dir() -> Path:
    """Where `meshserve up --tls` keeps its development CA and service certificates."""
    return cache_dir() / "tls"


def mesh_certs(directory: Path) -> dict[str, TlsFiles]:
    """Each role's files in a `meshserve certs` folder, made there first when any is missing."""
    files = {role: role_files(directory, role) for role in ROLES}
    if not all(path.exists() for f in files.values() for path in (f.cert, f.key, f.ca)):
        from meshserve.cli.certs import write_certs  # cryptography, only when certificates are made

        write_certs(directory)
    return files


def role_of(name: str) -> str:
    """worker-0 -> worker, router-1 -> router, gateway -> gateway."""
    return name.split("-", 1)[0]


def health_args(tls: TlsFiles | None, name: str) -> dict[str, object]:
    """health_status's TLS arguments for service `name`: a mesh certificate (any: Health checks no role)."""
    if tls is None:
        return {}
    return {"credentials": tls.channel_credentials(), "options": target_options(role_of(name))}


MAX_ROUTERS = 7  # their metrics ports sit between the aggregator's and the first worker's


def router_port(first: int, index: int) -> int:
    """Router i of `meshserve up --routers N`: the first at --router-port, the rest 100 apart."""
    return first + 100 * index


def run_mesh(args: argparse.Namespace) -> int:
    if args.workers < 1:
        print("meshserve: --workers must be at least 1", file=sys.stderr)
        return 2
    if not 1 <= args.routers <= MAX_ROUTERS:
        print(f"meshserve: --routers must be from 1 to {MAX_ROUTERS}", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir) if args.log_dir else cache_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    certs = mesh_certs(certs_dir()) if args.tls else None
    # `meshserve status` and `generate` find the CA and a certificate here.
    tls_state = {"tls": {k: str(getattr(certs["gateway"], k)) for k in ("ca", "cert", "key")}} if certs else {}
    children: list[Child] = []
    stop = _install_stop_handlers()
    try:
        if not args.model:
            _build_builtin_model()  # once here, not raced by N workers (which then find it in the cache)
        model_flags = ["--model", args.model] if args.model else []
        host = args.host
        worker_addresses = [f"{host}:{args.worker_port + i}" for i in range(args.workers)]
        router_addresses = [f"{host}:{router_port(args.router_port, i)}" for i in range(args.routers)]
        routers = ",".join(router_addresses)
        aggregator_address = f"{host}:{args.aggregator_port}"
        gateway_address = f"{host}:{args.port}"
        plan = [
            *[
                (f"worker-{i}", address, ["worker", *model_flags, "--max-num-seqs", str(args.max_num_seqs)])
                for i, address in enumerate(worker_addresses)
            ],
            *[
                (f"router-{i}", address, ["router", "--workers", ",".join(worker_addresses)])
                for i, address in enumerate(router_addresses)
            ],
            ("aggregator", aggregator_address, ["aggregator", "--router", routers]),
            (
                "gateway",
                gateway_address,
                [
                    "gateway",
                    *("--router", routers, "--aggregator", aggregator_address),
                    *("--http-port", str(args.http_port)),
                ],
            ),
        ]
        print(f"meshserve: starting {len(plan)} services (logs in {log_dir})", flush=True)
        env = child_env()
        for name, address, command in plan:
            port = address.rsplit(":", 1)[1]
            flags = ["--host", host, "--port", port, "--metrics-port", str(_metrics_port(name, args.metrics_port))]
            if args.trace:
                flags += ["--trace", args.trace]
            if certs:
                files = certs[role_of(name)]
                flags += ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]
            if args.insecure:
                flags += ["--insecure"]
            (log_dir / f"{name}.log").write_bytes(b"")  # this run's log; restarts append to it
            child = Child(name, address, [*command, *flags], log_dir / f"{name}.log", env)
            child.start()
            children.append(child)
        # Workers load the model in parallel; the others start in a second or two.
        for child in children:
            if not _wait_ready(child, children, args.start_timeout, stop, certs["gateway"] if certs else None):
                return 1
        write_state_file(state_file(), children, tls_state)
        print("meshserve: the mesh is up", flush=True)
        for child in children:
            print(f"  {child.name:<12} {child.address:<22} pid {child.pid}", flush=True)
        if args.http_port > 0:
            web = f"{'https' if certs else 'http'}://{host if ':' not in host else f'[{host}]'}:{args.http_port}"
            print(f"  chat page    {web}/    OpenAI-compatible API {web}/v1", flush=True)
        if certs:
            print(f"  TLS          CA {certs['gateway'].ca}", flush=True)
        print('try: meshserve generate "Hello" --stream    (Ctrl-C stops the mesh)', flush=True)
        return supervise(children, stop, lambda changed: write_state_file(state_file(), changed, tls_state))
    finally:
        stop_all(children)
        state = state_file()
        if state.exists() and json.loads(state.read_text()).get("pid") == os.getpid():
            state.unlink()


def _metrics_port(name: str, base: int) -> int:
    """Gateway at base, router +1, aggregator +2, worker i at +WORKER_METRICS_OFFSET+i; 0 turns them all off."""
    if not base:
        return 0
    if name.startswith("worker-"):
        return base + WORKER_METRICS_OFFSET + int(name.removeprefix("worker-"))
    if name.startswith("router-"):  # router-0 at +1, the rest after the aggregator's +2
        index = int(name.removeprefix("router-"))
        return base + 1 if index == 0 else base + 2 + index
    return base + {"gateway": 0, "aggregator": 2}[name]


def _build_builtin_model() -> None:
    # In a child process: the launcher itself never imports torch.
    # child_env: the child checks that its parent is this process (die_with_parent), not ours.
    command = [sys.executable, "-m", "meshserve.cli", "builtin-model"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=child_env())
    if result.returncode != 0:
        raise SystemExit(f"meshserve: could not create the built-in model:\n{result.stderr}")


def _install_stop_handlers() -> list[int]:
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return received


PARENT_PID_ENV = "MESHSERVE_PARENT_PID"


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a service process that must not outlive this one (see `die_with_parent`)."""
    return {**(os.environ if base is None else base), PARENT_PID_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """Linux: arm SIGTERM for when the parent named in the environment dies without cleaning up (e.g. SIGKILL).

    The child arms it itself at start-up rather than through `preexec_fn`: code run between fork and exec
    in a parent with threads (gRPC, torch) can crash or deadlock the child.
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def _wait_ready(
    child: Child, children: list[Child], timeout: float, stop: list[int], tls: TlsFiles | None = None
) -> bool:
    deadline = time.monotonic() + timeout
    tls_args = health_args(tls, child.name)
    while time.monotonic() < deadline and not stop:
        for other in children:
            if not other.running:
                _report_start_failure(other)
                return False
        if health_status(child.address, timeout=1.0, **tls_args) == "SERVING":
            return True
        time.sleep(0.25)
    if not stop:
        print(
            f"meshserve: {child.name} was not ready after {timeout:.0f} s; see {child.log_path}",
            file=sys.stderr,
        )
    return False


def _report_start_failure(child: Child) -> None:
    """A service that exits while the mesh starts is a mistake to fix (a port in use, a bad flag), not a
    crash to restart: the mesh stops, showing why."""
    assert child.process is not None
    print(
        f"meshserve: {child.name} ({child.address}) {exit_reason(child)} while the mesh was starting; "
        f"last lines of {child.log_path}:",
        file=sys.stderr,
    )
    try:
        for line in child.log_path.read_text(errors="replace").splitlines()[-10:]:
            print(f"    {line}", file=sys.stderr)
    except OSError:
        pass
