"""JSON log lines: service, request id, trace and span ids; prompt and output text only when an operator asks."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from http_gateway import running_gateway
from meshserve.common.logs import JsonFormatter
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

SECRET_PROMPT = "the password is swordfish-4711"


@contextmanager
def captured_logs(service: str) -> Iterator[io.StringIO]:
    """Every log record of this process, formatted as the services format them, at debug level."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def generate(address: str, prompt: str) -> list[inference_pb2.GenerateStreamResponse]:
    import grpc

    with grpc.insecure_channel(address) as channel:
        request = inference_pb2.GenerateRequest(
            prompt=prompt, request_id="log-me", sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0)
        )
        return list(inference_pb2_grpc.InferenceStub(channel).GenerateStream(request, timeout=60))


def test_prompt_and_output_never_reach_the_logs_by_default(spans, mesh):
    with captured_logs("gateway") as logs:
        chunks = generate(mesh.gateway, SECRET_PROMPT)
    output = "".join(c.text for c in chunks)
    assert SECRET_PROMPT not in logs.getvalue()
    assert not output.strip() or output not in logs.getvalue()


def test_with_log_text_each_line_carries_the_request_and_its_trace(spans, loop_thread, mesh):
    with running_gateway(loop_thread, mesh, log_text=True) as gateway, captured_logs("gateway") as logs:
        spans.clear()
        chunks = generate(gateway.grpc, SECRET_PROMPT)
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    request_line = next(line for line in lines if line["msg"] == "request text")
    output_line = next(line for line in lines if line["msg"] == "generated text")
    assert SECRET_PROMPT in request_line["prompts"][0]
    assert output_line["outputs"] == {"0": "".join(c.text for c in chunks)}
    root = next(s for s in spans.get_finished_spans() if s.name == "/meshserve.v1.Inference/GenerateStream")
    for line in (request_line, output_line):
        assert line["service"] == "gateway" and line["level"] == "info" and line["ts"].endswith("Z")
        assert line["client_request_id"] == "log-me" and len(line["request_id"]) == 32  # the mesh's own id
        assert line["trace_id"] == format(root.context.trace_id, "032x")
        assert len(line["span_id"]) == 16
