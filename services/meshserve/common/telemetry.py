"""OpenTelemetry tracing shared by every service: setup from OTEL_* variables, gRPC interceptors, GenAI names.

W3C trace context crosses every gRPC hop through the interceptors that `start_server` and `aio_channel`
install, so one request is one trace from the gateway to the worker. Long-lived streams (a router's shared
stream to a worker, health checks, reflection) are left out: a trace per request, not per connection; the
shared stream carries each sequence's trace context inside its submission instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

log = logging.getLogger(__name__)

TRACE_EXPORTERS = ("none", "console", "otlp")

# GenAI semantic conventions (https://opentelemetry.io/docs/specs/semconv/gen-ai/), as plain strings:
# the incubating module that holds them changes names between releases.
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_SYSTEM_NAME = "meshserve"

# Untraced: streams that live as long as a connection (a router's shared stream to a worker), probes and reflection.
_UNTRACED_METHOD = "/Connect"
_UNTRACED_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _traced(details: grpc.HandlerCallDetails | grpc.aio.ClientCallDetails) -> bool:
    """Whether a call gets spans. Runs on every call of every service, so a suffix and a prefix test on its
    method name: opentelemetry's composed filters cost several runtime Protocol checks per call."""
    method = details.method
    if isinstance(method, bytes):  # an aio client's call details carry bytes (grpc/grpc#31092)
        method = method.decode()
    return not (method.endswith(_UNTRACED_METHOD) or method.startswith(_UNTRACED_SERVICES))


tracer = trace.get_tracer("meshserve")


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """A span per RPC, continued from the caller's `traceparent` metadata."""
    return [aio_server_interceptor(filter_=_traced)]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A client span per call, and `traceparent` sent in the call's metadata."""
    return list(aio_client_interceptors(filter_=_traced))


def setup_tracing(service: str, exporter: str = "", processor: SpanProcessor | None = None) -> Callable[[], None]:
    """Installs the process's tracer provider; returns the function that flushes and stops it.

    `exporter` is none, console or otlp; empty means from OTEL_TRACES_EXPORTER, else otlp when
    OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set, else none. OTLP speaks gRPC unless
    OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL says http/protobuf; the sampler comes from OTEL_TRACES_SAMPLER(_ARG)
    (default: parent-based, always on) and the service name from OTEL_SERVICE_NAME (default meshserve-SERVICE).
    """
    chosen = exporter or _exporter_from_environment()
    if chosen not in TRACE_EXPORTERS:
        raise SystemExit(f"meshserve: unknown trace exporter {chosen!r}; use {', '.join(TRACE_EXPORTERS)}")
    if chosen == "none" and processor is None:
        return lambda: None
    name = os.environ.get("OTEL_SERVICE_NAME") or f"meshserve-{service}"
    resource = Resource.create({"service.name": name, "service.namespace": "meshserve"})
    provider = TracerProvider(resource=resource)
    if chosen != "none":
        provider.add_span_processor(BatchSpanProcessor(_span_exporter(chosen)))
    if processor is not None:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    log.info("tracing with the %s exporter as %s", chosen, resource.attributes["service.name"])
    return provider.shutdown


def _exporter_from_environment() -> str:
    configured = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if configured:
        return configured.split(",")[0]
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return "otlp"
    return "none"


def _span_exporter(kind: str) -> SpanExporter:
    if kind == "console":
        return ConsoleSpanExporter()
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter()
    raise SystemExit(f"meshserve: OTLP protocol {protocol!r} is not supported; use grpc or http/protobuf")


def current_trace_ids() -> tuple[str, str]:
    """The current trace and span ids as hex (empty strings outside a sampled span), for log lines."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
