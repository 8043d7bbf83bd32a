"""What both of the gateway's APIs (gRPC and the OpenAI-compatible HTTP) do with a request: authenticate,
admit (priority ceiling, rate limits, validation), send it into the mesh, relay and sum up what comes back.

It knows nothing of either API's wire format: gateway/server.py (gRPC) and gateway/http_server.py (HTTP)
translate and call it, so both share one path for validation, limits and the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from meshserve.common.config import GatewayConfig
from meshserve.common.errors import MeshError, for_clients, not_found
from meshserve.common.logs import current_client_request_id, current_request_id
from meshserve.common.metrics import new_registry
from meshserve.common.models import ModelCatalog
from meshserve.common.objectives import parse_ttft_objectives
from meshserve.common.usage import outputs_usage
from meshserve.gateway.auth import KeyStore, Tenant
from meshserve.gateway.mesh_client import MeshClient
from meshserve.gateway.metrics import GatewayMetrics, RequestObserver
from meshserve.gateway.rate_limit import RateLimiter, Reservation
from meshserve.gateway.tools import ToolCallStream
from meshserve.gateway.validation import ValidatedRequest, validate
from meshserve.v1 import common_pb2, inference_pb2

log = logging.getLogger(__name__)

LIST_MODELS_TTL_S = 2.0


class Infer:
    """The gateway's request path, shared by its gRPC servicer (a subclass) and its HTTP API."""

    def __init__(
        self,
        config: GatewayConfig,
        catalog: ModelCatalog,
        mesh: MeshClient,
        keys: KeyStore | None = None,
        limits: RateLimiter | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.mesh = mesh
        self.keys = keys or KeyStore()
        self.limits = limits or RateLimiter()
        self.metrics = GatewayMetrics(metrics_registry or new_registry(), parse_ttft_objectives(config.slo_ttft))

    def authenticate(self, authorization: str | None) -> Tenant:
        """The caller's tenant; UNAUTHENTICATED before anything reaches the router."""
        return self.keys.authenticate(authorization)

    async def admit(
        self, request: inference_pb2.GenerateRequest, tenant: Tenant, observer: RequestObserver | None = None
    ) -> Admission:
        """Priority ceiling, requests/s, validation, then tokens/min: a request that passes may run.

        `observer` (from `metrics.observe`) follows it from here: metrics by model and priority, its span.
        """
        priority = tenant.priority_for(request.priority)
        self.limits.admit(tenant)
        validated = await self._validate(request)
        validated.token_request.tenant = tenant.name
        validated.token_request.priority = priority
        validated.token_request.cache_salt = cache_salt(self.config.prefix_cache_scope, tenant.name, request.cache_salt)
        reservation = self.limits.reserve(tenant, _token_budget(request, validated))
        if observer is not None:
            observer.accepted(validated.token_request, validated.model.name, max(validated.n, request.best_of))
        if self.config.log_text:
            log.info("request text", extra={"fields": {"prompts": _prompt_texts(request, validated)}})
        return Admission(validated, tenant, reservation, observer)

    async def stream(
        self, admission: Admission, timeout: float | None
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        validated = admission.validated
        prompt_tokens = len(validated.token_request.prompt_token_ids)
        used = validated.prompt_tokens  # then what was generated, as it comes: a cancelled stream pays for it
        finished: list[common_pb2.Usage] = []
        final = False  # a fan-out ends with its own, with the usage the aggregator counted
        texts: dict[int, list[str]] = {}
        try:
            async for message in self._mesh_stream(validated, timeout, admission.observer):
                if message.final:
                    final, used = True, message.usage.total_tokens
                else:
                    used += len(message.token_ids)
                if message.finish_reason:
                    finished.append(message.usage)
                if self.config.log_text and message.text:
                    texts.setdefault(message.index, []).append(message.text)
                yield message
            if not final:
                usage = outputs_usage(prompt_tokens, finished)
                used = usage.total_tokens
                yield inference_pb2.GenerateStreamResponse(request_id=validated.response_id, usage=usage, final=True)
        finally:
            admission.reservation.settle(used)
            if self.config.log_text:
                _log_output({index: "".join(parts) for index, parts in texts.items()})

    async def complete(self, admission: Admission, timeout: float | None) -> inference_pb2.GenerateResponse:
        # Counted as the tokens come, so a call cancelled half way is charged what it was generated.
        spent = Spent(admission.validated.prompt_tokens)
        try:
            reply = await self._complete(admission.validated, timeout, admission.observer, spent)
            spent.tokens = reply.usage.total_tokens
            if self.config.log_text:
                _log_output({c.index: c.text for c in reply.completions})
            return reply
        finally:
            admission.reservation.settle(spent.tokens)

    async def list_models(self, include_tokenizer_files: bool = False) -> list[common_pb2.ModelInfo]:
        # From the catalog, read again at most every LIST_MODELS_TTL_S: a caller listing in a loop costs the
        # router nothing more.
        await self.catalog.refresh_if_older(LIST_MODELS_TTL_S)
        models = []
        for served in self.catalog.models.values():
            info = common_pb2.ModelInfo()
            info.CopyFrom(served.info)  # a copy: the catalog's own keeps its tokenizer files
            if not include_tokenizer_files:
                info.ClearField("tokenizer_files")
            models.append(info)
        return models

    async def _complete(
        self, validated: ValidatedRequest, timeout: float | None, observer: RequestObserver | None, spent: Spent
    ) -> inference_pb2.GenerateResponse:
        # By index: a fan-out may leave indices out (dedupe) and finish them in any order.
        completions: dict[int, inference_pb2.Completion] = {}
        texts: dict[int, list[str]] = {}
        calls: dict[int, dict[int, common_pb2.ToolCall]] = {}
        total: common_pb2.Usage | None = None
        async for message in self._mesh_stream(validated, timeout, observer):
            if message.final:
                total = message.usage
                continue
            spent.tokens += len(message.token_ids)
            completion = completions.setdefault(message.index, inference_pb2.Completion(index=message.index))
            completion.token_ids.extend(message.token_ids)
            completion.logprobs.extend(message.logprobs)
            texts.setdefault(message.index, []).append(message.text)
            for delta in message.tool_calls:  # a call's pieces: id and name first, arguments in parts
                call = calls.setdefault(message.index, {}).setdefault(
                    delta.index, common_pb2.ToolCall(index=delta.index)
                )
                call.id, call.name = call.id or delta.id, call.name or delta.name
                call.arguments += delta.arguments
            if message.HasField("error"):
                completion.errors.append(message.error)
            if message.HasField("mean_logprob"):
                completion.mean_logprob = message.mean_logprob
            if message.finish_reason:
                completion.finish_reason = message.finish_reason
                completion.usage.CopyFrom(message.usage)
        ordered = [completions[index] for index in sorted(completions)]
        cut = [c for c in ordered if c.finish_reason == common_pb2.FINISH_REASON_CANCELLED]
        if cut:  # a whole answer cannot be cut short: a unary caller's only cancel is its deadline
            tokens = sum(len(c.token_ids) for c in cut)
            raise MeshError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"the deadline passed after {tokens} tokens were generated"
            )
        for completion in ordered:
            completion.text = "".join(texts[completion.index])
            completion.tool_calls.extend(call for _, call in sorted(calls.get(completion.index, {}).items()))
        prompt_tokens = len(validated.token_request.prompt_token_ids)
        return inference_pb2.GenerateResponse(
            request_id=validated.response_id,
            model=validated.model.name,
            completions=ordered,
            usage=total if total is not None else outputs_usage(prompt_tokens, [c.usage for c in ordered]),
        )

    async def _validate(self, request: inference_pb2.GenerateRequest) -> ValidatedRequest:
        if request.model:
            await self.catalog.refresh_if_unknown(request.model)
            if request.model not in self.catalog.models:
                available = ", ".join(sorted(self.catalog.models)) or "none yet (the workers are still starting)"
                raise not_found("model", f"unknown model {request.model[:200]!r}; available: {available}")
        model = self.catalog.resolve(request.model)
        # In a thread: tokenising a long prompt or rendering a chat template must not stall other streams.
        validated = await asyncio.to_thread(validate, request, model, self.config.default_max_tokens, self.config.max_n)
        current_request_id.set(validated.token_request.request_id)
        current_client_request_id.set(validated.token_request.client_request_id)
        return validated

    async def _mesh_stream(
        self, validated: ValidatedRequest, timeout: float | None, observer: RequestObserver | None
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        """A single output goes to the router; a fan-out to the aggregator, which sends its sub-requests through
        the router. Either way the messages come as the public ones (mesh_client), given the request id here."""
        request_id, response_id = validated.token_request.request_id, validated.response_id
        # The request's span is the parent of its calls into the mesh (the current context otherwise).
        parent = trace.set_span_in_context(observer.span) if observer is not None else otel_context.get_current()
        if validated.fan_out is None:
            stream = self.mesh.generate(validated.token_request, timeout, parent)
        else:
            # The parent as admitted (tenant, priority), which may differ from what validation saw.
            validated.fan_out.request.CopyFrom(validated.token_request)
            stream = self.mesh.fan_out(validated.fan_out, timeout, parent)
        # With tools, each index's output is read as calls (gateway/tools.py) before anyone sees it.
        readers: dict[int, ToolCallStream] = {}
        # Our consumer stopped or was cancelled: closing the stream cancels its call.
        async with contextlib.aclosing(stream):
            async for message in stream:
                message.request_id = response_id
                if message.HasField("error"):  # one index's failure, relayed in the stream (best_effort)
                    message.error.CopyFrom(for_clients(MeshError.of_status(message.error), request_id).error_status())
                if validated.tools is not None and not message.final:
                    readers.setdefault(message.index, ToolCallStream(validated.tools)).read(message)
                if observer is not None and not message.final:
                    observer.tokens(message.index, len(message.token_ids), message.finish_reason)
                yield message


@dataclass
class Spent:
    """Tokens a request has cost so far."""

    tokens: int


@dataclass
class Admission:
    """A request that passed authentication, validation and its tenant's limits."""

    validated: ValidatedRequest
    tenant: Tenant
    reservation: Reservation
    observer: RequestObserver | None = None


LOGGED_TEXT_CHARS = 4000  # per text, with --log-text: enough to debug, not a copy of a book


def _prompt_texts(request: inference_pb2.GenerateRequest, validated: ValidatedRequest) -> list[str]:
    """What the model is asked, as text: the prompt as tokenised (chat template applied), or each input."""
    tokenizer = validated.model.tokenizer
    if validated.token_request.prompt_token_ids:
        texts = [tokenizer.decode(validated.token_request.prompt_token_ids, skip_special_tokens=False)]
    elif request.HasField("map_reduce"):
        texts = [request.map_reduce.text]
    else:  # a batch, tokenised for the aggregator
        inputs = validated.fan_out.inputs if validated.fan_out is not None else []
        texts = [tokenizer.decode(item.prompt_token_ids, skip_special_tokens=False) for item in inputs]
    return [text[:LOGGED_TEXT_CHARS] for text in texts]


def _log_output(texts: dict[int, str]) -> None:
    outputs = {str(index): text[:LOGGED_TEXT_CHARS] for index, text in sorted(texts.items())}
    log.info("generated text", extra={"fields": {"outputs": outputs}})


def cache_salt(scope: str, tenant: str, caller_salt: str) -> str:
    """The salt a request's prompt blocks are cached under: its tenant's (unless the operator shares the cache),
    narrowed by the caller's own. Tenant names cannot hold NUL, so no two (tenant, salt) pairs meet."""
    return f"{tenant}\0{caller_salt}" if scope == "tenant" else caller_salt


def _token_budget(request: inference_pb2.GenerateRequest, validated: ValidatedRequest) -> int:
    """The most tokens a request may use: its prompts (a batch's or a map-reduce's too) and max_tokens for every
    completion it generates."""
    completions = max(validated.n, request.best_of)
    inputs = max(1, len(request.batch.inputs))
    return validated.prompt_tokens + inputs * completions * validated.token_request.sampling.max_tokens
