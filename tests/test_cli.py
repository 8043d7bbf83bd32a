"""The `meshserve` command as a user runs it: `up` starts one process per service, `generate` talks to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from meshserve.v1 import common_pb2
from support import MESHSERVE, free_ports, stop_processes, wait_for


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

    def has(self, marker: str) -> bool:
        with self._lock:
            return marker in self.text


@pytest.fixture
def env(cache_dir, model_dir) -> dict[str, str]:
    return {**os.environ, "MESHSERVE_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}


def test_up_serves_restarts_what_dies_and_stops_cleanly_on_ctrl_c(env, tmp_path):
    gateway, router, aggregator, worker, http = free_ports(5)
    up = subprocess.Popen(
        [*MESHSERVE, "up", "--workers", "2", "--routers", "2", "--port", str(gateway), "--router-port", str(router),
         "--aggregator-port", str(aggregator), "--worker-port", str(worker), "--log-dir", str(tmp_path),
         "--metrics-port", "0", "--http-port", str(http)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = Output(up.stdout), Output(up.stderr)
        wait_for(lambda: out.has("Ctrl-C"), "`meshserve up` to say it is up", 180, details=lambda: out.text + err.text)
        assert f"chat page    http://127.0.0.1:{http}/" in out.text
        state = json.loads((Path(env["MESHSERVE_CACHE"]) / "mesh.json").read_text())
        pids = {s["name"]: s["pid"] for s in state["services"]}
        assert set(pids) == {"worker-0", "worker-1", "router-0", "router-1", "aggregator", "gateway"}

        status = subprocess.run([*MESHSERVE, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert status.stdout.count("SERVING") == 6 and "meshserve-tiny" in status.stdout
        assert status.stdout.count("queues       critical 0") == 2  # each router's
        assert status.stdout.count("running 0/") + status.stdout.count("running 1/") == 4  # two workers, up

        address = f"127.0.0.1:{gateway}"
        generate = [*MESHSERVE, "generate", "Hello", "--stream", "--max-tokens", "8", "--gateway", address]
        answer = subprocess.run(generate, env=env, capture_output=True, text=True, timeout=60)
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() and "completion tokens" in answer.stderr
        status = subprocess.run([*MESHSERVE, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert "ttft         normal   recent p50 " in status.stdout, status.stdout  # the router that served it

        # A worker and a router that die are reported and started again, as a ReplicaSet would; the rest of
        # the mesh keeps serving meanwhile.
        os.kill(pids["worker-1"], signal.SIGKILL)
        os.kill(pids["router-0"], signal.SIGKILL)
        for _ in range(3):
            again = subprocess.run(generate, env=env, capture_output=True, text=True, timeout=60)
            assert again.returncode == 0, again.stderr
        for name in ("worker-1", "router-0"):
            wait_for(
                lambda name=name: err.has(f"{name} restarted"), f"{name} to be restarted", 120, details=lambda: err.text
            )
        assert "killed by SIGKILL" in err.text

        def restarted_and_serving() -> str:
            status = subprocess.run([*MESHSERVE, "status"], env=env, capture_output=True, text=True, timeout=60)
            return status.stdout if status.returncode == 0 and status.stdout.count("restarts 1") == 2 else ""

        shown = wait_for(restarted_and_serving, "status to show both restarted and serving", 120)
        assert "last exit: killed by SIGKILL" in shown and shown.count("SERVING") == 6
        state = json.loads((Path(env["MESHSERVE_CACHE"]) / "mesh.json").read_text())
        pids = {s["name"]: s["pid"] for s in state["services"]}  # the restarted ones are new processes

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
        for name, pid in pids.items():
            assert not process_alive(pid), f"{name} (pid {pid}) outlived `meshserve up`"
        assert not (Path(env["MESHSERVE_CACHE"]) / "mesh.json").exists()
    finally:
        stop_processes([up], grace=0)


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
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())
        from meshserve.common.channels import health_status

        wait_for(lambda: health_status(f"127.0.0.1:{port}", timeout=1.0) == "SERVING", "the router to serve", 60)
        parent.kill()
        parent.wait()
        wait_for(lambda: not process_alive(child_pid), "the router to exit with its killed launcher", 30)
    finally:
        stop_processes([parent], grace=0)
        if child_pid is not None and process_alive(child_pid):  # the behaviour under test failed: clean up
            os.kill(child_pid, signal.SIGKILL)


def test_generate_flags_fill_the_sampling_params_of_the_request():
    from meshserve.cli.commands import build_request
    from meshserve.cli.main import build_parser

    args = build_parser().parse_args(["generate", "Hi", "--min-tokens", "8", "--stop", "x", "--include-stop-str"])
    sampling = build_request(args).sampling
    assert (sampling.min_tokens, list(sampling.stop), sampling.include_stop_str_in_output) == (8, ["x"], True)
    assert not sampling.HasField("skip_special_tokens")  # unset: the default, skipped
    args = build_parser().parse_args(["generate", "Hi", "--show-special-tokens", "--priority", "high"])
    request = build_request(args)
    assert request.sampling.HasField("skip_special_tokens") and not request.sampling.skip_special_tokens
    assert request.priority == common_pb2.PRIORITY_HIGH and request.prompt == "Hi"
