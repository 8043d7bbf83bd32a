"""What the fuzz suites (test_fuzz_api.py, test_fuzz_internal.py) found, each pinned as the behaviour a caller
relies on: a request the gateway or a service cannot take is refused INVALID_ARGUMENT naming its field, never
INTERNAL or UNKNOWN, and a worker's stream ends every sequence it was given."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import pytest

from meshserve.common.errors import MeshError, bad_request_fields
from meshserve.common.metrics import new_registry
from meshserve.v1 import (
    aggregator_pb2,
    aggregator_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    worker_pb2,
)
from meshserve.worker.engine_load import EngineLoad
from meshserve.worker.link import Link
from meshserve.worker.metrics import WorkerMetrics
from meshserve.worker.protocol import ModelLimits
from meshserve.worker.sequence import Finish, SequenceOutput
from support import token_request
from worker_client import generate_on_worker, violated_fields

DEEP = "[" * 5000  # past Python's recursion limit when parsed


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
    assert all(field in error.details() for field in bad_request_fields(error)), error.details()
    return error


def generate(mesh, gateway, request: inference_pb2.GenerateRequest) -> grpc.RpcError:
    stub = inference_pb2_grpc.InferenceStub(mesh.channel(gateway.grpc))
    return refusal(lambda: stub.Generate(request, timeout=30))


def chat(*messages: common_pb2.ChatMessage, **fields) -> inference_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=1)
    return inference_pb2.GenerateRequest(
        messages=inference_pb2.ChatMessages(messages=messages), sampling=sampling, **fields
    )


HELLO = common_pb2.ChatMessage(role="user", content="Hello")


def test_a_json_schema_nested_too_deep_is_refused_by_its_field(mesh, gateway):
    sampling = common_pb2.SamplingParams(max_tokens=1, structured=common_pb2.StructuredOutput(json_schema=DEEP))
    error = generate(mesh, gateway, inference_pb2.GenerateRequest(prompt="Hi", sampling=sampling))
    assert bad_request_fields(error) == ["sampling.structured.json_schema"]
    assert "nested too deeply" in error.details()


@pytest.mark.parametrize("parameters", [DEEP, "{", "5", "[]"])
def test_tool_parameters_that_are_no_json_object_are_refused_by_their_field(mesh, gateway, parameters):
    tools = [common_pb2.Tool(name="f"), common_pb2.Tool(name="g", parameters=parameters)]
    error = generate(mesh, gateway, chat(HELLO, tools=tools))
    assert bad_request_fields(error) == ["tools[1].parameters"]


def test_a_tool_message_without_its_call_id_is_refused_naming_the_messages(mesh, gateway):
    error = generate(mesh, gateway, chat(HELLO, common_pb2.ChatMessage(role="tool", content="42")))
    assert bad_request_fields(error) == ["messages"] and "tool_call_id" in error.details()
    body = {"messages": [{"role": "tool", "content": "42"}], "max_tokens": 1}
    status, _, raw = gateway.post("/v1/chat/completions", body)
    assert status == 400, raw
    assert json.loads(raw)["error"]["param"] == "messages"


def test_a_batch_input_too_long_is_named_in_the_message_as_in_the_details(mesh, gateway):
    inputs = [
        inference_pb2.BatchInput(token_ids=inference_pb2.TokenIds(ids=[5])),
        inference_pb2.BatchInput(token_ids=inference_pb2.TokenIds(ids=[5] * 5000)),
    ]
    request = inference_pb2.GenerateRequest(
        batch=inference_pb2.BatchInputs(inputs=inputs), sampling=common_pb2.SamplingParams(max_tokens=1)
    )
    error = generate(mesh, gateway, request)
    # Only the prompt is wrong: max_tokens = 1 is not reported as out of a range of "1 to 1".
    assert bad_request_fields(error) == ["batch.inputs[1].prompt_token_ids"], error.details()


@pytest.mark.parametrize(
    "service, method",
    [
        ("router", "/meshserve.v1.Router/Stats"),
        ("aggregator", "/meshserve.v1.Aggregator/Generate"),
        ("worker", "/meshserve.v1.Worker/GetLoad"),
    ],
)
def test_an_internal_request_that_does_not_parse_is_refused_naming_it(mesh, service, method):
    channel = mesh.channel(getattr(mesh, service))
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    if method.endswith("Generate"):
        call = channel.unary_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    error = refusal(lambda: list(call(b"\xff\xff", timeout=10)))
    assert bad_request_fields(error) == ["request"] and "not a valid message" in error.details()


def test_a_worker_stream_command_that_does_not_parse_is_refused_naming_it(mesh):
    connect = mesh.channel(mesh.worker).stream_stream(
        "/meshserve.v1.Worker/Connect", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    error = refusal(lambda: list(connect(iter([b"\xff\xff"]), timeout=10)))
    assert bad_request_fields(error) == ["request"]


class FinishingEngine:
    """An engine that ends every sequence at submission, as a resume with every token does: the end is the
    engine's at once, and the stream's at its next event."""

    max_num_seqs = 4

    def new_sequence(self, *args: object, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(finished=True, num_preemptions=0, first_token_step=None)

    def submit(self, sequence: object, resumed: list[int]) -> SequenceOutput:
        return SequenceOutput([], "", Finish.LENGTH, prompt_tokens=1, completion_tokens=1)

    def cancel(self, sequence: object) -> None:
        pass

    def load(self) -> EngineLoad:
        return EngineLoad(
            running_sequences=0, waiting_sequences=0, waiting_by_priority=(0,) * 6, max_num_seqs=4,
            max_num_batched_tokens=512, sequences_finished=0, sequences_cancelled=0, generated_tokens=0,
            free_kv_blocks=8, total_kv_blocks=8, kv_block_size=16, tokens_per_second=0.0, prefix_cache_hit_rate=0.0,
            preemptions=0, draining=False,
        )  # fmt: skip


def test_a_sequence_id_used_again_right_after_its_end_still_ends_every_sequence():
    """Each submit of an id ends once: the second, sent before the first one's end reached the stream, is refused
    as still open (it was lost: the first one's end closed it too)."""

    async def ends() -> list[worker_pb2.SequenceChunk]:
        request = token_request([5], max_tokens=1)
        submit = worker_pb2.LinkCommand(submit=worker_pb2.SubmitSequence(sequence_id=1, request=request))

        async def commands() -> AsyncIterator[worker_pb2.LinkCommand]:
            yield submit
            yield submit  # no pause: the first one's end has not been sent yet

        link = Link(FinishingEngine(), ModelLimits("tiny", 100, 64, 1024), WorkerMetrics(new_registry(), lambda: None))
        events = [event async for event in link.events(commands())]
        return [o for e in events for o in e.outputs if o.chunk.finish_reason or o.chunk.HasField("error")]

    outputs = asyncio.run(ends())
    assert [o.sequence_id for o in outputs] == [1, 1], outputs
    finished, refused = sorted(outputs, key=lambda o: o.chunk.HasField("error"))
    assert finished.chunk.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert refused.chunk.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "sequence_id" in refused.chunk.error.message


def test_resumed_tokens_the_grammar_refuses_are_the_callers_error(mesh):
    request = token_request([5, 6, 7], max_tokens=4)
    request.sampling.structured.json_schema = json.dumps({"type": "object"})
    request.resume_token_ids.extend([0])  # the start token: never valid JSON
    with pytest.raises(MeshError) as caught:
        generate_on_worker(mesh.channel(mesh.worker), request, timeout=30)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert violated_fields(error) == ["resume_token_ids"] and "resume_token_ids" in error.message


def test_a_map_reduce_whose_every_map_call_is_refused_names_the_field(mesh):
    parent = token_request([5], max_tokens=1, priority=-1)
    fan_out = aggregator_pb2.FanOutRequest(request=parent, map_reduce=aggregator_pb2.MapReduceTask(text="Short."))
    fan_out.failure_policy = common_pb2.FAILURE_POLICY_BEST_EFFORT
    stub = aggregator_pb2_grpc.AggregatorStub(mesh.channel(mesh.aggregator))
    error = refusal(lambda: list(stub.Generate(fan_out, timeout=30)))
    assert bad_request_fields(error) == ["priority"], error.details()
