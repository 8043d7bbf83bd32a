"""What `meshserve up` does once the mesh is up: keeps every service running, as a ReplicaSet would.

A service that exits is started again on the same address after a back-off that doubles with each quick
failure (1 s, 2 s, 4 s ... at most 30 s) and starts over once it has run a minute; each restart and the last
exit's reason (its code or signal, and its log's last line) go into the state file `meshserve status` reads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a service that ran this long failed afresh: its back-off starts over


@dataclass
class Child:
    name: str
    address: str
    command: list[str]  # `meshserve` arguments
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    last_exit: str = ""
    backoff_s: float = 0.0
    restart_at: float | None = None  # exited: when it starts again

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:  # a restart's lines follow the ones that explain it
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meshserve.cli", *self.command],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Own session: Ctrl-C reaches only the launcher, which stops the services in order.
                start_new_session=True,
                env=self.env,
            )
        self.started_at = time.monotonic()
        self.restart_at = None

    def state(self) -> dict[str, object]:
        return {
            "name": self.name,
            "address": self.address,
            "pid": self.pid if self.running else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "state": "running" if self.running else "restarting",
        }


def exit_reason(child: Child) -> str:
    """How the process ended: its signal, or its exit code and the last thing it logged (usually why)."""
    assert child.process is not None
    code = child.process.returncode
    if code < 0:  # a signal: whatever it last logged was cut off, not a reason
        return f"killed by {signal.Signals(-code).name}"
    how = f"exit code {code}"
    try:
        lines = [line for line in child.log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return f"{how}: {lines[-1].strip()[:300]}" if lines else how


def supervise(
    children: list[Child], stop: list[int], write_state: Callable[[list[Child]], None], poll_s: float = 0.25
) -> int:
    """Runs until Ctrl-C/SIGTERM (a signal number lands in `stop`), restarting whatever exits."""
    while not stop:
        changed = False
        now = time.monotonic()
        for child in children:
            if child.process is not None and child.process.poll() is not None and child.restart_at is None:
                child.last_exit = exit_reason(child)
                quick = now - child.started_at < STABLE_S
                doubled = min(BACKOFF_MAX_S, child.backoff_s * 2)
                child.backoff_s = doubled if quick and child.backoff_s else BACKOFF_FIRST_S
                child.restart_at = now + child.backoff_s
                print(
                    f"meshserve: {child.name} ({child.address}, pid {child.process.pid}) {child.last_exit}; "
                    f"restarting it in {child.backoff_s:.0f} s (log: {child.log_path})",
                    file=sys.stderr,
                    flush=True,
                )
                changed = True
            elif child.restart_at is not None and now >= child.restart_at:
                child.start()
                child.restarts += 1
                print(
                    f"meshserve: {child.name} restarted (pid {child.pid}, restart {child.restarts})",
                    file=sys.stderr,
                    flush=True,
                )
                changed = True
        if changed:
            write_state(children)
        time.sleep(poll_s)
    print("\nmeshserve: stopping", flush=True)
    return 0


def stop_all(children: list[Child], grace: float = 15.0) -> None:
    """SIGTERM front to back (gateway first, workers last) so nothing new arrives at a stopping service."""
    running = [c for c in reversed(children) if c.running]
    for child in running:
        assert child.process is not None
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in running:
        assert child.process is not None
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"meshserve: {child.name} did not stop in {grace:.0f} s; killing it", file=sys.stderr)
            child.process.kill()
            child.process.wait()


def write_state_file(path: Path, children: list[Child], extra: dict[str, object] | None = None) -> None:
    """Atomically: `meshserve status` may read it at any moment. `extra`: more top-level keys (TLS files)."""
    state = {"pid": os.getpid(), "services": [child.state() for child in children], **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(state, indent=2) + "\n")
    partial.replace(path)
