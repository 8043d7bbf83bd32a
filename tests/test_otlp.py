"""A mesh of separate processes exports its spans over OTLP/gRPC to a real receiver on 127.0.0.1.

Each service is configured only through the standard OTEL_* variables, as in a cluster; the receiver
is the OTLP TraceService itself, so what arrives is exactly what a collector would get.
"""

from __future__ import annotations

import threading
import urllib.request
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from support import ServiceProcess, free_ports, service_env, start_service, stop_processes, wait_for, wait_until_ready


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span as (service name, trace id, span name, parent span id, span id)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, bytes, str, bytes, bytes]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                service = attributes.get("service.name", "")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((service, span.trace_id, span.name, span.parent_span_id, span.span_id))
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[tuple[str, bytes, str, bytes, bytes]]:
        with self.lock:
            return list(self.spans)


def test_a_mesh_of_processes_exports_one_trace_per_request_over_otlp(cache_dir, tmp_path):
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    worker, router, aggregator, gateway, http, *metrics = free_ports(9)
    env = service_env(
        cache_dir,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}",
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_BSP_SCHEDULE_DELAY="100",  # ms: export promptly
        OTEL_TRACES_SAMPLER="parentbased_always_on",
    )
    plan = {
        "worker": ["worker", "--port", str(worker), "--threads", "1"],
        "router": ["router", "--port", str(router), "--workers", f"127.0.0.1:{worker}"],
        "aggregator": ["aggregator", "--port", str(aggregator), "--router", f"127.0.0.1:{router}"],
        "gateway": [
            "gateway", "--port", str(gateway), "--http-port", str(http),
            "--router", f"127.0.0.1:{router}", "--aggregator", f"127.0.0.1:{aggregator}",
        ],
    }  # fmt: skip
    ports = {"worker": worker, "router": router, "aggregator": aggregator, "gateway": gateway}
    services: dict[str, ServiceProcess] = {}
    try:
        for (name, args), metrics_port in zip(plan.items(), metrics, strict=False):
            command = [*args, "--metrics-port", str(metrics_port)]
            services[name] = start_service(command, f"127.0.0.1:{ports[name]}", env, tmp_path / f"{name}.log")
        for service in services.values():
            wait_until_ready(service)

        with grpc.insecure_channel(f"127.0.0.1:{gateway}") as channel:
            request = inference_pb2.GenerateRequest(
                prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0)
            )
            chunks = list(inference_pb2_grpc.InferenceStub(channel).GenerateStream(request, timeout=60))
        assert chunks[-1].final

        # Every process serves its own /metrics, named for its service.
        for (name, _), metrics_port in zip(plan.items(), metrics, strict=False):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                assert f"meshserve_{name}_" in response.read().decode(), name

        decode = wait_for(
            lambda: [s for s in receiver.snapshot() if s[2] == "worker.decode"], "the worker's decode span", 30
        )
        assert len(decode) == 1, receiver.snapshot()
        trace_id = decode[0][1]
        # Spans are exported as they end, each process on its own schedule: wait for the whole
        # trace (every service, and every parent a span names) before judging its shape.
        wanted = {"meshserve-gateway", "meshserve-router", "meshserve-worker"}

        def whole_trace() -> list[tuple[str, bytes, str, bytes, bytes]]:
            in_trace = [s for s in receiver.snapshot() if s[1] == trace_id]
            span_ids = {s[4] for s in in_trace}
            every_parent = all(s[3] in span_ids for s in in_trace if s[3])
            return in_trace if wanted <= {s[0] for s in in_trace} and every_parent else []

        # A parent that never arrives (a broken chain across a process boundary) fails here.
        in_trace = wait_for(whole_trace, f"the whole trace from {sorted(wanted)}", 30, details=receiver.snapshot)
        roots = [s for s in in_trace if not s[3]]
        assert [(r[0], r[2]) for r in roots] == [("meshserve-gateway", "/meshserve.v1.Inference/GenerateStream")]
        names = {s[2] for s in in_trace}
        assert {"/meshserve.v1.Router/Generate", "router.dispatch", "worker.sequence"} <= names
    finally:
        stop_processes(s.process for s in services.values())
        server.stop(0)
