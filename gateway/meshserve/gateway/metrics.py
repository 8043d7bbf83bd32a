"""The gateway's Prometheus metrics and its GenAI span: what a caller of the mesh experiences, per request.

One `RequestObserver` follows one request from either API (gRPC or HTTP): time to first token,
inter-token latency, end-to-end latency, tokens and outcome, labelled by model and priority class.
Each class's recent TTFTs (p50, p99) and, with `--slo-ttft`, the share that met its objective are
gauges, as the caller saw them (the router exports the same from where it stands).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry.context import Context
from opentelemetry.propagate import extract
from opentelemetry.trace import Span, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram

from meshserve.common.enums import FINISH_REASON_NAMES, priority_name
from meshserve.common.errors import status_code_name
from meshserve.common.metrics import INTER_TOKEN_BUCKETS, LATENCY_BUCKETS
from meshserve.common.objectives import ObjectiveCollector, RecentLatencies
from meshserve.common.telemetry import (
    GEN_AI_OPERATION_NAME,
    GEN_AI_REQUEST_CHOICE_COUNT,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_ID,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_SYSTEM,
    GEN_AI_SYSTEM_NAME,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    tracer,
)
from meshserve.v1 import common_pb2, inference_pb2


def operation_name(request: inference_pb2.GenerateRequest) -> str:
    """The GenAI operation of a request: chat for messages, text_completion for a prompt, tokens or a fan-out."""
    return "chat" if request.WhichOneof("input") == "messages" else "text_completion"


RECENT_WINDOW_S = 60.0


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, objectives: dict[int, float] | None = None) -> None:
        labels = ["model", "priority"]
        self.recent_ttft = RecentLatencies(RECENT_WINDOW_S, samples=1024)
        registry.register(ObjectiveCollector("meshserve_gateway", "at the gateway", objectives or {}, self.recent_ttft))
        self.requests = Counter(
            "meshserve_gateway_requests",
            "Requests answered, by model, priority class, gRPC status code and API (grpc or http)",
            ["model", "priority", "code", "api"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "meshserve_gateway_time_to_first_token_seconds",
            "From the request reaching the gateway to its first generated token",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "meshserve_gateway_inter_token_latency_seconds",
            "Time between consecutive tokens of one completion, as the caller receives them",
            labels,
            buckets=INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "meshserve_gateway_request_duration_seconds",
            "End-to-end latency of a request, from arrival to its last byte",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "meshserve_gateway_prompt_tokens", "Prompt tokens of accepted requests", ["model"], registry=registry
        )
        self.completion_tokens = Counter(
            "meshserve_gateway_completion_tokens", "Tokens generated for callers", ["model"], registry=registry
        )

    @contextmanager
    def observe(self, api: str, operation: str, headers: Mapping[str, str] | None = None) -> Iterator[RequestObserver]:
        """Follows one request; whatever ends the block (return, error, cancellation) is its outcome.

        `headers`: an HTTP request's headers, so a caller's W3C `traceparent` continues its own trace
        (gRPC calls get theirs from the server interceptor).
        """
        observer = RequestObserver(self, api, operation, extract(headers) if headers else None)
        try:
            yield observer
        except BaseException as exc:
            observer.end(exc)
            raise
        observer.end(observer.outcome)


class RequestObserver:
    def __init__(self, metrics: GatewayMetrics, api: str, operation: str, parent: Context | None = None) -> None:
        self.metrics = metrics
        self.api = api
        self.operation = operation
        self.model = ""
        self.priority = "normal"
        self.priority_value = common_pb2.PRIORITY_NORMAL
        self.started = time.monotonic()
        self.last_token: dict[int, float] = {}  # per completion index
        self._inter_token: Any = None  # the inter-token histogram of its model and priority, once accepted
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reasons: list[str] = []
        # An error the caller was told of without an exception reaching `observe` (an SSE error event).
        self.outcome: BaseException | None = None
        # Named as the GenAI conventions ask ("{operation} {model}") once the model is known.
        self.span: Span = tracer.start_span(
            operation,
            context=parent,
            attributes={
                GEN_AI_OPERATION_NAME: operation,
                GEN_AI_SYSTEM: GEN_AI_SYSTEM_NAME,
                "meshserve.api": api,
            },
        )

    def accepted(self, request: common_pb2.TokenRequest, model: str, choices: int) -> None:
        """The request was admitted as `request`: from here on it is labelled by model and priority."""
        self.model = model
        self.priority = priority_name(request.priority)
        self.priority_value = request.priority
        # Looked up once: every token observes it.
        self._inter_token = self.metrics.inter_token_latency.labels(model, self.priority)
        self.prompt_tokens = len(request.prompt_token_ids)
        self.span.update_name(f"{self.operation} {model}")
        self.span.set_attributes(
            {
                GEN_AI_REQUEST_MODEL: model,
                GEN_AI_RESPONSE_MODEL: model,
                GEN_AI_RESPONSE_ID: request.client_request_id or request.request_id,
                "meshserve.request_id": request.request_id,
                GEN_AI_USAGE_INPUT_TOKENS: self.prompt_tokens,
                GEN_AI_REQUEST_CHOICE_COUNT: choices,
                GEN_AI_REQUEST_MAX_TOKENS: request.sampling.max_tokens,
                "meshserve.priority": self.priority,
                "meshserve.tenant": request.tenant,
            }
        )

    def tokens(self, index: int, count: int, finish_reason: int = 0) -> None:
        if not count and not finish_reason:
            return
        now = time.monotonic()
        if count:
            if not self.last_token:
                self.metrics.time_to_first_token.labels(self.model, self.priority).observe(now - self.started)
                self.metrics.recent_ttft.observe(self.priority_value, now - self.started)
                self.span.add_event("first token")
            previous = self.last_token.get(index)
            # Per token, so the histogram counts tokens, not messages: a completion's first message starts its
            # clock, and tokens that came with its first one arrived with no wait.
            intervals, gap = (count - 1, 0.0) if previous is None else (count, (now - previous) / count)
            for _ in range(intervals):
                self._inter_token.observe(gap)
            self.last_token[index] = now
            self.completion_tokens += count
        if finish_reason:
            self.finish_reasons.append(FINISH_REASON_NAMES.get(finish_reason, "unknown"))

    def end(self, outcome: BaseException | None) -> None:
        code = status_code_name(outcome)
        model = self.model or "unknown"
        self.metrics.requests.labels(model, self.priority, code, self.api).inc()
        if self.model:
            self.metrics.request_duration.labels(model, self.priority).observe(time.monotonic() - self.started)
            self.metrics.prompt_tokens.labels(model).inc(self.prompt_tokens)
            self.metrics.completion_tokens.labels(model).inc(self.completion_tokens)
        self.span.set_attributes(
            {
                GEN_AI_USAGE_OUTPUT_TOKENS: self.completion_tokens,
                GEN_AI_RESPONSE_FINISH_REASONS: self.finish_reasons,
                "rpc.grpc.status_code_name": code,
            }
        )
        if outcome is not None:
            self.span.set_status(Status(StatusCode.ERROR, f"{code}: {outcome}"))
        self.span.end()
