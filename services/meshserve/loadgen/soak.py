"""`meshserve soak`: load plus faults on a schedule against a mesh of its own, checking every output.

1. A `meshserve up` of its own (local_mesh.py): free ports, its own state file and logs.
2. References: each prompt of a fixed pool, greedy, exactly --output-tokens long, run alone on the quiet mesh.
3. The load (runner.run_level, closed loop): requests cycle through the pool, each with its own request id,
   while faults.py kills and freezes services on its schedule.
4. Every request must complete with its prompt's reference tokens exactly (a missing or duplicated token shows
   as a mismatch) and a normal end, or fail with a retryable status: UNAVAILABLE, or RESOURCE_EXHAUSTED with
   RetryInfo. Anything else fails the soak, and so does a service that is not back and SERVING in time.
5. The report (soak_report.py): requests sent, completed and failed by status, mismatches, the stall (longest
   gap) of the streams that crossed a failover against all, the faults, each service's restarts.

A stream crossed a failover when a router's log (worker lost) or the gateway's (router lost) says it resumed
that request id on another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from meshserve.loadgen.faults import FaultInjector, plan_faults
from meshserve.loadgen.grpc_target import GrpcTarget
from meshserve.loadgen.levels import LoadLevel
from meshserve.loadgen.local_mesh import LocalMesh, MeshStartError
from meshserve.loadgen.records import RequestRecord, record_of
from meshserve.loadgen.runner import run_level
from meshserve.loadgen.soak_report import SoakReport, judge
from meshserve.loadgen.target import Reply, TargetError
from meshserve.loadgen.workload import LengthDistribution, RequestSpec, Workload

PROGRESS_EVERY_S = 15.0
FAILOVER_MARK = "resuming on another"  # the words of both failover warnings (router/server.py, common/routers.py)


@dataclass(frozen=True)
class SoakSettings:
    workers: int = 3
    routers: int = 2
    duration: float = 120.0  # seconds of load
    concurrency: int = 6
    prompts: int = 16  # the pool's size
    prompt_tokens: LengthDistribution = field(default_factory=lambda: LengthDistribution("fixed", 32))
    output_tokens: LengthDistribution = field(default_factory=lambda: LengthDistribution("fixed", 32))
    kill_worker_every: float = 10.0  # 0: never
    kill_router_at: float = 0.0  # 0: never
    freeze_worker_at: float = 0.0  # 0: never
    freeze_seconds: float = 6.0
    seed: int = 0
    timeout: float = 60.0  # seconds each request may take
    settle_timeout: float = 120.0  # seconds for every service to be back and SERVING at the end
    start_timeout: float = 300.0
    model: str = ""
    dtype: str = "float32"

    def describe(self) -> dict[str, object]:
        described = dataclasses.asdict(self)
        described["prompt_tokens"], described["output_tokens"] = str(self.prompt_tokens), str(self.output_tokens)
        return described


class SoakError(Exception):
    """The soak could not run (the mesh did not start, a reference failed): one line, and where to look."""


@dataclass
class PoolWorkload(Workload):
    """Request k is prompt k % pool of a fixed pool, with request id `soak-k`."""

    pool: int = 16

    def request(self, number: int) -> RequestSpec:
        prompt = super().request(number % self.pool)
        return dataclasses.replace(prompt, number=number, request_id=f"soak-{number}")


class CountingTarget:
    """The target, counting what is sent, so that a request that never ends up in a record is seen as lost."""

    def __init__(self, target: GrpcTarget) -> None:
        self.target = target
        self.sent = 0

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def model(self) -> str:
        return self.target.model

    def describe(self) -> dict[str, object]:
        return self.target.describe()

    async def send(self, request: RequestSpec) -> Reply:
        self.sent += 1
        return await self.target.send(request)


def run_soak(settings: SoakSettings, work_dir: Path, say: Callable[[str], None] = print) -> SoakReport:
    """Starts the mesh, runs the references and the soak, waits for every service, judges; stops the mesh."""
    mesh = LocalMesh(settings.workers, settings.routers, work_dir, settings.model, settings.dtype)
    say(f"meshserve soak: starting {settings.workers} workers and {settings.routers} routers (logs in {mesh.log_dir})")
    began = time.monotonic()
    try:
        try:
            mesh.start(settings.start_timeout)
        except MeshStartError as exc:
            raise SoakError(f"the mesh did not start: {exc}") from None
        say(f"meshserve soak: the mesh is up after {time.monotonic() - began:.0f} s, gateway {mesh.gateway}")
        injector, records, sent, references = asyncio.run(_references_and_load(settings, mesh, say))
        say(f"meshserve soak: the load has ended; waiting up to {settings.settle_timeout:.0f} s for every service")
        settle_started = time.monotonic()
        not_back = mesh.wait_all_serving(settings.settle_timeout)
        settled = time.monotonic() - settle_started
        return judge(
            settings.describe(),
            records,
            sent,
            references,
            injector,
            failed_over=failover_request_ids(mesh),
            services=mesh.services(),
            not_back=not_back,
            settled_s=settled,
            log_lines=mesh.log_lines,
        )
    finally:
        mesh.stop()


async def _references_and_load(
    settings: SoakSettings, mesh: LocalMesh, say: Callable[[str], None]
) -> tuple[FaultInjector, list[RequestRecord], int, dict[int, list[int]]]:
    workload = PoolWorkload(
        prompt_tokens=settings.prompt_tokens,
        output_tokens=settings.output_tokens,
        seed=settings.seed,
        pool=settings.prompts,
    )
    try:
        async with GrpcTarget(mesh.gateway, timeout=settings.timeout) as target:
            references = await _references(target, workload)
            say(f"meshserve soak: {len(references)} references, each prompt alone on the quiet mesh")
            injector, records, sent = await _load_and_faults(settings, mesh, CountingTarget(target), workload, say)
            return injector, records, sent, references
    except TargetError as exc:  # the gateway of a mesh that said it was up did not answer
        raise SoakError(str(exc)) from None


async def _load_and_faults(
    settings: SoakSettings,
    mesh: LocalMesh,
    target: CountingTarget,
    workload: PoolWorkload,
    say: Callable[[str], None],
) -> tuple[FaultInjector, list[RequestRecord], int]:
    plan = plan_faults(settings.duration, settings.kill_worker_every, settings.kill_router_at,
                       settings.freeze_worker_at)  # fmt: skip
    injector = FaultInjector(mesh, plan, settings.freeze_seconds, settings.seed, lambda line: say(f"  {line}"))
    ended: list[RequestRecord] = []
    say(f"meshserve soak: {settings.duration:g} s of load at concurrency {settings.concurrency}, {len(plan)} faults")
    start = time.perf_counter()
    faults = asyncio.create_task(asyncio.to_thread(injector.run, start))
    ticker = asyncio.create_task(_progress(start, target, ended, say))
    try:
        level = LoadLevel(concurrency=settings.concurrency, duration=settings.duration)
        result = await run_level(target, workload, level, ended.append)
    finally:
        ticker.cancel()
        injector.stop()  # what was not injected yet is skipped; a frozen worker is thawed now
        await faults
    return injector, result.records, target.sent


async def _references(target: GrpcTarget, workload: PoolWorkload) -> dict[int, list[int]]:
    """Each pool prompt's greedy tokens, one request at a time."""
    references: dict[int, list[int]] = {}
    for index in range(workload.pool):
        spec = dataclasses.replace(workload.request(index), request_id=f"soak-reference-{index}")
        record = record_of(spec, await target.send(spec), time.perf_counter())
        if not record.ok or record.token_ids is None or len(record.token_ids) != spec.max_tokens:
            raise SoakError(
                f"the reference of prompt {index} failed on the quiet mesh: {record.status} {record.error} "
                f"({record.output_tokens} of {spec.max_tokens} tokens)"
            )
        references[index] = list(record.token_ids)
    return references


async def _progress(
    start: float, counting: CountingTarget, ended: list[RequestRecord], say: Callable[[str], None]
) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        failed = sum(1 for r in ended if not r.ok)
        say(f"  +{time.perf_counter() - start:6.1f} s  {counting.sent} sent, {len(ended) - failed} completed, "
            f"{failed} failed")  # fmt: skip


def failover_request_ids(mesh: LocalMesh) -> dict[str, list[str]]:
    """Request id -> the failover warnings the routers and the gateway logged for it."""
    found: dict[str, list[str]] = {}
    for line in mesh.log_lines(FAILOVER_MARK):
        name, _, text = line.partition(": ")
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if entry.get("request_id"):
            found.setdefault(entry["request_id"], []).append(f"{name}: {entry.get('msg', '')}")
    return found
