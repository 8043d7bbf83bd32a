"""The `meshserve` command as a user runs it: `up` starts one process per service, `generate` talks to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import free_ports

MESHSERVE = [sys.executable, "-m", "meshserve.cli"]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


class Output:
    """Collects a pipe in a thread so the test can wait for a line without blocking forever."""

    def __init__(self, pipe) -> None:
        self.text = ""
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe) -> None:
        for line in pipe:
            with self._lock:
                self.text += line

    def wait_for(self, marker: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if marker in self.text:
                    return True
            time.sleep(0.1)
        return False


@pytest.fixture
def env(cache_dir, model_dir) -> dict[str, str]:
    return {**os.environ, "MESHSERVE_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}


def test_up_serves_a_streamed_answer_and_stops_cleanly_on_ctrl_c(env, tmp_path):
    gateway, router, aggregator, worker, http = free_ports(5)
    up = subprocess.Popen(
        [*MESHSERVE, "up", "--workers", "2", "--port", str(gateway), "--router-port", str(router),
         "--aggregator-port", str(aggregator), "--worker-port", str(worker), "--log-dir", str(tmp_path),
         "--metrics-port", "0", "--http-port", str(http)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = Output(up.stdout), Output(up.stderr)
        assert out.wait_for("Ctrl-C", timeout=180), out.text + err.text
        assert f"chat page    http://127.0.0.1:{http}/" in out.text
        state = json.loads((Path(env["MESHSERVE_CACHE"]) / "mesh.json").read_text())
        pids = {s["name"]: s["pid"] for s in state["services"]}
        assert set(pids) == {"worker-0", "worker-1", "router", "aggregator", "gateway"}

        status = subprocess.run([*MESHSERVE, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert status.stdout.count("SERVING") == 5 and "meshserve-tiny" in status.stdout
        assert "queues       critical 0" in status.stdout
        assert status.stdout.count("running 0/") + status.stdout.count("running 1/") == 2  # two workers, up

        address = f"127.0.0.1:{gateway}"
        generate = [*MESHSERVE, "generate", "Hello", "--stream", "--max-tokens", "8", "--gateway", address]
        answer = subprocess.run(generate, env=env, capture_output=True, text=True, timeout=60)
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() and "completion tokens" in answer.stderr

        # A worker that dies is reported; the rest of the mesh keeps serving.
        os.kill(pids["worker-1"], signal.SIGKILL)
        assert err.wait_for("exited unexpectedly", timeout=10), err.text
        assert "worker-1" in err.text
        for _ in range(3):
            again = subprocess.run(generate, env=env, capture_output=True, text=True, timeout=60)
            assert again.returncode == 0, again.stderr

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
        for name, pid in pids.items():
            assert not process_alive(pid), f"{name} (pid {pid}) outlived `meshserve up`"
        assert not (Path(env["MESHSERVE_CACHE"]) / "mesh.json").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_generate_says_clearly_when_the_mesh_is_not_running(env):
    (port,) = free_ports(1)
    result = subprocess.run(
        [*MESHSERVE, "generate", "Hello", "--gateway", f"127.0.0.1:{port}", "--timeout", "5"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3
    assert "cannot reach the gateway" in result.stderr and "meshserve up" in result.stderr


def test_a_service_process_dies_with_a_launcher_that_is_killed(env, tmp_path):
    # The launcher stands in for `meshserve up` killed with SIGKILL: it cannot stop its children itself.
    (port,) = free_ports(1)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(
        "import subprocess, sys, time\n"
        "from meshserve.cli.launcher import child_env\n"
        f"child = subprocess.Popen([sys.executable, '-m', 'meshserve.cli', 'router', '--port', '{port}',"
        " '--workers', '127.0.0.1:1', '--metrics-port', '0'], env=child_env())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, str(launcher)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        from meshserve.common.channels import health_status

        deadline = time.monotonic() + 60
        while health_status(f"127.0.0.1:{port}", timeout=1.0) != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.2)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while process_alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(child_pid), "the router outlived its killed launcher"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
