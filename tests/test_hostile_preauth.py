"""What a caller without a valid API key can make the gateway's public gRPC port do: receive at most the largest valid
request, and parse none of it (the key is checked before the request is deserialized)."""

from __future__ import annotations

import json

import grpc
import pytest

from http_gateway import running_gateway
from meshserve.gateway.auth import hash_key
from meshserve.gateway.validation import MAX_PROMPT_BYTES
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

KEY = "preauth-key"
GENERATE = "/meshserve.v1.Inference/Generate"
GENERATE_STREAM = "/meshserve.v1.Inference/GenerateStream"
# What a client can send: far more than the gateway takes.
CLIENT_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024)]


@pytest.fixture(scope="module")
def keyed(mesh, loop_thread, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys.json"
    path.write_text(json.dumps({"tenants": [{"name": "acme", "key_sha256": [hash_key(KEY)]}]}))
    with running_gateway(loop_thread, mesh, api_keys_file=str(path)) as gateway:
        yield gateway


def raw_call(address: str, method: str, payload: bytes, key: str | None = None, stream: bool = False) -> grpc.RpcError:
    """The error of one call with `payload` as the request's bytes, exactly as sent."""
    metadata = [("authorization", f"Bearer {key}")] if key else None
    with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        if stream:
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as caught:
                list(call(payload, metadata=metadata, timeout=60))
        else:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as caught:
                call(payload, metadata=metadata, timeout=60)
    return caught.value


@pytest.mark.parametrize("method,stream", [(GENERATE, False), (GENERATE_STREAM, True)])
def test_a_caller_without_a_key_is_refused_before_its_request_is_parsed(keyed, method, stream):
    """Bytes that do not parse would be INVALID_ARGUMENT if they were looked at: without a key they are not."""
    error = raw_call(keyed.grpc, method, b"\x0a\xff\xff\xff\xff\x0f", stream=stream)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (error.code(), error.details())
    error = raw_call(keyed.grpc, method, b"\x0a\xff\xff\xff\xff\x0f", key=KEY, stream=stream)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, "with a key the same bytes are read and named"


@pytest.mark.parametrize("key", [None, "wrong-key", KEY])
def test_a_message_above_the_largest_valid_request_is_refused_unread(keyed, key):
    # Above MAX_REQUEST_BYTES (twice the largest prompt): the old port took up to 64 MiB and parsed it.
    huge = inference_pb2.GenerateRequest(prompt="x" * (2 * MAX_PROMPT_BYTES + 1024)).SerializeToString()
    error = raw_call(keyed.grpc, GENERATE, huge, key=key)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details()[:200])


def test_the_largest_valid_prompt_still_fits_the_port(keyed):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(keyed.grpc, options=CLIENT_OPTIONS))
    request = inference_pb2.GenerateRequest(
        prompt="x" * (MAX_PROMPT_BYTES + 1), sampling=common_pb2.SamplingParams(max_tokens=1)
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, metadata=[("authorization", f"Bearer {KEY}")], timeout=60)
    # Received and validated: the field is named, not the transport's limit.
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in caught.value.details()
