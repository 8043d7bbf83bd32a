"""What a soak saw, judged: every request completed with its reference tokens and a normal end, or failed
retryably; every service back. Printed for a person (`lines`) and kept whole for a program (`to_json`).

Retryable: UNAVAILABLE (a service went away; the mesh already resumed what it could), or RESOURCE_EXHAUSTED
with a RetryInfo saying when to come back. Anything else, or a request that never ended, fails the soak.
"""

from __future__ import annotations

import collections
import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from meshserve.loadgen.faults import Fault, FaultInjector
from meshserve.loadgen.local_mesh import Service
from meshserve.loadgen.records import RequestRecord
from meshserve.loadgen.results import percentile

MAX_SHOWN = 10  # mismatches and failures shown in full (the JSON has them all)
CONTEXT = 3  # tokens either side of a first difference


def retryable(record: RequestRecord) -> bool:
    return record.status == "UNAVAILABLE" or (record.status == "RESOURCE_EXHAUSTED" and record.retry_delay is not None)


@dataclass
class Mismatch:
    """A completed stream that is not its reference: which request, what differs, what the logs say of it."""

    request_id: str
    prompt: int  # its index in the pool
    kinds: list[str]  # missing (tokens of the reference absent), duplicated (tokens in excess), different, end
    first_difference: int | None  # token index
    expected: list[int]  # the reference around the first difference
    got: list[int]
    expected_length: int
    got_length: int
    end: str  # finish reason and usage as the stream ended
    log_lines: list[str] = field(default_factory=list)

    def describe(self) -> str:
        at = f" from token {self.first_difference}: expected …{self.expected}… got …{self.got}…"
        return (
            f"{self.request_id} (prompt {self.prompt}): {', '.join(self.kinds)}; {self.got_length} tokens of "
            f"{self.expected_length}{at if self.first_difference is not None else ''}; {self.end}"
        )


def compare(record: RequestRecord, reference: list[int], prompt: int) -> Mismatch | None:
    got = list(record.token_ids or [])
    kinds = []
    if got != reference:
        tags = {tag for tag, *_ in difflib.SequenceMatcher(a=reference, b=got, autojunk=False).get_opcodes()}
        kinds += [kind for tag, kind in (("delete", "missing"), ("insert", "duplicated"), ("replace", "different"))
                  if tag in tags]  # fmt: skip
    end = f"finish {record.finish_reason or '-'}, usage {record.output_tokens} completion tokens"
    if record.finish_reason != "length" or len(got) != record.request.max_tokens:
        kinds.append("end")
    if not kinds:
        return None
    first = next(
        (i for i, (a, b) in enumerate(zip(reference, got, strict=False)) if a != b), min(len(got), len(reference))
    )
    if got == reference:
        first = None
    window = slice(max(0, (first or 0) - CONTEXT), (first or 0) + CONTEXT + 1)
    return Mismatch(
        record.request.request_id, prompt, kinds, first, reference[window], got[window], len(reference), len(got), end
    )


def stall_summary(gaps: list[float]) -> dict[str, float | int]:
    return {"streams": len(gaps), "p50": percentile(gaps, 50), "p99": percentile(gaps, 99), "max": max(gaps or [0.0])}


@dataclass
class SoakReport:
    settings: dict[str, object]
    sent: int
    completed: int
    retryable: dict[str, int]  # failed requests by status
    not_retryable: dict[str, int]
    lost: int  # sent, never recorded
    mismatches: list[Mismatch]
    failures: list[dict[str, object]]  # the non-retryable failures, with their log lines
    failovers: dict[str, int]  # streams resumed on another worker / another router (from the logs)
    stall_failover: dict[str, float | int]  # seconds: the longest gap of each completed stream that failed over
    stall_all: dict[str, float | int]
    faults: list[
        dict[str, object]
    ]  # each injected fault: at, planned_at (s from the load's start), action, service, pid
    skipped: list[dict[str, object]]  # each fault not injected: planned_at, action, why
    services: list[dict[str, object]]
    not_back: list[str]  # services not running and SERVING when the soak gave up waiting
    settled_s: float
    records: list[RequestRecord]

    @property
    def problems(self) -> list[str]:
        problems = []
        if self.mismatches:
            problems.append(f"{len(self.mismatches)} streams differ from their reference")
        if self.not_retryable:
            problems.append(f"{sum(self.not_retryable.values())} requests failed with a status that is not retryable")
        if self.lost:
            problems.append(f"{self.lost} requests were lost")
        if self.not_back:
            problems.append(f"not back and SERVING: {', '.join(self.not_back)}")
        return problems

    @property
    def passed(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        failed = sum(self.retryable.values()) + sum(self.not_retryable.values())
        kinds = collections.Counter(kind for m in self.mismatches for kind in m.kinds)
        lines = [
            f"requests   sent {self.sent}, completed {self.completed}, failed {failed} (retryable: "
            f"{_counts(self.retryable)}; not retryable: {_counts(self.not_retryable)}), lost {self.lost}",
            f"tokens     {len(self.mismatches)} streams differ from their reference, of {self.completed} completed "
            f"(missing {kinds['missing']}, duplicated {kinds['duplicated']}, different {kinds['different']}, "
            f"wrong end {kinds['end']})",
            f"stall      the longest gap in a stream, ms: crossed a failover {_stall(self.stall_failover)}; "
            f"all {_stall(self.stall_all)}",
            f"failovers  {self.failovers['worker']} streams resumed on another worker, "
            f"{self.failovers['router']} on another router",
            f"faults     {len(self.faults)} injected, {len(self.skipped)} skipped",
            *(f"             {Fault(**fault).describe()}" for fault in self.faults),  # type: ignore[arg-type]
            *(f"             +{p['planned_at']:6.1f} s  skipped {p['action']}: {p['why']}" for p in self.skipped),
            "services   "
            + ("every one back and SERVING" if not self.not_back else f"NOT back: {self.not_back}")
            + f" {self.settled_s:.1f} s after the load",
        ]
        for s in self.services:
            lines.append(f"             {s['name']:<11} restarts {s['restarts']} (SIGKILLed {s['killed']})  "
                         f"last exit: {s['last_exit'] or '-'}")  # fmt: skip
        for mismatch in self.mismatches[:MAX_SHOWN]:
            lines.append(f"MISMATCH   {mismatch.describe()}")
            lines += [f"             {line[:300]}" for line in mismatch.log_lines[:MAX_SHOWN]]
        for failure in self.failures[:MAX_SHOWN]:
            lines.append(f"FAILED     {failure['request_id']}: {failure['status']}: {failure['error']} "
                         f"(after {failure['tokens']} tokens)")  # fmt: skip
            lines += [f"             {line[:300]}" for line in failure["log_lines"][:MAX_SHOWN]]  # type: ignore[index]
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.problems)
        return [*lines, f"result     {verdict}"]

    def to_json(self) -> dict[str, Any]:
        document = {name: value for name, value in asdict(self).items() if name != "records"}
        document |= {"tool": "meshserve soak", "version": 1, "passed": self.passed, "problems": self.problems}
        document["records"] = [record.to_json() for record in self.records]
        return document


def judge(
    settings: dict[str, object],
    records: list[RequestRecord],
    sent: int,
    references: dict[int, list[int]],
    injector: FaultInjector,
    *,
    failed_over: dict[str, list[str]],
    services: list[Service],
    not_back: list[Service],
    settled_s: float,
    log_lines: Callable[[str], list[str]],
) -> SoakReport:
    pool = len(references)
    mismatches = []
    failures: list[dict[str, object]] = []
    retryable_counts: collections.Counter[str] = collections.Counter()
    not_retryable_counts: collections.Counter[str] = collections.Counter()
    for record in records:
        if record.ok:
            prompt = record.request.number % pool
            mismatch = compare(record, references[prompt], prompt)
            if mismatch is not None:
                mismatch.log_lines = log_lines(f'"{record.request.request_id}"')
                mismatches.append(mismatch)
        elif retryable(record):
            retryable_counts[record.status] += 1
        else:
            not_retryable_counts[record.status] += 1
            failures.append({
                "request_id": record.request.request_id, "status": record.status, "error": record.error,
                "tokens": record.output_tokens, "log_lines": log_lines(f'"{record.request.request_id}"'),
            })  # fmt: skip
    completed = [r for r in records if r.ok]
    gaps = {r.request.request_id: r.longest_gap for r in completed if r.longest_gap is not None}
    killed = injector.killed()
    # A router logs a worker it lost; the gateway, a router it lost. Counted once per stream and kind.
    by_source = collections.Counter(
        kind for lines in failed_over.values()
        for kind in {"router" if line.startswith("gateway") else "worker" for line in lines}
    )  # fmt: skip
    return SoakReport(
        settings=settings,
        sent=sent,
        completed=len(completed),
        retryable=dict(retryable_counts.most_common()),
        not_retryable=dict(not_retryable_counts.most_common()),
        lost=sent - len(records),
        mismatches=mismatches,
        failures=failures,
        failovers={"worker": by_source["worker"], "router": by_source["router"]},
        stall_failover=stall_summary([gap for rid, gap in gaps.items() if rid in failed_over]),
        stall_all=stall_summary(list(gaps.values())),
        faults=[asdict(fault) for fault in injector.faults],
        skipped=[{"planned_at": p.at, "action": p.action, "why": why} for p, why in injector.skipped],
        services=[
            {"name": s.name, "restarts": s.restarts, "killed": killed.get(s.name, 0), "last_exit": s.last_exit}
            for s in services
        ],
        not_back=[s.name for s in not_back],
        settled_s=settled_s,
        records=records,
    )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in counts.items()) or "none"


def _stall(summary: dict[str, float | int]) -> str:
    if not summary["streams"]:
        return "no streams"
    p50, p99, most = (float(summary[k]) * 1e3 for k in ("p50", "p99", "max"))
    return f"(n {summary['streams']}) p50 {p50:.0f} p99 {p99:.0f} max {most:.0f}"
