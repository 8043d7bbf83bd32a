"""What a failure inside the mesh tells a caller outside it: a stable message and the request id, never an internal
address or an exception's text; the details go to the gateway's log under that request id."""

from __future__ import annotations

import json
import logging
import re

import grpc
import pytest

from http_gateway import running_gateway
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from support import free_ports

INTERNAL_TEXT = re.compile(r"ipv[46]:|127\.0\.0\.1|Connection refused|failed to connect|Traceback|Error:")


@pytest.fixture(scope="module")
def cut_off(mesh, loop_thread):
    """A gateway whose aggregator is gone: every fan-out fails on a refused connection."""
    (dead,) = free_ports(1)
    with running_gateway(loop_thread, mesh, aggregator=f"127.0.0.1:{dead}") as gateway:
        yield gateway


def test_grpc_callers_get_a_stable_message_and_the_request_id(cut_off, caplog):
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(cut_off.grpc))
    request = inference_pb2.GenerateRequest(
        prompt="Hi", n=2, request_id="mine-1", sampling=common_pb2.SamplingParams(max_tokens=2)
    )
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, timeout=60)
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert not INTERNAL_TEXT.search(error.details()), f"internal text reached the caller: {error.details()!r}"
    request_id = re.search(r"request id (\S+):", error.details())
    assert request_id, error.details()
    logged = [r.getMessage() for r in caplog.records if request_id.group(1) in r.getMessage()]
    assert any("127.0.0.1" in line for line in logged), f"the details are not logged under the id: {logged}"


def test_http_callers_get_a_stable_message_and_the_request_id(cut_off):
    status, headers, raw = cut_off.post("/v1/completions", {"prompt": "Hi", "n": 2, "max_tokens": 2})
    assert status == 503, raw
    message = json.loads(raw)["error"]["message"]
    assert not INTERNAL_TEXT.search(message), f"internal text reached the caller: {message!r}"
    assert headers.get("X-Request-Id") and headers["X-Request-Id"] in message, (headers, message)
