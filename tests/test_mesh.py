"""The mesh end to end: gateway -> (aggregator ->) router -> worker, all real gRPC servers on loopback."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoModelForCausalLM

from meshserve.common.errors import MeshError, bad_request_fields
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from support import wait_for, worker_load
from worker_client import generate_on_worker, violated_fields

PROMPTS = ["Hello world", "Once upon a time, in a city by the sea", "The router picks a worker"]


def inference(mesh) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(mesh.channel(mesh.gateway))


def stream_tokens(stub, request) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for chunk in stub.GenerateStream(request, timeout=60):
        if not chunk.final:
            tokens.setdefault(chunk.index, []).extend(chunk.token_ids)
    return tokens


@pytest.fixture(scope="module")
def hf_model(model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_stream_equals_transformers_generate(mesh, model_dir, hf_model, prompt):
    tokenizer = ModelTokenizer.from_dir(model_dir)
    prompt_ids = tokenizer.encode(prompt)
    with torch.inference_mode():
        expected = hf_model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=24,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids)),
        )[0, len(prompt_ids) :].tolist()
    request = inference_pb2.GenerateRequest(
        prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=24, temperature=0)
    )
    assert stream_tokens(inference(mesh), request) == {0: expected}


def test_stream_text_is_the_decoded_tokens_and_usage_adds_up(mesh, model_dir):
    tokenizer = ModelTokenizer.from_dir(model_dir)
    request = inference_pb2.GenerateRequest(
        prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    chunks = list(inference(mesh).GenerateStream(request, timeout=60))
    final = chunks[-1]
    assert final.final and not final.token_ids
    ids = [t for c in chunks[:-1] for t in c.token_ids]
    assert "".join(c.text for c in chunks[:-1]) == tokenizer.decode(ids)
    assert chunks[-2].finish_reason == common_pb2.FINISH_REASON_LENGTH
    prompt_tokens = len(tokenizer.encode("Hello"))
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (prompt_tokens, 12)
    assert final.usage.total_tokens == prompt_tokens + 12
    assert len({c.request_id for c in chunks}) == 1


def test_n3_with_seed_equals_each_seeded_request_alone(mesh):
    stub = inference(mesh)
    sampling = common_pb2.SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    fanned_out = stream_tokens(stub, inference_pb2.GenerateRequest(prompt="Hello", sampling=sampling, n=3))
    assert sorted(fanned_out) == [0, 1, 2]
    for index in range(3):
        alone_sampling = common_pb2.SamplingParams()
        alone_sampling.CopyFrom(sampling)
        alone_sampling.seed = 1234 + index
        alone = stream_tokens(stub, inference_pb2.GenerateRequest(prompt="Hello", sampling=alone_sampling))
        assert fanned_out[index] == alone[0], f"completion {index} differs from seed {1234 + index} run alone"
    assert len({tuple(v) for v in fanned_out.values()}) == 3, "three seeds gave identical samples"


def test_unary_generate_returns_every_completion(mesh, model_dir):
    request = inference_pb2.GenerateRequest(
        prompt="Hello", n=2, sampling=common_pb2.SamplingParams(max_tokens=5, seed=7, ignore_eos=True)
    )
    reply = inference(mesh).Generate(request, timeout=60)
    assert [c.index for c in reply.completions] == [0, 1]
    tokenizer = ModelTokenizer.from_dir(model_dir)
    for completion in reply.completions:
        assert len(completion.token_ids) == 5
        assert completion.text == tokenizer.decode(completion.token_ids)
        assert completion.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert reply.usage.completion_tokens == 10
    assert reply.model == "meshserve-tiny"


def test_chat_messages_use_the_chat_template(mesh, model_dir):
    tokenizer = ModelTokenizer.from_dir(model_dir)
    messages = [common_pb2.ChatMessage(role="user", content="Hi there")]
    request = inference_pb2.GenerateRequest(
        messages=inference_pb2.ChatMessages(messages=messages),
        sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
    )
    by_messages = stream_tokens(inference(mesh), request)
    rendered_ids = tokenizer.encode_chat([{"role": "user", "content": "Hi there"}])
    assert tokenizer.decode(rendered_ids, skip_special_tokens=False).startswith("<s><|user|>\nHi there<|end|>")
    by_ids = stream_tokens(
        inference(mesh),
        inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=rendered_ids), sampling=request.sampling),
    )
    assert by_messages == by_ids


def test_stop_string_ends_the_completion_before_it(mesh, model_dir):
    stub = inference(mesh)
    sampling = common_pb2.SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    full = stub.Generate(inference_pb2.GenerateRequest(prompt="Hello", sampling=sampling), timeout=60).completions[0]
    stop = full.text[8:11]
    assert len(stop) == 3
    sampling.stop.append(stop)
    cut = stub.Generate(inference_pb2.GenerateRequest(prompt="Hello", sampling=sampling), timeout=60).completions[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == common_pb2.FINISH_REASON_STOP


def test_every_service_reports_serving(mesh):
    for address in (mesh.gateway, mesh.router, mesh.aggregator, mesh.worker):
        stub = health_pb2_grpc.HealthStub(mesh.channel(address))
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, address


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("gateway", "meshserve.v1.Inference"),
        ("router", "meshserve.v1.Router"),
        ("aggregator", "meshserve.v1.Aggregator"),
        ("worker", "meshserve.v1.Worker"),
    ],
)
def test_reflection_lists_the_services(mesh, service, expected):
    stub = reflection_pb2_grpc.ServerReflectionStub(mesh.channel(getattr(mesh, service)))
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {expected, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    health_stub = health_pb2_grpc.HealthStub(mesh.channel(getattr(mesh, service)))
    reply = health_stub.Check(health_pb2.HealthCheckRequest(service=expected), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({}, "input"),
        ({"prompt": "hi", "sampling": {"max_tokens": 0}}, "sampling.max_tokens"),
        ({"prompt": "hi", "sampling": {"max_tokens": 10_000_000}}, "sampling.max_tokens"),
        ({"prompt": "hi", "sampling": {"temperature": -0.5}}, "sampling.temperature"),
        ({"prompt": "hi", "sampling": {"top_p": 1.5}}, "sampling.top_p"),
        ({"prompt": "hi", "sampling": {"top_p": 0.0}}, "sampling.top_p"),
        ({"prompt": "hi", "n": 1000}, "n"),
        ({"token_ids": {"ids": [10**6]}}, "token_ids"),
        ({"messages": {"messages": []}}, "messages"),
        ({"messages": {"messages": [{"role": "", "content": "x"}]}}, "messages[0].role"),
        ({"prompt": "hi", "request_id": "has spaces in it"}, "request_id"),
        ({"prompt": "hi", "priority": 42}, "priority"),
        ({"prompt": "hi", "sampling": {"stop": [""]}}, "sampling.stop[0]"),
    ],
)
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_bad_input_is_invalid_argument_naming_the_field(mesh, request_fields, field, method):
    request = inference_pb2.GenerateRequest(**request_fields)
    call = getattr(inference(mesh), method)
    with pytest.raises(grpc.RpcError) as caught:
        reply = call(request, timeout=10)
        if method == "GenerateStream":
            list(reply)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in bad_request_fields(error), f"expected a violation of {field!r}, got {error.details()!r}"
    assert error.details().startswith(field) or f"; {field}" in error.details()


def test_client_cancel_mid_stream_stops_generation_on_the_worker(mesh):
    before = worker_load(mesh)
    request = inference_pb2.GenerateRequest(
        prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
    )
    stream = inference(mesh).GenerateStream(request, timeout=120)
    received = [next(stream) for _ in range(3)]
    assert all(chunk.token_ids for chunk in received)
    stream.cancel()
    wait_for(
        lambda: worker_load(mesh).sequences_cancelled == before.sequences_cancelled + 1,
        "the worker to drop the cancelled sequence",
    )
    after = worker_load(mesh)
    assert after.running_sequences == 0
    assert after.generated_tokens - before.generated_tokens < 1500


def test_deadline_reaches_the_worker(mesh):
    before = worker_load(mesh)
    request = inference_pb2.GenerateRequest(
        prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(inference(mesh).GenerateStream(request, timeout=0.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(
        lambda: worker_load(mesh).sequences_cancelled == before.sequences_cancelled + 1,
        "the worker to drop the sequence whose deadline passed",
    )
    assert worker_load(mesh).running_sequences == 0


def test_a_unary_answer_cut_by_its_deadline_is_deadline_exceeded_never_a_partial_ok(mesh):
    """The worker ends a sequence whose deadline passed as CANCELLED a moment before the caller's own clock
    does; the gateway must not turn that race into an OK carrying half an answer."""
    request = inference_pb2.GenerateRequest(
        prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
    )
    for timeout in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8):
        with pytest.raises(grpc.RpcError) as caught:
            inference(mesh).Generate(request, timeout=timeout)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (timeout, caught.value)


def test_list_models_names_the_builtin_model(mesh):
    reply = inference(mesh).ListModels(common_pb2.ListModelsRequest(names_only=True), timeout=5)
    assert [m.name for m in reply.models] == ["meshserve-tiny"]
    assert reply.models[0].max_context_length == 2048
    assert not reply.models[0].tokenizer_files


def test_router_skips_an_unreachable_worker(mesh, loop_thread):
    from meshserve.common.config import RouterConfig
    from meshserve.router.server import start_router
    from meshserve.v1 import router_pb2_grpc

    dead = "127.0.0.1:1"  # nothing listens on port 1
    router = loop_thread.run(start_router(RouterConfig(host="127.0.0.1", port=0, workers=f"{dead},{mesh.worker}")))
    try:
        stub = router_pb2_grpc.RouterStub(mesh.channel(router.address))
        for _ in range(2):
            request = common_pb2.TokenRequest(
                request_id="failover",
                prompt_token_ids=[0, 5, 6],
                sampling=common_pb2.SamplingParams(max_tokens=3),
            )
            chunks = list(stub.Generate(request, timeout=30))
            assert sum(len(c.token_ids) for c in chunks) == 3
    finally:
        loop_thread.run(router.stop(0))


def test_worker_checks_requests_that_bypass_the_gateway(mesh):
    request = common_pb2.TokenRequest(prompt_token_ids=[], sampling=common_pb2.SamplingParams(top_p=2.0))
    with pytest.raises(MeshError) as caught:
        generate_on_worker(mesh.channel(mesh.worker), request, timeout=10)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violated_fields(caught.value)) == {"prompt_token_ids", "sampling.top_p"}
