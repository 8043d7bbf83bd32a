"""The soak's faults on a schedule: SIGKILL a random worker every N seconds, SIGKILL a router once, freeze a
worker once (SIGSTOP, then SIGCONT some seconds later), each logged with its time.

Never so close together that a kind of service has none left: before each fault the state file and the
health checks must show another worker (or router) SERVING besides the victim, and a frozen one counts as
down. A fault that cannot go yet waits (checked every POLL_S) for at most POSTPONE_MAX_S, then is skipped; a
periodic kill still waiting when the next one is due gives way to it, and the one-off faults (the router
kill, the freeze) go first when both could, since the soak has one chance at each. The log says what waited
and what was skipped. It runs in a thread of its own, so its blocking health checks never hold up the load's
event loop.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from meshserve.loadgen.local_mesh import LocalMesh, Service

Action = Literal["kill-worker", "kill-router", "freeze-worker", "thaw-worker"]
POLL_S = 0.5
POSTPONE_MAX_S = 30.0
SIGNAL_OF: dict[Action, signal.Signals] = {
    "kill-worker": signal.SIGKILL,
    "kill-router": signal.SIGKILL,
    "freeze-worker": signal.SIGSTOP,
    "thaw-worker": signal.SIGCONT,
}


@dataclass(frozen=True)
class Planned:
    at: float  # seconds from the load's start
    action: Action


def plan_faults(
    duration: float, kill_worker_every: float, kill_router_at: float, freeze_worker_at: float
) -> list[Planned]:
    """The schedule: a worker kill every `kill_worker_every` s, one router kill and one freeze at their times,
    all before the load ends (0 turns each off)."""
    plan = []
    if kill_worker_every > 0:
        plan += [Planned(kill_worker_every * k, "kill-worker") for k in range(1, int(duration / kill_worker_every) + 1)]
    if kill_router_at > 0:
        plan.append(Planned(kill_router_at, "kill-router"))
    if freeze_worker_at > 0:
        plan.append(Planned(freeze_worker_at, "freeze-worker"))
    return sorted((p for p in plan if p.at < duration), key=lambda p: p.at)


@dataclass
class Fault:
    at: float  # seconds from the load's start when it was injected
    planned_at: float
    action: Action
    service: str
    pid: int

    def describe(self) -> str:
        late = f", {self.at - self.planned_at:.1f} s after its time" if self.at - self.planned_at >= POLL_S else ""
        return f"+{self.at:6.1f} s  {SIGNAL_OF[self.action].name} {self.service} (pid {self.pid}){late}"


class FaultInjector:
    def __init__(
        self,
        mesh: LocalMesh,
        plan: list[Planned],
        freeze_seconds: float,
        seed: int,
        say: Callable[[str], None],
        poll_s: float = POLL_S,
        postpone_max_s: float = POSTPONE_MAX_S,
    ) -> None:
        self.mesh = mesh
        self.poll_s, self.postpone_max_s = poll_s, postpone_max_s
        self.plan = plan
        self.freeze_seconds = freeze_seconds
        self.say = say
        self.faults: list[Fault] = []  # injected, in order (thaws included)
        self.skipped: list[tuple[Planned, str]] = []  # never injected, and why
        self._rng = random.Random(f"{seed}:faults")
        self._stop = threading.Event()

    def stop(self) -> None:
        """The load has ended: faults not yet injected are skipped; a frozen worker is thawed at once."""
        self._stop.set()

    def run(self, start: float) -> None:
        """Injects the plan against the load that began at perf_counter `start`; returns when each fault is
        done or skipped and nothing is left frozen."""
        pending = list(self.plan)  # by planned time
        thaws: list[tuple[float, Service]] = []  # (due, the frozen worker), by due time
        while pending or thaws:
            now = time.perf_counter() - start
            if thaws and (thaws[0][0] <= now or self._stop.is_set()):
                thaw_at, victim = thaws.pop(0)
                self._inject(Planned(thaw_at, "thaw-worker"), victim, now)
                continue
            if self._stop.is_set():
                self._skip(pending.pop(0), "the load had ended")
                continue
            due = [p for p in pending if p.at <= now]
            kills = [p for p in due if p.action == "kill-worker"]
            for superseded in kills[:-1]:
                pending.remove(superseded)
                self._skip(superseded, "still waiting for a worker to spare when the next kill was due")
            for planned in sorted((p for p in pending if p.at <= now), key=lambda p: p.action == "kill-worker"):
                victim, why = self._victim(planned.action)
                if victim is not None:
                    pending.remove(planned)
                    self._inject(planned, victim, now)
                    if planned.action == "freeze-worker":
                        thaws.append((now + self.freeze_seconds, victim))
                        thaws.sort(key=lambda thaw: thaw[0])
                    break
                if now - planned.at + self.poll_s > self.postpone_max_s:
                    pending.remove(planned)
                    self._skip(planned, why)
            else:  # nothing could go: wait for the next fault's time, a thaw, or the next check
                waiting = any(p.at <= now for p in pending)
                next_at = min((p.at for p in pending if p.at > now), default=math.inf)
                wake = min(now + self.poll_s if waiting else math.inf, next_at, thaws[0][0] if thaws else math.inf)
                if wake < math.inf:  # (inf: the last fault was just skipped)
                    self._stop.wait(max(0.0, wake - now))  # returns at once when the load has ended

    def _victim(self, action: Action) -> tuple[Service | None, str]:
        """A random SERVING service of the kind the action hits, when another one of that kind is SERVING; for
        workers, only those the routers are using count."""
        kind = "router" if action == "kill-router" else "worker"
        serving = [s for s in self.mesh.services() if s.kind == kind and self.mesh.serving(s)]
        if kind == "worker":
            routed = self.mesh.routed_workers()
            serving = [s for s in serving if s.address in routed]
        if len(serving) < 2:
            what = "worker(s) SERVING and routed" if kind == "worker" else "router(s) SERVING"
            return None, f"{len(serving)} {what}: the fault would leave none"
        return self._rng.choice(serving), ""

    def _inject(self, planned: Planned, victim: Service, now: float) -> None:
        try:
            self.mesh.signal(victim, SIGNAL_OF[planned.action])
        except ProcessLookupError:  # it died between the check and the signal
            self._skip(planned, f"{victim.name} (pid {victim.pid}) had already exited")
            return
        assert victim.pid is not None
        fault = Fault(now, planned.at, planned.action, victim.name, victim.pid)
        self.faults.append(fault)
        self.say(fault.describe())

    def _skip(self, planned: Planned, why: str) -> None:
        self.skipped.append((planned, why))
        self.say(f"+{planned.at:6.1f} s  skipped {planned.action}: {why}")

    def killed(self) -> dict[str, int]:
        """SIGKILLs per service name."""
        counts: dict[str, int] = {}
        for fault in self.faults:
            if fault.action.startswith("kill"):
                counts[fault.service] = counts.get(fault.service, 0) + 1
        return counts
