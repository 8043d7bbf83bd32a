"""The router's queue alone, on a fake clock: the order, admission and stats README's "The router" promises.

Order: one queue per class, a waiting request raised one class per aging period (class c competes as CRITICAL
after (c - 1) aging periods); inside a class, tenants get fair shares of the tokens served; inside a tenant,
shorter jobs (prompt + max_tokens) first, their cost shrinking as they wait. Admission: at most max_queued wait;
when full, an arrival evicts the newest BATCH, then LOW request of a lower class; BATCH and LOW arrivals are
refused; both with RESOURCE_EXHAUSTED and a RetryInfo; CRITICAL, HIGH and NORMAL are never evicted.
No workers and no sleeps: time moves only when a test moves the clock.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from meshserve.common.errors import MeshError
from meshserve.router.queue import Pending, RequestQueue
from meshserve.v1 import common_pb2

AGING_S = 10.0
CRITICAL, HIGH, NORMAL, LOW, BATCH = (
    common_pb2.PRIORITY_CRITICAL,
    common_pb2.PRIORITY_HIGH,
    common_pb2.PRIORITY_NORMAL,
    common_pb2.PRIORITY_LOW,
    common_pb2.PRIORITY_BATCH,
)
LONG_JOB, SHORT_JOB = 1000, 2  # tokens: prompt + max_tokens


class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def in_a_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """A waiting request holds an asyncio future (resolved with its worker, or with why it was shed): each test
    runs as a coroutine in a fresh event loop, with nothing else in it."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def waiting(clock: FakeClock, name: str, priority: int = NORMAL, tenant: str = "", cost: int = 10) -> Pending:
    """A request named `name` that starts waiting now, costing `cost` tokens (one prompt token, the rest output)."""
    request = common_pb2.TokenRequest(
        request_id=name,
        prompt_token_ids=[5],
        sampling=common_pb2.SamplingParams(max_tokens=cost - 1),
        priority=priority,
        tenant=tenant,
    )
    return Pending.of(request, enqueued_at=clock())


def queue_with(clock: FakeClock, *pending: Pending, max_queued: int = 64) -> RequestQueue:
    queue = RequestQueue(max_queued, AGING_S, clock=clock)
    for p in pending:
        queue.push(p)
    return queue


def dispatch_all(queue: RequestQueue) -> list[Pending]:
    """Takes every request best first, as the dispatcher does when workers have room."""
    order = []
    for _ in range(len(queue)):
        best = queue.best(set())
        assert best is not None
        queue.dispatched(best)
        order.append(best)
    return order


def names(pending: list[Pending]) -> list[str]:
    return [p.request.request_id for p in pending]


def goes_first(waiting_class: int, waited: float, fresh_class: int) -> str:
    """Which goes first: a long request of `waiting_class` that has waited `waited` seconds, or a short one of
    `fresh_class` that has just arrived ("waited" or "fresh")? Where both compete in one class the short one
    wins, so "waited" means it competes in a strictly more urgent class."""
    clock = FakeClock()
    queue = queue_with(clock, waiting(clock, "waited", waiting_class, cost=LONG_JOB))
    clock.advance(waited)
    queue.push(waiting(clock, "fresh", fresh_class, cost=SHORT_JOB))
    return queue.best(set()).request.request_id


def assert_shed(error: BaseException | None, what: str) -> None:
    assert isinstance(error, MeshError), f"{what}: expected a MeshError, got {error!r}"
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what}: {error.code}"
    retry = [d for d in error.details if isinstance(d, error_details_pb2.RetryInfo)]
    assert retry and retry[0].retry_delay.ToMilliseconds() > 0, f"{what}: no RetryInfo in {error.details}"


# ---- order: classes and aging ----------------------------------------------------------------------------------


@in_a_loop
async def test_classes_go_most_urgent_first():
    clock = FakeClock()
    queue = queue_with(clock, *(waiting(clock, f"class-{c}", c) for c in (BATCH, LOW, NORMAL, HIGH, CRITICAL)))
    assert names(dispatch_all(queue)) == [f"class-{c}" for c in (CRITICAL, HIGH, NORMAL, LOW, BATCH)]


@pytest.mark.parametrize("periods", [1, 2, 3])
@in_a_loop
async def test_a_low_request_competes_one_class_higher_per_aging_period(periods):
    competes_as = LOW - periods
    assert goes_first(LOW, periods * AGING_S - 0.5, competes_as + 1) == "fresh", "raised before its period ended"
    assert goes_first(LOW, periods * AGING_S, competes_as + 1) == "waited", f"not raised after {periods} periods"
    if competes_as > CRITICAL:
        assert goes_first(LOW, periods * AGING_S, competes_as - 1) == "fresh", "raised more than one class a period"


@pytest.mark.parametrize("priority", [HIGH, NORMAL, LOW, BATCH])
@in_a_loop
async def test_a_request_of_class_c_competes_as_critical_after_c_minus_1_aging_periods(priority):
    critical_after = (priority - CRITICAL) * AGING_S
    assert goes_first(priority, critical_after - 0.5, HIGH) == "fresh", "CRITICAL too early"
    assert goes_first(priority, critical_after, HIGH) == "waited", "not CRITICAL after (c - 1) aging periods"
    # CRITICAL is as far as waiting goes: a fresh CRITICAL request still competes in the same class.
    assert goes_first(priority, critical_after + 10 * AGING_S, CRITICAL) == "fresh"


# ---- order: tenants' fair shares inside a class ----------------------------------------------------------------


@in_a_loop
async def test_a_flooding_tenant_does_not_starve_another_in_its_class():
    clock = FakeClock()
    flood = [waiting(clock, f"a{i}", tenant="a") for i in range(8)]
    queue = queue_with(clock, *flood, waiting(clock, "b0", tenant="b"), waiting(clock, "b1", tenant="b"))
    assert names(dispatch_all(queue))[:4] == ["a0", "b0", "a1", "b1"]


@in_a_loop
async def test_tenants_share_the_tokens_served_not_the_requests():
    clock = FakeClock()
    big = [waiting(clock, f"big{i}", tenant="big", cost=400) for i in range(10)]
    small = [waiting(clock, f"small{i}", tenant="small", cost=100) for i in range(40)]
    order = dispatch_all(queue_with(clock, *big, *small))
    served = {"big": 0, "small": 0}
    for pending in order[:40]:  # both tenants still have work all along
        served[pending.tenant] += pending.cost
        assert abs(served["big"] - served["small"]) <= 400, f"unfair after {names(order[:40])}: {served}"


@in_a_loop
async def test_a_tenant_coming_back_shares_from_then_on_and_claims_no_past_turns():
    clock = FakeClock()
    queue = queue_with(clock, *(waiting(clock, f"early{i}", tenant="a") for i in range(10)))
    for pending in dispatch_all(queue):  # tenant a is served alone for a while
        assert pending.tenant == "a"
    for i in range(3):
        queue.push(waiting(clock, f"a{i}", tenant="a"))
    for i in range(3):
        queue.push(waiting(clock, f"b{i}", tenant="b"))
    assert [p.tenant for p in dispatch_all(queue)][:4] == ["a", "b", "a", "b"]


@in_a_loop
async def test_fair_shares_are_counted_per_class():
    clock = FakeClock()
    queue = queue_with(clock, *(waiting(clock, f"high{i}", HIGH, tenant="a", cost=500) for i in range(5)))
    dispatch_all(queue)  # tenant a was served a lot, but in HIGH
    for name, tenant in (("a0", "a"), ("a1", "a"), ("b0", "b"), ("b1", "b")):
        queue.push(waiting(clock, name, NORMAL, tenant=tenant))
    assert names(dispatch_all(queue)) == ["a0", "b0", "a1", "b1"]


# ---- order: shortest job first inside a tenant -----------------------------------------------------------------


@in_a_loop
async def test_a_tenant_s_shorter_jobs_go_first_prompt_and_max_tokens_counted():
    clock = FakeClock()

    def job(name: str, prompt_tokens: int, max_tokens: int) -> Pending:
        request = common_pb2.TokenRequest(
            request_id=name,
            prompt_token_ids=[5] * prompt_tokens,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
            tenant="t",
        )
        return Pending.of(request, enqueued_at=clock())

    queue = queue_with(clock, job("long-output", 10, 500), job("long-prompt", 400, 10), job("short", 10, 10))
    assert names(dispatch_all(queue)) == ["short", "long-prompt", "long-output"]


@pytest.mark.parametrize(("long_waited", "first"), [(0.1 * AGING_S, "short"), (0.9 * AGING_S, "long")])
@in_a_loop
async def test_a_long_job_s_cost_shrinks_as_it_waits(long_waited, first):
    # cost / (1 + wait / aging): 300 tokens count as 273 after a tenth of a period, as 158 after nine tenths.
    clock = FakeClock()
    queue = queue_with(clock, waiting(clock, "long", cost=300))
    clock.advance(long_waited)
    queue.push(waiting(clock, "short", cost=200))
    assert names(dispatch_all(queue))[0] == first


# ---- admission: shedding a full queue --------------------------------------------------------------------------


@in_a_loop
async def test_a_full_queue_evicts_the_newest_batch_then_low_request_for_a_higher_class():
    clock = FakeClock()
    batch1, low1, batch2 = waiting(clock, "batch1", BATCH), waiting(clock, "low1", LOW), waiting(clock, "batch2", BATCH)
    queue = queue_with(clock, batch1, low1, batch2, max_queued=3)
    evicted = []
    for arrival in (
        waiting(clock, "high", HIGH),
        waiting(clock, "normal", NORMAL),
        waiting(clock, "critical", CRITICAL),
    ):
        queue.push(arrival)
        assert len(queue) == 3
        evicted += [p for p in (batch1, low1, batch2) if p.assigned.done() and p not in evicted]
    assert names(evicted) == ["batch2", "batch1", "low1"]
    for victim in evicted:
        assert_shed(victim.assigned.exception(), f"evicted {victim.request.request_id}")
    assert names(dispatch_all(queue)) == ["critical", "high", "normal"]
    assert (queue.shed_by_priority[BATCH], queue.shed_by_priority[LOW], queue.shed) == (2, 1, 3)


@in_a_loop
async def test_batch_and_low_arrivals_at_a_full_queue_are_refused_with_retry_info():
    clock = FakeClock()
    queued = [waiting(clock, "low", LOW), waiting(clock, "normal1"), waiting(clock, "normal2")]
    queue = queue_with(clock, *queued, max_queued=3)
    for priority in (BATCH, LOW):
        with pytest.raises(MeshError) as refused:
            queue.push(waiting(clock, f"arrival-{priority}", priority))
        assert_shed(refused.value, f"a refused class {priority} arrival")
    assert len(queue) == 3 and not any(p.assigned.done() for p in queued), "a queued request was evicted"
    assert queue.shed == 2


@in_a_loop
async def test_a_low_arrival_at_a_full_queue_evicts_a_queued_batch_request():
    # "an arrival evicts the newest BATCH, then LOW request of a lower class": BATCH is lower than LOW.
    clock = FakeClock()
    batch = waiting(clock, "batch", BATCH)
    queue = queue_with(clock, waiting(clock, "normal"), batch, waiting(clock, "low1", LOW), max_queued=3)
    queue.push(waiting(clock, "low2", LOW))
    assert_shed(batch.assigned.exception(), "the evicted BATCH request")
    assert sorted(names(dispatch_all(queue))) == ["low1", "low2", "normal"]


@pytest.mark.parametrize("arrival", [CRITICAL, HIGH, NORMAL, LOW, BATCH])
@in_a_loop
async def test_critical_high_and_normal_requests_are_never_evicted(arrival):
    clock = FakeClock()
    queued = [waiting(clock, "critical", CRITICAL), waiting(clock, "high", HIGH), waiting(clock, "normal", NORMAL)]
    queue = queue_with(clock, *queued, max_queued=3)
    with pytest.raises(MeshError) as refused:  # at most max_queued wait, and none of these may make room
        queue.push(waiting(clock, "arrival", arrival))
    assert_shed(refused.value, f"a class {arrival} arrival at a queue of unevictable requests")
    assert not any(p.assigned.done() for p in queued), "a CRITICAL, HIGH or NORMAL request was evicted"
    assert names(dispatch_all(queue)) == ["critical", "high", "normal"]


# ---- stats -----------------------------------------------------------------------------------------------------


@in_a_loop
async def test_stats_give_the_depth_and_oldest_wait_of_every_class():
    clock = FakeClock()
    queue = RequestQueue(64, AGING_S, clock=clock)
    assert queue.stats() == {c: (0, 0.0) for c in (CRITICAL, HIGH, NORMAL, LOW, BATCH)}
    oldest_normal = waiting(clock, "normal1")
    queue.push(oldest_normal)
    clock.advance(2)
    queue.push(waiting(clock, "low", LOW))
    clock.advance(3)
    queue.push(waiting(clock, "normal2"))
    clock.advance(4)
    expected = {CRITICAL: (0, 0.0), HIGH: (0, 0.0), NORMAL: (2, 9.0), LOW: (1, 7.0), BATCH: (0, 0.0)}
    assert queue.stats() == expected
    queue.dispatched(oldest_normal)
    assert queue.stats()[NORMAL] == (1, 4.0)
