"""What a fan-out carries and what bounds it: the parent's priority and tenant on every sub-request, the fan-out
limit, the per-tenant in-flight budget, and bad fan-out fields named in INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from fan_out import MAX_FANOUT, TENANT_MAX_IN_FLIGHT, WAIT_S, FanOutMesh, long_text, sampling
from meshserve.common.errors import bad_request_fields, from_rpc_error
from meshserve.v1 import aggregator_pb2, common_pb2, inference_pb2
from support import wait_for


@pytest.fixture
def mesh(fan_out_mesh: FanOutMesh) -> FanOutMesh:
    """These tests' mesh: the two-worker fan-out mesh, not the session's one-worker one."""
    return fan_out_mesh


def test_priority_and_tenant_of_the_parent_reach_every_sub_request(mesh, tokenizer):
    parent = common_pb2.TokenRequest(
        request_id="low-tenant-t1",
        model="meshserve-tiny",
        prompt_token_ids=tokenizer.encode("Morning"),
        sampling=sampling(3, temperature=1.0),
        priority=common_pb2.PRIORITY_LOW,
        tenant="t1",
    )
    messages = list(mesh.aggregator.Generate(aggregator_pb2.FanOutRequest(request=parent, n=3), timeout=WAIT_S))
    assert messages[-1].final
    children = mesh.parent("low-tenant-t1")
    assert (children.priority, children.tenant, children.dispatched) == (common_pb2.PRIORITY_LOW, "t1", 3)
    request = inference_pb2.GenerateRequest(
        request_id="high-parent", prompt="Urgent", sampling=sampling(2), n=2, priority=common_pb2.PRIORITY_HIGH
    )
    mesh.inference.Generate(request, timeout=WAIT_S)
    assert mesh.parent("high-parent").priority == common_pb2.PRIORITY_HIGH


def test_fan_out_over_the_limit_is_invalid_argument_naming_the_field(mesh, tokenizer):
    cases = [
        (inference_pb2.GenerateRequest(prompt="x", n=1, best_of=MAX_FANOUT + 1), "best_of"),
        (inference_pb2.GenerateRequest(prompt="x", n=MAX_FANOUT + 1), "n"),
        (
            inference_pb2.GenerateRequest(
                best_of=2,
                batch=inference_pb2.BatchInputs(inputs=[inference_pb2.BatchInput(prompt="x")] * (MAX_FANOUT // 2 + 1)),
            ),
            "batch.inputs",
        ),
        (
            inference_pb2.GenerateRequest(
                map_reduce=inference_pb2.MapReduce(text=long_text(tokenizer, 4000), chunk_tokens=64)
            ),
            "map_reduce.text",
        ),
    ]
    for request, field in cases:
        request.sampling.max_tokens = 2
        with pytest.raises(grpc.RpcError) as caught:
            mesh.inference.Generate(request, timeout=WAIT_S)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert bad_request_fields(caught.value) == [field], caught.value.details()
        assert str(MAX_FANOUT) in caught.value.details()


def test_a_tenant_over_its_concurrent_fan_out_is_resource_exhausted(mesh, tokenizer):
    def fan_out(tenant: str, n: int, max_tokens: int) -> aggregator_pb2.FanOutRequest:
        parent = common_pb2.TokenRequest(
            request_id=f"{tenant}-{n}",
            model="meshserve-tiny",
            prompt_token_ids=tokenizer.encode("Harbor"),
            sampling=sampling(max_tokens, temperature=1.0),
            tenant=tenant,
        )
        return aggregator_pb2.FanOutRequest(request=parent, n=n)

    # 24 sub-requests of tenant a hold its budget (16 run, 8 wait for a seat) for a few seconds.
    holding = mesh.aggregator.Generate(fan_out("a", 24, 100), timeout=WAIT_S)
    try:
        next(holding)
        with pytest.raises(grpc.RpcError) as caught:
            list(mesh.aggregator.Generate(fan_out("a", 17, 2), timeout=WAIT_S))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'a'" in caught.value.details() and str(TENANT_MAX_IN_FLIGHT) in caught.value.details()
        retry = [d for d in from_rpc_error(caught.value).details if d.DESCRIPTOR.name == "RetryInfo"]
        assert retry and retry[0].retry_delay.ToMilliseconds() > 0
        # Another tenant is not held back by a's fan-outs (its sub-requests wait only for seats).
        other = list(mesh.aggregator.Generate(fan_out("b", 4, 2), timeout=WAIT_S))
        assert other[-1].final and other[-1].usage.completion_tokens == 8
    finally:
        holding.cancel()
    wait_for(mesh.idle, "idle workers once the holding fan-out is cancelled", timeout=WAIT_S)
    # Once a's first request is gone, its budget is free again.
    assert list(mesh.aggregator.Generate(fan_out("a", 17, 2), timeout=WAIT_S))[-1].final


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"prompt": "hi", "n": 3, "best_of": 2}, "best_of"),
        ({"prompt": "hi", "failure_policy": 9}, "failure_policy"),
        ({"batch": {"inputs": []}}, "batch.inputs"),
        ({"batch": {"inputs": [{"prompt": "ok"}, {"prompt": ""}]}}, "batch.inputs[1].prompt"),
        (
            {"batch": {"inputs": [{"prompt": "ok", "sampling": {"temperature": -1}}]}},
            "batch.inputs[0].sampling.temperature",
        ),
        ({"batch": {"inputs": [{"token_ids": {"ids": [10**6]}}]}}, "batch.inputs[0].token_ids"),
        ({"map_reduce": {"text": "  "}}, "map_reduce.text"),
        ({"map_reduce": {"text": "Some text.", "map_template": "no placeholder"}}, "map_reduce.map_template"),
        ({"map_reduce": {"text": "Some text.", "reduce_template": "none"}}, "map_reduce.reduce_template"),
        ({"map_reduce": {"text": "Some text.", "chunk_tokens": 5000}}, "map_reduce.chunk_tokens"),
        ({"map_reduce": {"text": "Some text.", "map_sampling": {"top_p": 2.0}}}, "map_reduce.map_sampling.top_p"),
    ],
)
def test_bad_fan_out_fields_are_invalid_argument_naming_the_field(mesh, request_fields, field):
    with pytest.raises(grpc.RpcError) as caught:
        mesh.inference.Generate(inference_pb2.GenerateRequest(**request_fields), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert field in bad_request_fields(caught.value), caught.value.details()
