"""One sequence's telemetry on the worker: a span for all of it with a prefill span (arrival to first token)
and a decode span (first token to the end) under it, never a span per token, plus its latency metrics."""

from __future__ import annotations

import time

from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode, set_span_in_context

from meshserve.common.enums import FINISH_REASON_NAMES, priority_name
from meshserve.common.errors import status_code_name
from meshserve.common.telemetry import (
    GEN_AI_OPERATION_NAME,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_SYSTEM,
    GEN_AI_SYSTEM_NAME,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    tracer,
)
from meshserve.v1 import common_pb2
from meshserve.worker.metrics import WorkerMetrics
from meshserve.worker.sequence import Sequence, SequenceOutput


class SequenceTrace:
    def __init__(
        self, request: common_pb2.TokenRequest, model: str, metrics: WorkerMetrics, parent: Context | None
    ) -> None:
        self.metrics = metrics
        self.priority = priority_name(request.priority)
        self.started = self.last = time.monotonic()
        self.outcome: BaseException | None = None
        self.attributes = {
            GEN_AI_OPERATION_NAME: "text_completion",
            GEN_AI_SYSTEM: GEN_AI_SYSTEM_NAME,
            GEN_AI_REQUEST_MODEL: model,
            GEN_AI_USAGE_INPUT_TOKENS: len(request.prompt_token_ids),
            "meshserve.priority": self.priority,
            "meshserve.resumed_tokens": len(request.resume_token_ids),
        }
        # The caller's span (router.dispatch) came inside the submission: the stream it rode is shared.
        self.span = tracer.start_span("worker.sequence", context=parent, attributes=self.attributes)
        self._inside = set_span_in_context(self.span)
        self.prefill = tracer.start_span("worker.prefill", context=self._inside)
        self.decode: Span | None = None
        self.generated = 0

    def tokens(self, count: int, sequence: Sequence | None = None) -> None:
        now = time.monotonic()
        if self.decode is None:
            if sequence is not None and sequence.first_token_step is not None:
                # In engine steps: how soon it started and how long its prefill took, whatever the machine's speed.
                steps = {
                    "meshserve.engine.arrival_step": sequence.added_step,
                    "meshserve.engine.prefill_start_step": sequence.first_scheduled_step,
                    "meshserve.engine.first_token_step": sequence.first_token_step,
                }
                self.span.set_attributes({k: v for k, v in steps.items() if v is not None})
            self.prefill.end()
            self.decode = tracer.start_span("worker.decode", context=self._inside, attributes=self.attributes)
            self.metrics.time_to_first_token.labels(self.priority).observe(now - self.started)
            for _ in range(count - 1):  # tokens that came with the first, in the same engine step's message
                self.metrics.inter_token_latency.observe(0.0)
        elif count:
            for _ in range(count):  # per token, so the histogram counts tokens, not messages
                self.metrics.inter_token_latency.observe((now - self.last) / count)
        self.last = now
        self.generated += count

    def finished(self, output: SequenceOutput, preemptions: int) -> None:
        self.metrics.prompt_tokens.inc(output.prompt_tokens)
        self.metrics.cached_prompt_tokens.inc(output.cached_prompt_tokens)
        outcome = {
            GEN_AI_USAGE_OUTPUT_TOKENS: output.completion_tokens,
            GEN_AI_RESPONSE_FINISH_REASONS: [FINISH_REASON_NAMES[output.finish] if output.finish else ""],
            "meshserve.cached_prompt_tokens": output.cached_prompt_tokens,
            "meshserve.preemptions": preemptions,
        }
        for span in (self.span, self.decode):
            if span is not None:
                span.set_attributes(outcome)

    def failed(self, exc: BaseException) -> None:
        self.outcome = exc
        self.span.set_status(Status(StatusCode.ERROR, f"{status_code_name(exc)}: {exc}"))

    def end(self) -> None:
        if self.decode is None:
            self.prefill.end()
        else:
            self.decode.end()
        self.span.set_attribute("meshserve.streamed_tokens", self.generated)
        self.span.end()
        self.metrics.requests.labels(status_code_name(self.outcome)).inc()
