"""The router's objectives without a mesh: parsing, recent latencies, holding lower classes back, shedding, and the
TTFT prediction (router/holdback.py, router/ttft_model.py, common/objectives.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from meshserve.common.objectives import RecentLatencies, parse_ttft_objectives
from meshserve.router.holdback import MAX_HELD_SHARE, SHED_AFTER_S, HoldBack
from meshserve.router.queue import Pending
from meshserve.router.ttft_model import SeatView, TtftModel
from meshserve.v1 import common_pb2
from test_router_queue import BATCH, CRITICAL, HIGH, LOW, NORMAL


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_objectives_parse_classes_and_units_and_refuse_the_rest():
    assert parse_ttft_objectives("critical=150ms, high=0.3s") == {CRITICAL: 0.15, HIGH: 0.3}
    assert parse_ttft_objectives("LOW=2") == {LOW: 2.0}
    assert parse_ttft_objectives("") == {}
    for bad in ("urgent=1s", "high", "high=fast", "high=0ms", "high=-1s"):
        with pytest.raises(ValueError):
            parse_ttft_objectives(bad)


def test_recent_latencies_are_a_window_with_quantiles_and_attainment():
    clock = Clock()
    recent = RecentLatencies(window_seconds=10, samples=100, clock=clock)
    for ms in range(1, 101):
        recent.observe(HIGH, ms / 1000)
    assert recent.quantile(HIGH, 0.5) == 0.05 and recent.quantile(HIGH, 0.99) == 0.099
    assert recent.attainment(HIGH, 0.025) == 0.25
    assert recent.quantile(LOW, 0.5) is None
    clock.now += 11
    assert recent.values(HIGH) == [], "samples older than the window are forgotten"


def holdback(clock: Clock, objectives=None) -> tuple[HoldBack, RecentLatencies]:
    recent = RecentLatencies(10, 64, clock=clock)
    return HoldBack(objectives or {HIGH: 0.2}, recent, clock=clock), recent


def test_nothing_is_held_back_while_the_objective_is_far():
    clock = Clock()
    hold, recent = holdback(clock)
    recent.observe(HIGH, 0.05)
    hold.update(dict, force=True)
    assert [hold.held_seats(c, 16) for c in (CRITICAL, HIGH, NORMAL, LOW, BATCH)] == [0] * 5
    assert hold.shed_error(LOW) is None


def test_lower_classes_are_held_back_more_as_a_class_nears_its_objective():
    clock = Clock()
    hold, recent = holdback(clock)
    recent.observe(HIGH, 0.11)  # 55 % of its 200 ms target: holding back begins
    hold.update(dict, force=True)
    assert hold.held_seats(LOW, 16) == 1 and hold.held_seats(NORMAL, 16) == 1
    assert hold.held_seats(HIGH, 16) == 0 and hold.held_seats(CRITICAL, 16) == 0, "only lower classes"
    recent.observe(HIGH, 0.25)
    hold.update(dict, force=True)
    assert hold.held_seats(LOW, 16) == int(MAX_HELD_SHARE * 16), "at the target, the most"
    assert hold.held_seats(LOW, 1) == 0, "a lower class always keeps a seat"


def test_a_queued_urgent_request_waiting_long_counts_before_its_first_token_does():
    clock = Clock()
    hold, _ = holdback(clock)
    hold.update(lambda: {HIGH: 0.19}, force=True)  # no TTFT seen yet; one HIGH has waited 190 ms
    assert hold.held_seats(LOW, 16) >= 3


def test_batch_and_low_are_shed_only_once_holding_back_is_not_enough():
    clock = Clock()
    hold, recent = holdback(clock)
    recent.observe(HIGH, 0.3)  # missed
    hold.update(dict, force=True)
    assert hold.shed_error(LOW) is None, "first the seats are held back"
    clock.now += SHED_AFTER_S
    hold.update(dict, force=True)
    error = hold.shed_error(LOW)
    assert error is not None and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "objective" in error.message and any("RetryInfo" in type(d).__name__ for d in error.details)
    assert hold.shed_error(BATCH) is not None
    assert hold.shed_error(NORMAL) is None and hold.shed_error(HIGH) is None, "only BATCH and LOW are shed"
    assert hold.shed_by_priority == {LOW: 1, BATCH: 1}
    clock.now += 11  # the misses age out of the window: admission opens again
    hold.update(dict, force=True)
    assert hold.shed_error(LOW) is None


def pending(prompt: int, max_tokens: int, priority: int = NORMAL, relayed: int = 0) -> Pending:
    request = common_pb2.TokenRequest(prompt_token_ids=[1] * prompt, priority=priority)
    request.sampling.max_tokens = max_tokens
    made = Pending.of(request)
    made.relayed = relayed
    return made


def predicting(test):
    """Pending needs a running loop (its future)."""

    def run():
        async def body():
            test()

        asyncio.run(body())

    run.__name__ = test.__name__
    return run


@predicting
def test_a_free_seat_predicts_only_the_prefill_steps():
    model = TtftModel()
    worker = SeatView(limit=4, busy=3, step_seconds=0.01, max_num_batched_tokens=100, ours=[])
    prediction = model.predict(pending(250, 8), [], [worker])
    assert prediction.queue_seconds == 0 and prediction.seats_free == 1
    assert prediction.seconds == pytest.approx(3 * 0.01), "250 prompt tokens at 100 a step"


@predicting
def test_a_full_worker_predicts_the_wait_for_the_first_seat_to_free():
    model = TtftModel()
    running = [pending(4, 100, relayed=60), pending(4, 100, relayed=10)]
    worker = SeatView(limit=2, busy=2, step_seconds=0.01, max_num_batched_tokens=512, ours=running)
    prediction = model.predict(pending(4, 8), [], [worker])
    assert prediction.queue_seconds == pytest.approx(40 * 0.01), "the one 40 tokens from its end"
    ahead = [pending(4, 20), pending(4, 20)]
    # The seat free at 0.4 s takes the first one ahead (1 + 19 steps, to 0.6 s), then the second (to 0.8 s),
    # before the other seat frees at 0.9 s: this request starts at 0.8 s.
    prediction = model.predict(pending(4, 8), ahead, [worker])
    assert prediction.ahead == 2 and prediction.queue_seconds == pytest.approx(0.8)


@predicting
def test_a_class_held_back_waits_for_the_seats_it_may_use():
    model = TtftModel()
    running = [pending(4, 10, relayed=5), pending(4, 100, relayed=50)]
    held = SeatView(limit=1, busy=2, step_seconds=0.01, max_num_batched_tokens=512, ours=running)
    prediction = model.predict(pending(4, 8), [], [held])
    assert prediction.queue_seconds == pytest.approx(0.5), "one must end to bring it under its limit, then another"


@predicting
def test_no_prediction_before_any_worker_has_stepped():
    worker = SeatView(limit=4, busy=4, step_seconds=0.0, max_num_batched_tokens=512, ours=[])
    assert TtftModel().predict(pending(4, 8), [], [worker]) is None
    assert TtftModel().predict(pending(4, 8), [], []) is None


@predicting
def test_the_model_learns_how_much_of_max_tokens_is_used_and_the_hop_time():
    model = TtftModel()
    worker = SeatView(limit=1, busy=1, step_seconds=0.01, max_num_batched_tokens=512, ours=[pending(4, 100)])
    before = model.predict(pending(4, 8), [], [worker])
    for _ in range(50):
        model.finished(pending(4, 100), 25)
    after = model.predict(pending(4, 8), [], [worker])
    assert after.queue_seconds < before.queue_seconds * 0.5
    observed = pending(4, 8)
    observed.prediction = after
    for _ in range(50):
        error = model.observed(observed, after.seconds + 0.05, after.queue_seconds)
    assert model.hop_seconds == pytest.approx(0.05, abs=0.01)
    assert error == pytest.approx(0.05)
