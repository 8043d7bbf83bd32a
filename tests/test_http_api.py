"""The OpenAI-compatible HTTP API, driven by the official `openai` package (unmodified) and by raw HTTP."""

from __future__ import annotations

import asyncio
import json
import socket

import grpc
import openai
import pytest

from http_gateway import running_gateway, wait_for, worker_load
from meshserve.common.errors import bad_request_fields
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def grpc_text(gateway, **fields) -> str:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway.grpc))
    return stub.Generate(inference_pb2.GenerateRequest(**fields), timeout=60).completions[0].text


def test_chat_completion_is_the_grpc_answer_to_the_same_messages(client, gateway):
    reply = client.chat.completions.create(
        model="meshserve-tiny", messages=[{"role": "user", "content": "Hi there"}], max_tokens=12, **GREEDY
    )
    assert reply.object == "chat.completion" and reply.model == "meshserve-tiny"
    assert reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    expected = grpc_text(
        gateway,
        messages=inference_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="Hi there")]),
        sampling=common_pb2.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    )
    assert choice.message.content == expected
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model="meshserve-tiny", messages=messages, max_tokens=20, **GREEDY)
    stream = client.chat.completions.create(
        model="meshserve-tiny",
        messages=messages,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completions_whole_and_streamed_agree(client, gateway):
    whole = client.completions.create(model="meshserve-tiny", prompt="Once upon a time", max_tokens=16, **GREEDY)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == grpc_text(
        gateway,
        prompt="Once upon a time",
        sampling=common_pb2.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
    )
    streamed = list(
        client.completions.create(
            model="meshserve-tiny", prompt="Once upon a time", max_tokens=16, stream=True, **GREEDY
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_n2_gives_two_different_seeded_samples(client):
    request = {"model": "meshserve-tiny", "prompt": "Hello", "max_tokens": 10, "n": 2, "seed": 11, "temperature": 1.0}
    first = client.completions.create(**request, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert first.choices[0].text != first.choices[1].text
    again = client.completions.create(**request, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in first.choices], "same seed, different samples"
    streamed = client.chat.completions.create(
        model="meshserve-tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        n=2,
        seed=3,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] and texts[1]


def test_stop_string_ends_the_completion_before_it(client):
    full = client.completions.create(model="meshserve-tiny", prompt="Hello", max_tokens=30, **GREEDY).choices[0].text
    stop = full[8:11]
    cut = client.completions.create(model="meshserve-tiny", prompt="Hello", max_tokens=30, stop=[stop], **GREEDY)
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs_in_both_shapes(client, model_dir):
    completion = client.completions.create(model="meshserve-tiny", prompt="Hello", max_tokens=4, logprobs=3, **GREEDY)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) <= 3 and top for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens).strip() and all(lp <= 0 for lp in logprobs.token_logprobs)
    chat = client.chat.completions.create(
        model="meshserve-tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=4,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    # Greedy picks the most likely token, so each chosen token is its step's best alternative.
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5) for t in content)
    tokenizer = ModelTokenizer.from_dir(model_dir)
    assert all(t.bytes == list(t.token.encode()) for t in content) and tokenizer


def test_priority_best_of_and_a_batch_of_prompts(client):
    high = client.completions.create(
        model="meshserve-tiny", prompt="Hello", max_tokens=3, extra_body={"priority": "high", "ignore_eos": True}
    )
    assert high.choices[0].finish_reason == "length"
    best = client.completions.create(model="meshserve-tiny", prompt="Hello", max_tokens=4, n=1, best_of=3, seed=5)
    assert len(best.choices) == 1
    batch = client.completions.create(model="meshserve-tiny", prompt=["Hello", "Goodbye"], max_tokens=3, **GREEDY)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    alone = client.completions.create(model="meshserve-tiny", prompt="Goodbye", max_tokens=3, **GREEDY)
    assert batch.choices[1].text == alone.choices[0].text


def test_models_are_listed(client):
    assert [m.id for m in client.models.list().data] == ["meshserve-tiny"]
    assert client.models.retrieve("meshserve-tiny").id == "meshserve-tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize(
    ("request_fields", "param", "error_type"),
    [
        ({"temperature": -1}, "temperature", openai.BadRequestError),
        ({"top_p": 1.5}, "top_p", openai.BadRequestError),
        ({"max_tokens": 10_000_000}, "max_tokens", openai.BadRequestError),
        ({"n": 1000}, "n", openai.BadRequestError),
        ({"model": "no-such-model"}, "model", openai.NotFoundError),
        ({"extra_body": {"priority": "urgent"}}, "priority", openai.BadRequestError),
        ({"stop": [""]}, "stop[0]", openai.BadRequestError),
        ({"presence_penalty": 5}, "presence_penalty", openai.BadRequestError),
        ({"extra_body": {"top_k": "many"}}, "top_k", openai.BadRequestError),
    ],
)
def test_errors_reach_the_openai_client_naming_the_field(client, request_fields, param, error_type):
    fields = {"model": "meshserve-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    with pytest.raises(error_type) as caught:
        client.chat.completions.create(**{**fields, **request_fields})
    error = caught.value.body
    assert error["param"] == param, error
    assert error["message"].startswith(param) or f"; {param}" in error["message"], error
    assert caught.value.status_code in (400, 404)


def test_a_body_with_many_bad_items_gets_a_short_answer_naming_the_first(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="meshserve-tiny",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            extra_body={"stop_token_ids": ["x"] * 5000},
        )
    error = caught.value.body
    assert error["param"] == "stop_token_ids[0]", error
    assert error["message"].count("stop_token_ids[") == 16, error["message"][:200]
    assert error["message"].endswith("and 4984 more like these"), error["message"][-200:]
    assert len(error["message"]) < 2000


def test_chat_prompt_too_long_for_the_context_names_messages(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="meshserve-tiny", messages=[{"role": "user", "content": "word " * 3000}], max_tokens=4
        )
    assert caught.value.body["param"] == "messages"
    assert "context of 2048" in caught.value.body["message"]


def test_conflicting_max_tokens_are_refused(gateway):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "max_completion_tokens": 5}
    status, _, raw = gateway.post("/v1/chat/completions", body)
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "max_completion_tokens"


def test_body_limits_and_malformed_bodies(gateway):
    status, _, raw = gateway.post("/v1/completions", b"{" + b" " * (9 * 1024 * 1024) + b"}")
    assert status == 413 and "at most 8388608 bytes" in json.loads(raw)["error"]["message"]
    status, _, raw = gateway.post("/v1/completions", b'{"prompt": "caf\xe9"}')
    assert (
        status == 400 and json.loads(raw)["error"]["param"] == "body" and "UTF-8" in json.loads(raw)["error"]["message"]
    )
    status, _, raw = gateway.post("/v1/completions", b'{"prompt": "a\\ud800b"}')
    assert status == 400 and json.loads(raw)["error"]["param"] == "prompt"
    status, _, raw = gateway.post("/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in json.loads(raw)["error"]["message"]
    status, _, raw = gateway.post("/v1/completions", b'{"prompt": "x", "temperature": NaN}')
    assert status == 400 and "NaN" in json.loads(raw)["error"]["message"]
    status, _, raw = gateway.post("/v1/completions", {"prompt": "x", "frobnicate": 1})
    assert status == 400 and json.loads(raw)["error"]["param"] == "frobnicate"
    status, _, raw = gateway.get("/v1/nothing-here")
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
    status, headers, _ = gateway.get("/v1/completions")
    assert status == 405 and "POST" in headers.get("Allow", "")


def test_sse_stream_is_framed_as_openai_clients_expect(gateway):
    body = {"prompt": "Hello", "max_tokens": 5, "stream": True, "temperature": 0, "ignore_eos": True}
    status, headers, raw = gateway.post("/v1/completions", body, {"X-Request-Id": "sse-check-1"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Request-Id"] == "sse-check-1"
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], events[-3:]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(p["id"] == "cmpl-sse-check-1" and p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def read_events(sock: socket.socket, count: int) -> bytes:
    data = b""
    while data.count(b"data: ") < count:  # chunked transfer encoding interleaves sizes: count events
        piece = sock.recv(4096)
        assert piece, f"stream ended early: {data[-300:]!r}"
        data += piece
    return data


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_the_workers_sequence(gateway, mesh, stream):
    before = worker_load(mesh)
    body = json.dumps(
        {"prompt": "Hello", "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": stream}
    ).encode()
    host, port = gateway.http.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    try:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        if stream:
            assert b"200 OK" in read_events(sock, 3)
        else:
            assert wait_for(lambda: worker_load(mesh).running_sequences == 1), "the request never reached the worker"
    finally:
        sock.close()
    assert wait_for(lambda: worker_load(mesh).sequences_cancelled == before.sequences_cancelled + 1), (
        "the worker never dropped the sequence of the client that went away"
    )
    after = worker_load(mesh)
    assert after.running_sequences == 0
    assert after.generated_tokens - before.generated_tokens < 1500


def test_grpc_request_with_bad_utf8_is_invalid_argument(gateway):
    channel = grpc.insecure_channel(gateway.grpc)
    call = channel.unary_unary(
        "/meshserve.v1.Inference/Generate", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.RpcError) as caught:
        call(b"\x12\x03a\xffb", timeout=10)  # field 2 (prompt), 3 bytes, not UTF-8
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["request"] and "UTF-8" in caught.value.details()


def test_grpc_unknown_model_is_not_found_naming_the_field(gateway):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway.grpc))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(inference_pb2.GenerateRequest(prompt="hi", model="no-such-model"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert bad_request_fields(caught.value) == ["model"] and "meshserve-tiny" in caught.value.details()


def test_draining_lets_a_running_stream_finish_and_takes_no_new_requests(mesh, loop_thread):
    with running_gateway(loop_thread, mesh) as draining:
        body = {"prompt": "Hello", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True}
        connection = draining.connection()
        connection.request(
            "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        assert response.status == 200
        first = response.readline()
        assert first.startswith(b"data: ")
        stopping = asyncio.run_coroutine_threadsafe(draining.server.stop(30.0), loop_thread.loop)
        assert wait_for(lambda: not port_open(draining.http), timeout=10), "the HTTP port still takes connections"
        rest = response.read().decode()
        connection.close()
        assert rest.rstrip().endswith("data: [DONE]"), rest[-300:]
        events = [json.loads(e.removeprefix("data: ")) for e in (first.decode() + rest).split("\n\n")[:-2] if e]
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 50
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        stopping.result(timeout=30)


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def test_grpc_messages_over_the_size_limit_are_refused_naming_messages(gateway):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(gateway.grpc))
    big = [common_pb2.ChatMessage(role="user", content="x" * (3 * 1024 * 1024)) for _ in range(2)]
    request = inference_pb2.GenerateRequest(messages=inference_pb2.ChatMessages(messages=big))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["messages"] and "4194304 bytes" in caught.value.details()


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"max_tokens": True}, "max_tokens", "max_tokens: must be an integer, got a boolean"),
        ({"max_tokens": 2.5}, "max_tokens", "max_tokens: must be an integer, got a number"),
        ({"n": 0}, "n", "n: must be at least 1, got 0"),
        ({"temperature": 1e39}, "temperature", "temperature: must be a finite number, at most 3.402823e+38 in size"),
        ({"temperature": "0.5"}, "temperature", "temperature: must be a number, got a string"),
        ({"ignore_eos": 1}, "ignore_eos", "ignore_eos: must be true or false, got an integer"),
        ({"stop": 3}, "stop", "stop: must be a string or a list of strings, got an integer"),
        ({"stop": ["a", 3]}, "stop[1]", "stop[1]: must be a string, got an integer"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream_options: is only allowed with stream"),
        ({"stream": True, "stream_options": {"usage": True}}, "stream_options.usage", "stream_options.usage: is not a"),
        ({"messages": [{"role": "robot"}]}, "messages[0].role", "messages[0].role: must be 'system', 'developer'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type", None),
        ({"messages": "Hi"}, "messages", "messages: must be a list, got a string"),
        ({"tool_choice": "required"}, "tool_choice", "tool_choice: asks for a tool call, but the request has no tools"),
        ({"top_logprobs": 2}, "top_logprobs", "top_logprobs: needs logprobs set"),
    ],
)
def test_chat_bodies_are_checked_as_strictly_as_the_proto_naming_the_field(gateway, fields, param, message):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
    status, _, raw = gateway.post("/v1/chat/completions", body)
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == param, error
    assert error["message"].startswith(message or param), error


def test_infinity_is_refused_and_a_whole_float_is_an_integer(gateway):
    status, _, raw = gateway.post("/v1/completions", b'{"prompt": "Hi", "max_tokens": 2, "top_p": 1e400}')
    assert status == 400 and json.loads(raw)["error"]["message"].startswith("top_p: must be a finite number")
    status, _, raw = gateway.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2.0, "n": 1.0, "temperature": 0})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] <= 2, raw
