"""`meshserve soak`: load plus faults against a mesh it starts itself, every output checked against its prompt's
reference. First the soak as CI runs it (3 workers, 2 routers, a worker SIGKILLed every 10 s, a router killed
once, a worker frozen once), then, without a mesh, the rules it keeps and the way it judges what it saw.

Nothing here judges speed (this machine's varies): only that no request and no token is lost or doubled, and
that every service the soak killed came back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from meshserve.loadgen.faults import FaultInjector, Planned, plan_faults
from meshserve.loadgen.local_mesh import Service
from meshserve.loadgen.records import RequestRecord
from meshserve.loadgen.soak_report import compare, judge, retryable
from meshserve.loadgen.workload import RequestSpec
from support import MESHSERVE

SOAK_TIMEOUT_S = 240  # start-up, references, 40 s of load, every service back, stop: 80-130 s here
SOAK_FLAGS = [
    *("--workers", "3", "--routers", "2", "--duration", "40", "--concurrency", "6"),
    *("--prompts", "16", "--prompt-tokens", "24", "--output-tokens", "32"),
    # The freeze first, so that it finds every worker up; its thaw comes before the first kill.
    *("--kill-worker-every", "10", "--kill-router-at", "15", "--freeze-worker-at", "4", "--freeze-seconds", "5"),
    *("--timeout", "30", "--settle-timeout", "90"),
]


def test_soak_with_workers_killed_a_router_killed_and_a_worker_frozen_loses_no_request_and_no_token(
    cache_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    work_dir, report_path, output = tmp_path / "soak", tmp_path / "soak.json", tmp_path / "soak.out"
    env = {**os.environ, "MESHSERVE_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    command = [*MESHSERVE, "soak", *SOAK_FLAGS, "--work-dir", str(work_dir), "--json", str(report_path)]
    with open(output, "w") as out:
        soak = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        soak.wait(timeout=SOAK_TIMEOUT_S)
    finally:
        stop_soak(soak, work_dir)
    printed = output.read_text()
    assert soak.returncode == 0, f"the soak failed (exit {soak.returncode}):\n{printed}"
    report = json.loads(report_path.read_text())
    assert report["passed"] and not report["problems"], printed
    assert report["mismatches"] == [], printed  # every token of every completed stream, once, in order
    assert report["not_retryable"] == {} and report["lost"] == 0, printed
    failed = sum(report["retryable"].values())  # counted and reported; allowed
    assert report["sent"] == report["completed"] + failed > 0, printed
    assert report["not_back"] == [], printed

    actions = [(fault["action"], fault["service"]) for fault in report["faults"]]
    kinds = [action for action, _ in actions]
    assert kinds.count("kill-router") == 1 and kinds.count("freeze-worker") == 1, printed
    frozen = next(service for action, service in actions if action == "freeze-worker")
    assert ("thaw-worker", frozen) in actions, printed  # nothing is left frozen
    # Kills at 10, 20 and 30 s: the first two always find another worker SERVING; the third waits for one
    # that was killed to be back, and is skipped when none is before the load ends (the report says so).
    assert kinds.count("kill-worker") >= 2, printed
    killed = {service for action, service in actions if action.startswith("kill")}
    restarts = {s["name"]: (s["restarts"], s["killed"]) for s in report["services"]}
    for name in killed:
        assert restarts[name][0] == restarts[name][1] >= 1, f"{name}: (restarts, kills) {restarts[name]}\n{printed}"
    assert all(restarts[name][0] == 0 for name in restarts.keys() - killed), f"died unkilled: {restarts}\n{printed}"
    assert "result     PASS" in printed


def stop_soak(soak: subprocess.Popen, work_dir: Path) -> None:
    """The soak stops its own mesh on SIGINT; whatever still runs after that (the soak itself killed) is ended
    here: thawed, then killed."""
    if soak.poll() is None:
        soak.send_signal(signal.SIGINT)
        try:
            soak.wait(timeout=90)
        except subprocess.TimeoutExpired:
            soak.kill()
            soak.wait()
    try:
        state = json.loads((work_dir / "cache" / "mesh.json").read_text())
    except (OSError, ValueError):
        return
    for pid in [state.get("pid"), *(s.get("pid") for s in state.get("services", []))]:
        if pid and b"meshserve" in _cmdline(pid):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class FakeMesh:
    """Workers (and routers) whose health the test sets; every signal is recorded with how many other
    services of the victim's kind were SERVING at that moment."""

    def __init__(self, workers: int, routers: int = 2) -> None:
        names = [f"worker-{i}" for i in range(workers)] + [f"router-{i}" for i in range(routers)]
        self.pids = {name: 1000 + i for i, name in enumerate(names)}
        self.up = dict.fromkeys(names, True)
        self.frozen: set[int] = set()
        self.signals: list[tuple[str, str, int]] = []  # (signal, service, others of its kind serving)
        self.lock = threading.Lock()

    def services(self) -> list[Service]:
        with self.lock:
            return [Service(name, f"127.0.0.1:{pid}", pid, 0, "") for name, pid in self.pids.items()]

    def serving(self, service: Service) -> bool:
        with self.lock:
            return self.up[service.name] and service.pid not in self.frozen

    def routed_workers(self) -> set[str]:
        return {s.address for s in self.services() if s.kind == "worker"}  # routers use every worker up

    def signal(self, service: Service, sig: signal.Signals) -> None:
        others = sum(1 for s in self.services() if s.kind == service.kind and s != service and self.serving(s))
        with self.lock:
            self.signals.append((sig.name, service.name, others))
            if sig == signal.SIGKILL:
                self.up[service.name] = False
            elif sig == signal.SIGSTOP:
                self.frozen.add(service.pid)  # type: ignore[arg-type]
            elif sig == signal.SIGCONT:
                self.frozen.discard(service.pid)  # type: ignore[arg-type]

    def restart_later(self, name: str, seconds: float) -> None:
        def restart() -> None:
            time.sleep(seconds)
            with self.lock:
                self.up[name] = True

        threading.Thread(target=restart, daemon=True).start()


def inject(mesh: FakeMesh, plan: list[Planned], freeze_seconds: float = 0.2, **timing: float) -> FaultInjector:
    injector = FaultInjector(mesh, plan, freeze_seconds, seed=1, say=lambda line: None, poll_s=0.01, **timing)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            injector.run(time.perf_counter())
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive() and not errors, f"the injector did not finish its plan: {errors}"
    return injector


def test_a_fault_waits_until_another_worker_serves_and_the_one_off_faults_go_first() -> None:
    mesh = FakeMesh(workers=2)
    plan = [Planned(0.01, "kill-worker"), Planned(0.05, "kill-worker"), Planned(0.1, "kill-worker")]
    plan.append(Planned(0.15, "freeze-worker"))
    original_signal = mesh.signal

    def signal_and_restart(service: Service, sig: signal.Signals) -> None:
        original_signal(service, sig)
        if sig == signal.SIGKILL:
            mesh.restart_later(service.name, 0.3)  # as the supervisor does, some time later

    mesh.signal = signal_and_restart  # type: ignore[method-assign]
    injector = inject(mesh, plan)
    # The kill of 0.05 s still waits when the next is due: it gives way. When the killed worker is back, the
    # freeze goes before the kill that waited longer; that kill waits for the thaw (a frozen worker is down).
    assert [name for name, _, _ in mesh.signals] == ["SIGKILL", "SIGSTOP", "SIGCONT", "SIGKILL"], mesh.signals
    assert all(others >= 1 for name, _, others in mesh.signals if name != "SIGCONT"), mesh.signals
    assert [(p.at, p.action) for p, _ in injector.skipped] == [(0.05, "kill-worker")], injector.skipped
    assert not mesh.frozen
    freeze, thaw, kill = injector.faults[1:]
    assert freeze.at >= 0.3 and thaw.at - freeze.at >= 0.2 and kill.planned_at == 0.1, injector.faults


def test_a_fault_that_would_leave_no_worker_is_skipped_and_says_why() -> None:
    mesh = FakeMesh(workers=1, routers=1)
    injector = inject(mesh, [Planned(0.01, "kill-worker"), Planned(0.02, "kill-router")], postpone_max_s=0.1)
    assert mesh.signals == []
    assert [(p.action, why) for p, why in injector.skipped] == [
        ("kill-worker", "1 worker(s) SERVING and routed: the fault would leave none"),
        ("kill-router", "1 router(s) SERVING: the fault would leave none"),
    ]


def test_the_plan_kills_every_n_seconds_and_each_fault_once_within_the_load() -> None:
    plan = plan_faults(duration=45, kill_worker_every=10, kill_router_at=15, freeze_worker_at=50)
    assert [(p.at, p.action) for p in plan] == [
        (10, "kill-worker"), (15, "kill-router"), (20, "kill-worker"), (30, "kill-worker"), (40, "kill-worker"),
    ]  # fmt: skip
    assert plan_faults(duration=45, kill_worker_every=0, kill_router_at=0, freeze_worker_at=0) == []


def record(
    tokens: list[int], status: str = "OK", finish: str = "length", number: int = 0, **fields: Any
) -> RequestRecord:
    spec = RequestSpec(number, (300, 301), None, 6, 0.0, None, True, request_id=f"soak-{number}")
    return RequestRecord(spec, status, "", 0.0, 1.0, 0.1, token_ids=tokens, output_tokens=len(tokens),
                         finish_reason=finish, **fields)  # fmt: skip


REFERENCE = [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("tokens", "finish", "kinds"),
    [
        ([1, 2, 3, 4, 5, 6], "length", None),
        ([1, 2, 3, 3, 4, 5], "length", ["missing", "duplicated"]),  # one token twice pushes the last one out
        ([1, 2, 4, 5, 6], "length", ["missing", "end"]),
        ([1, 2, 9, 4, 5, 6], "length", ["different"]),
        ([1, 2, 3, 4, 5, 6], "", ["end"]),  # every token, but no normal end
    ],
)
def test_a_stream_is_judged_token_by_token_against_its_reference(
    tokens: list[int], finish: str, kinds: list[str] | None
) -> None:
    mismatch = compare(record(tokens, finish=finish), REFERENCE, prompt=0)
    assert (mismatch.kinds if mismatch else None) == kinds, mismatch


def test_only_unavailable_and_resource_exhausted_with_retry_info_are_retryable_and_the_rest_fail_the_soak() -> None:
    assert retryable(record([], "UNAVAILABLE"))
    assert retryable(record([], "RESOURCE_EXHAUSTED", retry_delay=1.0))
    assert not retryable(record([], "RESOURCE_EXHAUSTED"))
    assert not retryable(record([], "DEADLINE_EXCEEDED")) and not retryable(record([], "INCOMPLETE_STREAM"))
    records = [
        record(REFERENCE, number=0),
        record([1, 2], "UNAVAILABLE", "", number=1),
        record([1, 2, 3], "INTERNAL", "", number=2),
    ]
    report = judge({}, records, 4, {0: REFERENCE}, inject(FakeMesh(workers=2), []), failed_over={}, services=[],
                   not_back=[], settled_s=0.0, log_lines=lambda needle: [f"router-0: {needle} was here"])  # fmt: skip
    assert (report.completed, report.retryable, report.not_retryable, report.lost) == (1, {"UNAVAILABLE": 1},
                                                                                       {"INTERNAL": 1}, 1)  # fmt: skip
    assert not report.passed and len(report.problems) == 2, report.problems
    assert report.failures[0]["log_lines"] == ['router-0: "soak-2" was here']
    assert report.lines()[-1].startswith("result     FAIL")
