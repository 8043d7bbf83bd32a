"""A fan-out that fails or ends early: failure policies, a cancelled parent, the parent's deadline; no sub-request
outlives its parent on a worker."""

from __future__ import annotations

import grpc
import pytest

from fan_out import LONG, WAIT_S, FanOutMesh, alone, sampling, stream, too_long_batch
from meshserve.common.errors import bad_request_fields
from meshserve.v1 import common_pb2, inference_pb2
from support import wait_for


@pytest.fixture
def mesh(fan_out_mesh: FanOutMesh) -> FanOutMesh:
    """These tests' mesh: the two-worker fan-out mesh, not the session's one-worker one."""
    return fan_out_mesh


def test_best_effort_reports_the_failed_index_and_finishes_the_others(mesh):
    tokens, last, final = stream(mesh, too_long_batch(common_pb2.FAILURE_POLICY_BEST_EFFORT))
    assert last[1].finish_reason == common_pb2.FINISH_REASON_ERROR
    assert last[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "batch.inputs[1]" in last[1].error.message and "context" in last[1].error.message
    assert tokens.get(1, []) == []
    for index, prompt in ((0, "First"), (2, "Third")):
        assert last[index].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert tokens[index] == list(alone(mesh, sampling(6, temperature=0.0), prompt=prompt).token_ids)
    assert final.usage.completion_tokens == 12
    reply = mesh.inference.Generate(too_long_batch(common_pb2.FAILURE_POLICY_BEST_EFFORT), timeout=WAIT_S)
    assert [c.index for c in reply.completions] == [0, 1, 2]
    assert [len(c.errors) for c in reply.completions] == [0, 1, 0]


def test_fail_fast_cancels_the_siblings_and_returns_the_error(mesh):
    before = mesh.loads()
    request = too_long_batch(common_pb2.FAILURE_POLICY_FAIL_FAST)
    for item in (request.batch.inputs[0], request.batch.inputs[2]):
        item.sampling.max_tokens = LONG
    with pytest.raises(grpc.RpcError) as caught:
        stream(mesh, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch.inputs[1]" in caught.value.details()
    assert any(f.startswith("batch.inputs[1].") for f in bad_request_fields(caught.value))
    # Left running, the siblings would take far longer than this and generate 2 x LONG tokens.
    wait_for(mesh.idle, "the failed input's siblings to stop", timeout=5)
    generated = sum(a.generated_tokens - b.generated_tokens for a, b in zip(mesh.loads(), before, strict=True))
    assert generated < LONG // 4


def test_cancelling_the_parent_frees_every_worker_slot(mesh):
    # Siblings an earlier test cancelled may still be on their way to a worker: count from a quiet mesh.
    wait_for(mesh.quiet, "a quiet mesh", timeout=20)
    before = mesh.loads()
    request = inference_pb2.GenerateRequest(
        request_id="cancel-me", prompt="Garden", sampling=sampling(LONG, temperature=1.0, seed=3), n=6
    )
    call = mesh.inference.GenerateStream(request, timeout=WAIT_S)
    next(call)
    wait_for(
        lambda: (p := mesh.parent("cancel-me")) is not None and p.in_flight == 6,
        "all six children of cancel-me in flight",
        timeout=WAIT_S,
    )
    assert len(mesh.parent("cancel-me").workers) == 2, "six children should spread over both workers"
    call.cancel()
    wait_for(mesh.idle, "every worker slot to be freed after the parent was cancelled", timeout=5)
    after = mesh.loads()
    cancelled = sum(a.sequences_cancelled - b.sequences_cancelled for a, b in zip(after, before, strict=True))
    finished = sum(a.sequences_finished - b.sequences_finished for a, b in zip(after, before, strict=True))
    assert (cancelled, finished) == (6, 0), (before, after)
    wait_for(lambda: mesh.parent("cancel-me").in_flight == 0, "no child of cancel-me in flight", timeout=WAIT_S)


def test_the_parent_deadline_bounds_every_sub_request(mesh):
    request = inference_pb2.GenerateRequest(prompt="Valley", sampling=sampling(LONG, temperature=1.0), n=4)
    with pytest.raises(grpc.RpcError) as caught:
        stream(mesh, request, timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(mesh.idle, "the sub-requests to end with the parent's deadline", timeout=10)
