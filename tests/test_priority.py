"""Priority that holds with the mesh full: a router and a real worker on loopback (built-in model).

A HIGH request sent into a worker full of LOW sequences, with more LOW waiting, starts at the engine's next step
and gets its first token before any LOW request that was waiting; a request whose deadline is shorter than its
predicted time to first token is refused at once and never reaches a worker. Urgency is counted in engine steps
(the worker's span attributes), not in seconds.
"""

from __future__ import annotations

import grpc
import pytest

from meshserve.v1 import common_pb2, router_pb2
from support import WAIT_S, token_request, wait_for
from test_router import Recorder, queued, router_with_workers
from test_telemetry import wait_for_spans

LOW, HIGH, NORMAL = common_pb2.PRIORITY_LOW, common_pb2.PRIORITY_HIGH, common_pb2.PRIORITY_NORMAL


def stats(stub) -> router_pb2.RouterStats:
    return stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)


def test_a_high_request_into_a_full_mesh_starts_at_the_next_step_before_every_waiting_low(loop_thread, spans):
    spans.clear()
    with router_with_workers(loop_thread, [4]) as stub:
        recorder = Recorder(stub)
        for i in range(10):
            recorder.send(f"low{i}", token_request([5 + i, 6, 7], 200, LOW))
        wait_for(lambda: len(recorder.first_token) >= 4, "four LOW requests running", WAIT_S)
        wait_for(lambda: queued(stub) == 6, "six LOW requests waiting at the router", WAIT_S)
        waiting = {f"low{i}" for i in range(10)} - set(recorder.first_token)
        recorder.send("high", token_request([9, 9], 4, HIGH))
        recorder.join()
        (worker,) = stats(stub).workers
    assert not recorder.errors, recorder.errors
    later = {name: recorder.first_token[name] for name in waiting}
    assert recorder.first_token["high"] < min(later.values()), (
        f"HIGH's first token came as event {recorder.first_token['high']}, the waiting LOWs' as {later}"
    )
    sequences = wait_for_spans(spans, "worker.sequence", 11, timeout=WAIT_S)
    (high,) = [s for s in sequences if s.attributes["meshserve.priority"] == "high"]
    arrival = high.attributes["meshserve.engine.arrival_step"]
    started = high.attributes["meshserve.engine.prefill_start_step"]
    first = high.attributes["meshserve.engine.first_token_step"]
    assert started == arrival + 1, f"HIGH arrived after step {arrival}, its prefill started at step {started}"
    assert first - started + 1 <= 2, f"its prefill started at step {started}, its first token came at step {first}"
    assert worker.load.preemptions >= 1, "a LOW sequence gave HIGH its seat"


def test_a_deadline_shorter_than_the_predicted_ttft_is_refused_at_once_without_reaching_a_worker(loop_thread):
    with router_with_workers(loop_thread, [1]) as stub:
        recorder = Recorder(stub)
        recorder.send("running", token_request([5, 6], 1200))  # holds the only seat
        wait_for(lambda: "running" in recorder.first_token, "the running request's first token", WAIT_S)

        def predicted_normal_ms() -> int:
            return next(q.predicted_ttft_ms for q in stats(stub).queues if q.priority == NORMAL)

        predicted = wait_for(predicted_normal_ms, "a TTFT prediction from the worker's step times", 10)
        before = stats(stub)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(token_request([7, 8], 4), timeout=predicted / 1000 / 4))
        after = stats(stub)
        # A deadline the prediction meets is admitted: HIGH overflows the full worker at once.
        urgent = list(stub.Generate(token_request([9, 10], 2, HIGH), timeout=WAIT_S))
        recorder.join()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "refused on arrival" in caught.value.details() and "predicted" in caught.value.details()
    assert after.deadline_refused == before.deadline_refused + 1
    assert after.dispatched == before.dispatched, "the refused request never reached a worker"
    assert sum(len(c.token_ids) for c in urgent) == 2 and not recorder.errors
