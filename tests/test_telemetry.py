"""One OpenTelemetry trace per request across every hop (gateway, aggregator, router, worker), failover included.

The services run in this process on real gRPC servers; spans cross real gRPC hops (W3C `traceparent` in
metadata) and land in an in-memory exporter.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from support import in_process_router, in_process_workers, wait_for

GATEWAY_STREAM = "/meshserve.v1.Inference/GenerateStream"


@dataclass
class CallDetails:
    """What an interceptor's filter reads of a call: its method name."""

    method: str | bytes


def wait_for_spans(exporter: InMemorySpanExporter, name: str, count: int, timeout: float = 10.0) -> list[ReadableSpan]:
    """Server spans end just after the client saw the end of the stream: wait for them, boundedly."""

    def found() -> list[ReadableSpan]:
        spans = [s for s in exporter.get_finished_spans() if s.name == name]
        return spans if len(spans) >= count else []

    return wait_for(found, f"{count} finished {name!r} span(s)", timeout)


def trace_of(exporter: InMemorySpanExporter, span: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == span.context.trace_id]


def ancestry(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    """Names from the span up to the root; fails if a parent is missing (a broken chain)."""
    names = [span.name]
    for _ in range(len(by_id)):  # a chain is at most every span of the trace
        if span.parent is None:
            return names
        assert span.parent.span_id in by_id, f"{span.name}'s parent is not in the trace: the chain broke"
        span = by_id[span.parent.span_id]
        names.append(span.name)
    raise AssertionError(f"the parents of {names[0]} loop: {names}")


def assert_one_intact_trace(spans: list[ReadableSpan]) -> dict[int, ReadableSpan]:
    by_id = {s.context.span_id: s for s in spans}
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, [s.name for s in roots]
    for span in spans:
        ancestry(span, by_id)
    return by_id


def running_sequences(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5).running_sequences


def test_a_streaming_request_is_one_trace_from_gateway_to_worker(spans, mesh):
    spans.clear()
    stub = inference_pb2_grpc.InferenceStub(mesh.channel(mesh.gateway))
    request = inference_pb2.GenerateRequest(
        prompt="Once upon a time",
        sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0.0),
        priority=common_pb2.PRIORITY_HIGH,
    )
    chunks = list(stub.GenerateStream(request, timeout=60))
    assert chunks[-1].final
    (root,) = wait_for_spans(spans, GATEWAY_STREAM, 1)
    (decode,) = wait_for_spans(spans, "worker.decode", 1)
    assert decode.context.trace_id == root.context.trace_id
    in_trace = trace_of(spans, root)
    by_id = assert_one_intact_trace(in_trace)
    chain = ancestry(decode, by_id)
    assert chain[0] == "worker.decode" and chain[-1] == GATEWAY_STREAM
    # The shared stream carries the trace context in each submission: the worker's span hangs under the dispatch.
    assert chain[1:3] == ["worker.sequence", "router.dispatch"], chain
    for hop in ("router.dispatch", "/meshserve.v1.Router/Generate"):
        assert hop in chain, chain
    names = {s.name for s in in_trace}
    assert {"router.queue", "worker.prefill"} <= names
    # GenAI semantic conventions on the worker's spans, and the router's queue by class.
    assert decode.attributes["gen_ai.request.model"] == "meshserve-tiny"
    assert decode.attributes["gen_ai.usage.output_tokens"] == sum(len(c.token_ids) for c in chunks)
    assert decode.attributes["gen_ai.usage.input_tokens"] > 0
    gateway = next(s for s in in_trace if s.name == "text_completion meshserve-tiny")
    assert gateway.attributes["gen_ai.usage.output_tokens"] == decode.attributes["gen_ai.usage.output_tokens"]
    assert gateway.attributes["gen_ai.response.id"] == chunks[-1].request_id
    finish = next(c.finish_reason for c in chunks if c.finish_reason)
    assert gateway.attributes["gen_ai.response.finish_reasons"] == ({1: "stop", 2: "length"}[finish],)
    assert gateway.attributes["meshserve.priority"] == "high"
    assert "text_completion meshserve-tiny" in chain
    queue = next(s for s in in_trace if s.name == "router.queue")
    assert queue.attributes["meshserve.priority"] == "high"
    # A span per request and step, never per token.
    assert len(in_trace) < 20


def test_health_checks_are_not_traced_and_requests_still_are(spans, mesh):
    """Probes come every few seconds from every kubelet and router: a trace each would bury the requests'."""
    spans.clear()
    for address in (mesh.gateway, mesh.router):
        reply = health_pb2_grpc.HealthStub(mesh.channel(address)).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = inference_pb2_grpc.InferenceStub(mesh.channel(mesh.gateway))
    request = inference_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=2))
    chunks = list(stub.GenerateStream(request, timeout=60))
    assert chunks[-1].final and chunks[-1].usage.completion_tokens == 2
    wait_for_spans(spans, GATEWAY_STREAM, 1)
    wait_for_spans(spans, "/meshserve.v1.Router/Generate", 2)  # the gateway's call and the router's handler
    traced = {s.name for s in spans.get_finished_spans()}
    assert not [name for name in traced if "Health" in name], traced


def test_a_router_s_shared_stream_to_a_worker_is_not_traced() -> None:
    """A Connect stream lives as long as its connection, so its span would never end while the mesh runs (nothing
    to see in the exporter): the filter itself, on the names the server (str) and an aio client (bytes) give."""
    from meshserve.common.telemetry import _traced

    for method in ("/meshserve.v1.Worker/Connect", b"/meshserve.v1.Worker/Connect", "/grpc.health.v1.Health/Watch"):
        assert not _traced(CallDetails(method)), method
    for method in ("/meshserve.v1.Router/Generate", b"/meshserve.v1.Worker/GetLoad", GATEWAY_STREAM):
        assert _traced(CallDetails(method)), method


def test_a_fan_out_request_is_one_trace_with_a_child_per_sub_request(spans, mesh):
    spans.clear()
    stub = inference_pb2_grpc.InferenceStub(mesh.channel(mesh.gateway))
    request = inference_pb2.GenerateRequest(
        prompt="Three ways to say hello", n=3, sampling=common_pb2.SamplingParams(max_tokens=4, seed=1)
    )
    chunks = list(stub.GenerateStream(request, timeout=60))
    assert {c.index for c in chunks if c.token_ids} == {0, 1, 2}
    (root,) = wait_for_spans(spans, GATEWAY_STREAM, 1)
    decodes = wait_for_spans(spans, "worker.decode", 3)
    assert len(decodes) == 3
    in_trace = trace_of(spans, root)
    by_id = assert_one_intact_trace(in_trace)
    aggregator_spans = [s for s in in_trace if s.name == "/meshserve.v1.Aggregator/Generate"]
    assert len(aggregator_spans) == 2  # the gateway's call (client) and the aggregator's handler (server)
    router_servers = [
        s for s in in_trace if s.name == "/meshserve.v1.Router/Generate" and s.kind == trace.SpanKind.SERVER
    ]
    assert len(router_servers) == 3
    for decode in decodes:
        assert decode.context.trace_id == root.context.trace_id
        chain = ancestry(decode, by_id)
        assert "/meshserve.v1.Aggregator/Generate" in chain and chain[-1] == GATEWAY_STREAM


def test_a_stream_resumed_on_another_worker_stays_in_the_same_trace(spans, loop_thread, model_dir):
    with (
        in_process_workers(loop_thread, [2, 2]) as workers,
        in_process_router(loop_thread, ",".join(w.address for w in workers)) as router,
        grpc.insecure_channel(router.address) as channel,
    ):
        spans.clear()
        stub = router_pb2_grpc.RouterStub(channel)
        request = common_pb2.TokenRequest(
            request_id="failover-trace",
            prompt_token_ids=list(range(10, 40)),
            sampling=common_pb2.SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True),
        )
        tokens: list[int] = []
        first_tokens = threading.Event()

        def consume() -> None:
            for chunk in stub.Generate(request, timeout=120):
                tokens.extend(chunk.token_ids)
                if len(tokens) >= 5:
                    first_tokens.set()

        consumer = threading.Thread(target=consume)
        consumer.start()
        assert first_tokens.wait(60), "no tokens came"
        (first_prefill,) = wait_for_spans(spans, "worker.prefill", 1)
        serving = next(w for w in workers if running_sequences(w.address) > 0)
        loop_thread.run(serving.stop(0))  # the worker vanishes mid-stream
        consumer.join(120)
        assert not consumer.is_alive()
        assert len(tokens) == 120
        dispatches = wait_for_spans(spans, "router.dispatch", 2)
        assert len(dispatches) == 2
        assert dispatches[0].context.trace_id == dispatches[1].context.trace_id == first_prefill.context.trace_id
        attempts = sorted(s.attributes["meshserve.router.attempt"] for s in dispatches)
        assert attempts == [1, 2]
        resumed = next(s for s in dispatches if s.attributes["meshserve.router.attempt"] == 2)
        assert resumed.attributes["meshserve.router.resumed_tokens"] >= 5
        assert resumed.parent.span_id == dispatches[0].parent.span_id  # siblings under one router span
        decodes = [
            s for s in wait_for_spans(spans, "worker.decode", 2) if s.context.trace_id == dispatches[0].context.trace_id
        ]
        assert any(s.attributes.get("meshserve.resumed_tokens", 0) >= 5 for s in decodes)
        assert_one_intact_trace(trace_of(spans, resumed))


def test_an_http_caller_s_traceparent_is_continued(spans, mesh):
    spans.clear()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    body = {"model": "meshserve-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    request = urllib.request.Request(
        mesh.servers["gateway"].http.url + "v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
    (decode,) = wait_for_spans(spans, "worker.decode", 1)
    assert format(decode.context.trace_id, "032x") == trace_id
    chat = next(s for s in trace_of(spans, decode) if s.name == "chat meshserve-tiny")
    assert format(chat.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert chat.attributes["meshserve.api"] == "http"
