"""Bodies a hostile caller sends the gateway: each is refused early, with the status and field to fix, and
before any of its items costs the gateway work per item."""

from __future__ import annotations

import json

import grpc
import pytest

from meshserve.common.errors import bad_request_fields
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

COMPLETION = {"model": "meshserve-tiny", "prompt": "Hi", "max_tokens": 2}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_not_declared_json_is_415_so_a_web_page_cannot_post_one(gateway, content_type):
    """A browser sends these cross-site without asking first (CORS "simple" requests)."""
    status, _, raw = gateway.post("/v1/completions", COMPLETION, {"Content-Type": content_type})
    assert status == 415, raw
    error = json.loads(raw)["error"]
    assert "application/json" in error["message"] and content_type in error["message"]
    status, _, raw = gateway.post("/v1/chat/completions", COMPLETION, {"Content-Type": content_type})
    assert status == 415, raw


def test_json_with_a_charset_is_taken(gateway):
    status, _, raw = gateway.post("/v1/completions", COMPLETION, {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200, raw


def test_a_million_stop_token_ids_are_refused_by_their_count(gateway, mesh):
    body = {**COMPLETION, "stop_token_ids": [5] * 1_000_000}
    status, _, raw = gateway.post("/v1/completions", body)
    assert status == 400, raw[:300]
    message = json.loads(raw)["error"]["message"]
    assert "stop_token_ids" in message and "one per token of the vocabulary" in message and len(message) < 300
    stub = inference_pb2_grpc.InferenceStub(mesh.channel(gateway.grpc))
    sampling = common_pb2.SamplingParams(max_tokens=2, stop_token_ids=[10**6] * 100_000)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(inference_pb2.GenerateRequest(prompt="Hi", sampling=sampling), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["sampling.stop_token_ids"]  # one entry, not 100,000


def test_a_conversation_of_too_many_messages_is_refused_by_its_count(gateway, mesh):
    stub = inference_pb2_grpc.InferenceStub(mesh.channel(gateway.grpc))
    messages = inference_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="", content="") for _ in range(50_000)])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(inference_pb2.GenerateRequest(messages=messages), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["messages"]  # not one per empty role
    assert "4096" in caught.value.details()
