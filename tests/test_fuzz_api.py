"""Hypothesis throws malformed and extreme requests at both APIs: random fields and types, huge numbers,
bad UTF-8, random bytes. Never a server error, never a dead gateway, always a message naming the problem."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from http_gateway import running_gateway
from meshserve.common.errors import bad_request_fields
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

# Bounded: a few dozen examples each keeps the file well under a minute; no example database on disk.
FUZZ = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
# What a caller may see; UNKNOWN/INTERNAL (a server fault) and anything else are bugs.
CLIENT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a valid request that runs longer than the test's deadline
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
HTTP_OK_STATUSES = {200, 400, 404, 413, 429, 504}

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


def mostly(valid: st.SearchStrategy, odd: st.SearchStrategy, one_in: int = 4) -> st.SearchStrategy:
    """Odd one time in `one_in`, so many examples get past the first check and deeper into the mesh."""
    return st.integers(min_value=1, max_value=one_in).flatmap(lambda k: odd if k == one_in else valid)


def field(valid: st.SearchStrategy, extreme: st.SearchStrategy) -> st.SearchStrategy:
    """An optional field: with many of them in one body, each is odd only one time in eight."""
    return mostly(valid, extreme | json_values, one_in=8)


huge_ints = st.integers(min_value=-(2**70), max_value=2**70)
any_floats = st.floats(allow_nan=False, allow_infinity=False)
text = st.text(max_size=40) | st.sampled_from(["", "Hello", "\x00", "a\u0301", "😀" * 5, "x" * 3000])
message = st.fixed_dictionaries(
    {
        "role": mostly(st.sampled_from(["user", "system", "assistant"]), st.sampled_from(["robot", ""]) | json_values),
        "content": mostly(text, json_values | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}))),
    },
)
common_fields = {
    "model": field(st.sampled_from(["meshserve-tiny", ""]), st.sampled_from(["nope", "x" * 300])),
    "stream": field(st.booleans(), st.none()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()}), st.just({"x": 1})),
    "n": field(st.integers(min_value=1, max_value=3), huge_ints),
    "stop": field(st.lists(st.text(min_size=1, max_size=4), max_size=2), text | st.lists(text, max_size=20)),
    "seed": field(st.integers(min_value=0, max_value=2**64 - 1), huge_ints),
    "temperature": field(st.floats(min_value=0, max_value=2), any_floats),
    "top_p": field(st.floats(min_value=0.01, max_value=1), any_floats),
    "top_k": field(st.integers(min_value=-1, max_value=50), huge_ints),
    "presence_penalty": field(st.floats(min_value=-2, max_value=2), any_floats),
    "frequency_penalty": field(st.floats(min_value=-2, max_value=2), any_floats),
    "repetition_penalty": field(st.floats(min_value=0.5, max_value=2), any_floats),
    "min_p": field(st.floats(min_value=0, max_value=1), any_floats),
    "priority": field(st.sampled_from(["critical", "high", "normal", "low", "batch"]), st.just("urgent")),
    "stop_token_ids": field(st.lists(st.integers(min_value=0, max_value=100), max_size=2), st.lists(huge_ints)),
    "ignore_eos": field(st.booleans(), st.none()),
    "min_tokens": field(st.integers(min_value=0, max_value=8), huge_ints),
    "skip_special_tokens": field(st.booleans(), st.none()),
    "spaces_between_special_tokens": field(st.booleans(), st.none()),
    "include_stop_str_in_output": field(st.booleans(), st.none()),
    "logit_bias": field(st.just({}), json_values),
    "user": field(st.text(max_size=10), json_values),
}
small_tokens = field(st.integers(min_value=1, max_value=6), huge_ints)
chat_bodies = st.fixed_dictionaries(
    {"messages": mostly(st.lists(message, min_size=1, max_size=3), json_values), "max_tokens": small_tokens},
    optional={
        **common_fields,
        "max_completion_tokens": small_tokens,
        "logprobs": field(st.booleans(), st.none()),
        "top_logprobs": field(st.integers(min_value=0, max_value=20), huge_ints),
        "tools": field(st.just([]), json_values),
        "response_format": field(st.just({"type": "text"}), json_values),
    },
)
completion_bodies = st.fixed_dictionaries(
    {
        "prompt": mostly(
            text | st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=4),
            st.lists(text, max_size=3) | st.lists(huge_ints, max_size=3) | json_values,
        ),
        "max_tokens": small_tokens,
    },
    optional={
        **common_fields,
        "logprobs": field(st.integers(min_value=0, max_value=5), huge_ints),
        "best_of": field(st.integers(min_value=1, max_value=3), huge_ints),
        "echo": field(st.just(False), json_values),
        "suffix": field(st.just(""), json_values),
    },
)


@pytest.fixture(scope="module")
def gateway(mesh, loop_thread):
    # A short HTTP deadline bounds any valid request the fuzzer happens to make.
    with running_gateway(loop_thread, mesh, http_timeout_seconds=3.0, http_max_body_bytes=64 * 1024) as gateway:
        yield gateway
        assert_still_serving(gateway)


@pytest.fixture(scope="module")
def channel(gateway):
    with grpc.insecure_channel(gateway.grpc) as channel:
        yield channel


def assert_still_serving(gateway) -> None:
    status, _, raw = gateway.get("/v1/models")
    assert status == 200 and json.loads(raw)["data"], "the gateway stopped answering HTTP"
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(gateway.grpc))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def check_http_answer(status: int, raw: bytes, stream_requested: bool) -> None:
    event(f"HTTP {status}")  # pytest --hypothesis-show-statistics shows how many got how far
    assert status in HTTP_OK_STATUSES, f"HTTP {status}: {raw[:500]!r}"
    if status == 200:
        if raw.startswith(b"data: "):
            events = raw.decode().split("\n\n")
            assert events[-1] == "" and (events[-2] == "data: [DONE]" or '"error"' in events[-2]), events[-3:]
        else:
            assert json.loads(raw)["choices"] is not None
        return
    error = json.loads(raw)["error"]
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert error["type"] and error["code"], error
    if status == 400:
        # The message names the field it is about, as the caller named it.
        assert error["param"] and error["param"] in error["message"], error


@FUZZ
@given(body=chat_bodies)
def test_chat_completions_never_fail_as_a_server_error(gateway, body):
    status, _, raw = gateway.post("/v1/chat/completions", body)
    check_http_answer(status, raw, body.get("stream") is True)


@FUZZ
@given(body=completion_bodies)
def test_completions_never_fail_as_a_server_error(gateway, body):
    status, _, raw = gateway.post("/v1/completions", body)
    check_http_answer(status, raw, body.get("stream") is True)


@FUZZ
@given(
    raw_body=st.binary(max_size=300)
    | st.builds(lambda v: json.dumps(v).encode(), json_values)
    | st.builds(lambda b: b'{"prompt": "' + b + b'"}', st.binary(max_size=40)),
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
)
def test_arbitrary_bytes_as_a_body_get_a_named_error(gateway, raw_body, path):
    status, _, raw = gateway.post(path, raw_body)
    check_http_answer(status, raw, False)


def test_a_giant_body_is_413_before_it_is_read(gateway):
    connection = gateway.connection(timeout=10)
    try:
        connection.putrequest("POST", "/v1/completions")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(10**12))
        connection.endheaders(b'{"prompt": ')
        response = connection.getresponse()
        assert response.status == 413
        assert "at most 65536 bytes" in json.loads(response.read())["error"]["message"]
    finally:
        connection.close()
    status, _, raw = gateway.post("/v1/completions", json.dumps({"prompt": "x" * 70_000}).encode())
    assert status == 413 and json.loads(raw)["error"]["param"] == "body"


uint32 = st.integers(min_value=0, max_value=2**32 - 1)
float32 = st.floats(width=32)
sampling = st.builds(
    common_pb2.SamplingParams,
    max_tokens=mostly(st.integers(min_value=1, max_value=6), st.none() | uint32),
    temperature=st.none() | float32,
    top_p=st.none() | float32,
    top_k=uint32,
    seed=st.none() | st.integers(min_value=0, max_value=2**64 - 1),
    stop=st.lists(st.text(max_size=300), max_size=20),
    stop_token_ids=st.lists(uint32, max_size=3),
    ignore_eos=st.booleans(),
    min_p=float32,
    repetition_penalty=st.none() | float32,
    presence_penalty=float32,
    frequency_penalty=float32,
    logprobs=st.booleans(),
    top_logprobs=uint32,
    min_tokens=mostly(st.integers(min_value=0, max_value=8), uint32),
    skip_special_tokens=st.none() | st.booleans(),
    spaces_between_special_tokens=st.none() | st.booleans(),
    include_stop_str_in_output=st.booleans(),
)
grpc_requests = st.builds(
    inference_pb2.GenerateRequest,
    model=mostly(st.sampled_from(["", "meshserve-tiny"]), st.sampled_from(["nope", "x" * 1000])),
    prompt=st.none() | st.text(max_size=60),
    token_ids=st.none() | st.builds(inference_pb2.TokenIds, ids=st.lists(uint32, max_size=5)),
    messages=st.none()
    | st.builds(
        inference_pb2.ChatMessages,
        messages=st.lists(
            st.builds(common_pb2.ChatMessage, role=st.text(max_size=10), content=st.text(max_size=30)), max_size=3
        ),
    ),
    sampling=sampling,
    n=mostly(st.integers(min_value=0, max_value=3), uint32),
    best_of=mostly(st.integers(min_value=0, max_value=3), uint32),
    priority=mostly(st.integers(min_value=0, max_value=5), st.integers(min_value=-(2**31), max_value=2**31 - 1)),
    request_id=st.text(max_size=140),
)  # fmt: skip


def check_grpc_error(error: grpc.RpcError) -> None:
    event(error.code().name)
    assert error.code() in CLIENT_CODES, f"{error.code()}: {error.details()}"
    assert error.details(), f"{error.code()} without a message"
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        fields = bad_request_fields(error)
        assert fields, f"no BadRequest field violation in {error.details()!r}"
        assert all(field in error.details() for field in fields), error.details()


@FUZZ
@given(request=grpc_requests, streaming=st.booleans())
def test_grpc_generate_never_fails_as_a_server_error(channel, request, streaming):
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        if streaming:
            list(stub.GenerateStream(request, timeout=3))
        else:
            stub.Generate(request, timeout=3)
    except grpc.RpcError as error:
        check_grpc_error(error)


@FUZZ
@given(payload=st.binary(max_size=200), method=st.sampled_from(["Generate", "ListModels"]))
def test_grpc_random_bytes_never_fail_as_a_server_error(channel, payload, method):
    call = channel.unary_unary(
        f"/meshserve.v1.Inference/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    try:
        call(payload, timeout=3)
    except grpc.RpcError as error:
        check_grpc_error(error)
