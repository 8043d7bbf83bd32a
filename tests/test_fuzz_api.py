"""Hypothesis throws 10,000 generated requests at each public API (fuzz_support.PUBLIC_REQUESTS): malformed and
extreme OpenAI bodies, paths and headers over HTTP; GenerateRequests, valid-but-extreme and broken, and random bytes
over gRPC. Never a server error, never a dead gateway, and every refusal names the field it is about."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from fuzz_messages import grpc_requests, list_models_requests, raw_messages
from fuzz_strategies import chat_bodies, completion_bodies, headers, methods, paths, raw_bodies
from fuzz_support import (
    CALL_TIMEOUT_S,
    PUBLIC_REQUESTS,
    assert_reached_workers,
    call_label,
    check_error_status,
    fuzz,
    raw_stream,
    raw_unary,
    share,
)
from http_gateway import running_gateway
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

# Statuses a caller may get; a 5xx other than 504 (its own deadline) is a bug.
HTTP_STATUSES = {200, 400, 403, 404, 405, 413, 415, 429, 504}
DONE = "data: [DONE]"


@pytest.fixture(scope="module")
def gateway(mesh, loop_thread):
    # Short deadlines and small defaults bound what any valid request the fuzzer makes can cost.
    with running_gateway(
        loop_thread,
        mesh,
        http_timeout_seconds=CALL_TIMEOUT_S,
        http_max_body_bytes=64 * 1024,
        default_max_tokens=8,
        max_n=4,
    ) as gateway:
        yield gateway
        assert_still_serving(gateway)


@pytest.fixture(scope="module")
def channel(gateway):
    with grpc.insecure_channel(gateway.grpc) as channel:
        yield channel


def assert_still_serving(gateway) -> None:
    status, _, raw = gateway.get("/v1/models")
    assert status == 200 and json.loads(raw)["data"], "the gateway stopped answering HTTP"
    with grpc.insecure_channel(gateway.grpc) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING, "the gateway stopped serving gRPC"


# ---- HTTP ------------------------------------------------------------------------------------------------------


def check_http_answer(status: int, raw: bytes, method: str = "POST") -> str:
    assert status in HTTP_STATUSES, f"HTTP {status}: {raw[:500]!r}"
    if method == "HEAD":
        return f"HTTP {status}"
    if status == 200:
        if raw.startswith(b"data: "):
            events = raw.decode().split("\n\n")
            assert events[-1] == "", f"a stream that does not end with an event: {events[-2:]}"
            if events[-2] != DONE:
                error = json.loads(events[-2].removeprefix("data: "))["error"]
                assert error["type"] != "server_error", f"a stream that ended in a server error: {error}"
                return "HTTP 200 error event"
        elif not raw.startswith(b"<!"):  # the chat page
            assert isinstance(json.loads(raw), dict), raw[:300]
        return "HTTP 200"
    error = json.loads(raw)["error"]
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert error["type"] and error["code"], error
    if status == 400:
        # The message names the field it is about, as the caller named it.
        assert error["param"] and error["param"] in error["message"], error
    return f"HTTP {status}"


def request(gateway, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
    connection = gateway.connection(timeout=CALL_TIMEOUT_S + 10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def post_json(gateway, path: str):
    def send(body: dict) -> str:
        status, _, raw = gateway.post(path, body)
        return check_http_answer(status, raw)

    return send


def test_chat_completions_never_fail_as_a_server_error(gateway):
    outcomes = fuzz(chat_bodies, post_json(gateway, "/v1/chat/completions"), share(PUBLIC_REQUESTS, 0.35))
    assert_reached_workers(outcomes, ["HTTP 200"], 0.05)


def test_completions_never_fail_as_a_server_error(gateway):
    outcomes = fuzz(completion_bodies, post_json(gateway, "/v1/completions"), share(PUBLIC_REQUESTS, 0.35))
    assert_reached_workers(outcomes, ["HTTP 200"], 0.05)


def test_arbitrary_bytes_as_a_body_get_a_named_error(gateway):
    def send(example: tuple[bytes, str]) -> str:
        body, path = example
        status, _, raw = gateway.post(path, body)
        return check_http_answer(status, raw)

    bodies = st.tuples(raw_bodies, st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    fuzz(bodies, send, share(PUBLIC_REQUESTS, 0.15))


def test_any_method_path_and_headers_get_an_answer_in_openai_shape(gateway):
    bodies = st.none() | st.sampled_from([b'{"prompt": "Hi", "max_tokens": 2}', b'{"messages": []}']) | raw_bodies

    def send(example: tuple[str, str, bytes | None, dict[str, str]]) -> str:
        method, path, body, sent_headers = example
        status, raw = request(gateway, method, path, body, sent_headers)
        return check_http_answer(status, raw, method)

    fuzz(st.tuples(methods, paths, bodies, headers), send, share(PUBLIC_REQUESTS, 0.15))


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


# ---- gRPC ------------------------------------------------------------------------------------------------------


def test_grpc_generate_never_fails_as_a_server_error(channel):
    stub = inference_pb2_grpc.InferenceStub(channel)

    def stream(generate: inference_pb2.GenerateRequest) -> None:
        for message in stub.GenerateStream(generate, timeout=CALL_TIMEOUT_S):
            if message.HasField("error"):  # one index of a best-effort fan-out
                check_error_status(message.error)

    def whole(generate: inference_pb2.GenerateRequest) -> None:
        for completion in stub.Generate(generate, timeout=CALL_TIMEOUT_S).completions:
            for error in completion.errors:
                check_error_status(error)

    def send(example: tuple[inference_pb2.GenerateRequest, bool]) -> str:
        generate, streaming = example
        return call_label(lambda: (stream if streaming else whole)(generate))

    outcomes = fuzz(st.tuples(grpc_requests, st.booleans()), send, share(PUBLIC_REQUESTS, 0.75))
    assert_reached_workers(outcomes, ["OK"], 0.05)


def test_grpc_random_bytes_never_fail_as_a_server_error(channel):
    methods = {
        "Generate": (raw_unary, raw_messages(grpc_requests)),
        "GenerateStream": (raw_stream, raw_messages(grpc_requests)),
        "ListModels": (raw_unary, raw_messages(list_models_requests)),
    }

    def send(example: tuple[str, bytes]) -> str:
        method, payload = example
        call = methods[method][0](channel, f"/meshserve.v1.Inference/{method}")
        return call_label(
            lambda: (
                list(call(payload, timeout=CALL_TIMEOUT_S))
                if method == "GenerateStream"
                else call(payload, timeout=CALL_TIMEOUT_S)
            )
        )

    examples = st.one_of(*(st.tuples(st.just(name), payloads) for name, (_, payloads) in methods.items()))
    fuzz(examples, send, share(PUBLIC_REQUESTS, 0.2))


def test_grpc_list_models_answers_any_request(channel):
    stub = inference_pb2_grpc.InferenceStub(channel)

    def send(listing: common_pb2.ListModelsRequest) -> str:
        return call_label(lambda: stub.ListModels(listing, timeout=CALL_TIMEOUT_S))

    outcomes = fuzz(list_models_requests, send, share(PUBLIC_REQUESTS, 0.05))
    assert outcomes["OK"] == sum(outcomes.values()), dict(outcomes)
