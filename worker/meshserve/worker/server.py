"""The worker's gRPC service: proto <-> engine sequences. One model replica per process."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from opentelemetry.trace import Span, Status, StatusCode
from prometheus_client import CollectorRegistry

from meshserve.common.config import WorkerConfig
from meshserve.common.enums import FINISH_REASON_NAMES, priority_name, served_priority
from meshserve.common.errors import MeshError, grpc_errors, invalid_argument, status_code_name, unavailable
from meshserve.common.logs import current_request_id
from meshserve.common.metrics import new_registry
from meshserve.common.sampling import max_tokens_or_default, sampling_violations, token_id_violations
from meshserve.common.server import RunningServer, Servicer, start_server
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
from meshserve.common.tokenizer import ModelTokenizer, read_tokenizer_files
from meshserve.common.usage import token_usage
from meshserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from meshserve.worker.builtin_model import BUILTIN_MODEL_NAME, ensure_builtin_model
from meshserve.worker.engine import Engine, set_threads
from meshserve.worker.metrics import WorkerMetrics
from meshserve.worker.model_runner import ModelRunner
from meshserve.worker.sampler import resumed_generator
from meshserve.worker.sequence import (
    SamplingOptions,
    SequenceOutput,
    TokenLogprob,
)

log = logging.getLogger(__name__)

WATCH_HEARTBEAT_S = 1.0


class LoadedModel:
    def __init__(self, model_dir: Path, name: str, config: WorkerConfig) -> None:
        self.dir = model_dir
        self.name = name
        self.runner = ModelRunner(
            model_dir,
            config.dtype,
            block_size=config.block_size,
            kv_cache_memory=config.kv_cache_memory,
            kernels=config.kernels,
            model_impl=config.model_impl,
            compile=config.compile,
            max_batch=config.max_num_seqs,
        )
        seconds = self.runner.warm_up(lambda line: log.info("%s", line))
        if seconds:
            log.info("the decode step compiled in %.1f s (cached for the next start)", seconds)
        self.tokenizer = ModelTokenizer.from_dir(model_dir)
        self.engine = Engine(
            self.runner,
            self.tokenizer,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            prefix_caching=config.prefix_caching,
        )
        self.info = common_pb2.ModelInfo(
            name=name,
            max_context_length=self.runner.max_context_length,
            vocab_size=self.runner.vocab_size,
            eos_token_ids=sorted(self.runner.eos_token_ids),
            tokenizer_files=read_tokenizer_files(model_dir),
        )


class _SequenceTrace:
    """One sequence's prefill span (arrival to first token) and decode span (first token to the end),
    never a span per token, plus its latency metrics."""

    def __init__(self, request: common_pb2.TokenRequest, model: str, metrics: WorkerMetrics) -> None:
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
        self.prefill = tracer.start_span("worker.prefill", attributes=self.attributes)
        self.decode: Span | None = None
        self.generated = 0

    def tokens(self, count: int) -> None:
        now = time.monotonic()
        if self.decode is None:
            self.prefill.end()
            self.decode = tracer.start_span("worker.decode", attributes=self.attributes)
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
        if self.decode is not None:
            self.decode.set_attributes(
                {
                    GEN_AI_USAGE_OUTPUT_TOKENS: output.completion_tokens,
                    GEN_AI_RESPONSE_FINISH_REASONS: [FINISH_REASON_NAMES[output.finish] if output.finish else ""],
                    "meshserve.cached_prompt_tokens": output.cached_prompt_tokens,
                    "meshserve.preemptions": preemptions,
                }
            )

    def failed(self, exc: BaseException) -> None:
        self.outcome = exc
        span = self.decode or self.prefill
        span.set_status(Status(StatusCode.ERROR, f"{status_code_name(exc)}: {exc}"))

    def end(self) -> None:
        if self.decode is None:
            self.prefill.end()
        else:
            self.decode.set_attribute("meshserve.streamed_tokens", self.generated)
            self.decode.end()
        self.metrics.requests.labels(status_code_name(self.outcome)).inc()


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, metrics_registry: CollectorRegistry) -> None:
        self.model: LoadedModel | None = None
        self.metrics = WorkerMetrics(metrics_registry, lambda: self.model.engine.load() if self.model else None)

    def _loaded(self) -> LoadedModel:
        if self.model is None:
            raise MeshError(grpc.StatusCode.UNAVAILABLE, "the worker is still loading its model; retry shortly")
        return self.model

    @grpc_errors
    async def Generate(
        self, request: common_pb2.TokenRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.TokenChunk]:
        model = self._loaded()
        current_request_id.set(request.request_id)
        options = _validate(request, model)
        outputs: asyncio.Queue[SequenceOutput] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        prompt = list(request.prompt_token_ids)
        resumed = list(request.resume_token_ids)
        sequence = model.engine.new_sequence(
            request.request_id,
            prompt,
            options,
            emit=outputs.put_nowait,
            # Called on this loop: each engine step's outputs for all its streams come in one wake-up.
            loop=loop,
            priority=served_priority(request.priority),
            deadline=time.monotonic() + remaining if remaining is not None else None,
        )
        if resumed:  # failover: continue after the tokens the caller already has
            sequence.replay(resumed)
            if sequence.finished:
                raise invalid_argument([("resume_token_ids", "the sequence already ended within these tokens")])
            if not options.greedy:
                sequence.generator = resumed_generator(
                    options.seed, len(resumed), model.runner.vocab_size, device=model.runner.device
                )
        try:
            model.engine.submit(sequence)
        except RuntimeError as exc:
            raise unavailable(f"the worker is shutting down ({exc}); retry on another worker") from exc
        trace = _SequenceTrace(request, model.name, self.metrics)
        try:
            while True:
                output = await outputs.get()
                # Outputs that piled up while the client was slow leave as one message.
                while not outputs.empty() and output.finish is None:
                    output = _merge(output, outputs.get_nowait())
                if output.error:
                    raise MeshError(grpc.StatusCode.INTERNAL, output.error)
                trace.tokens(len(output.token_ids))
                yield _chunk(request, output)
                if output.finish is not None:
                    trace.finished(output, sequence.num_preemptions)
                    return
        except BaseException as exc:
            trace.failed(exc)
            raise
        finally:
            trace.end()
            # Client cancelled, deadline passed or server stopping: the engine drops it at the next step.
            if not sequence.finished:
                sequence.request_cancel()
                model.engine.wake()

    @grpc_errors
    async def DescribeModel(
        self, request: worker_pb2.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        return self._loaded().info

    @grpc_errors
    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadReport:
        return _load_report(self._loaded().engine.load())

    @grpc_errors
    async def WatchLoad(
        self, request: worker_pb2.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.LoadReport]:
        engine = self._loaded().engine
        interval = (request.interval_ms or 100) / 1000
        if interval < 0.01:
            raise invalid_argument([("interval_ms", "must be 0 (100 ms) or at least 10")])
        last, last_sent = None, 0.0
        while True:
            load = engine.load()
            # Tokens/s moves every step; only a change in what a scheduler acts on (or the heartbeat) is news.
            key = dataclasses.replace(load, tokens_per_second=0.0)
            if key != last or time.monotonic() - last_sent >= WATCH_HEARTBEAT_S:
                yield _load_report(load)
                last, last_sent = key, time.monotonic()
            if load.draining and load.running_sequences + load.waiting_sequences == 0:
                # Draining and idle: the subscriber has seen it; an open subscription would hold the server
                # (and the pod's termination) until the drain timeout.
                return
            await asyncio.sleep(interval)


def _load_report(load) -> worker_pb2.LoadReport:
    return worker_pb2.LoadReport(
        running_sequences=load.running_sequences,
        waiting_sequences=load.waiting_sequences,
        waiting_by_priority=load.waiting_by_priority,
        max_num_seqs=load.max_num_seqs,
        max_num_batched_tokens=load.max_num_batched_tokens,
        sequences_finished=load.sequences_finished,
        sequences_cancelled=load.sequences_cancelled,
        generated_tokens=load.generated_tokens,
        free_kv_blocks=load.free_kv_blocks,
        total_kv_blocks=load.total_kv_blocks,
        kv_block_size=load.kv_block_size,
        tokens_per_second=load.tokens_per_second,
        prefix_cache_hit_rate=load.prefix_cache_hit_rate,
        preemptions=load.preemptions,
        draining=load.draining,
    )


def _validate(request: common_pb2.TokenRequest, model: LoadedModel) -> SamplingOptions:
    """The worker trusts no caller: a request that reaches it directly gets the same checks."""
    prompt = request.prompt_token_ids
    violations = token_id_violations("prompt_token_ids", prompt, model.runner.vocab_size)
    if request.model and request.model != model.name:
        violations.append(("model", f"this worker serves {model.name!r}, not {request.model!r}"))
    sampling = request.sampling
    context = model.runner.max_context_length
    violations += sampling_violations(sampling, len(prompt), context, model.runner.vocab_size)
    if len(prompt) >= context:
        violations.append(("prompt_token_ids", f"{len(prompt)} tokens leave no room in the context of {context}"))
    resumed = request.resume_token_ids
    if resumed:
        violations += token_id_violations("resume_token_ids", resumed, model.runner.vocab_size)
        if sampling.HasField("max_tokens") and len(resumed) >= sampling.max_tokens:
            violations.append(("resume_token_ids", f"{len(resumed)} tokens leave none of max_tokens to generate"))
        if len(prompt) + len(resumed) >= context:
            violations.append(("resume_token_ids", "prompt + resumed tokens leave no room in the context"))
    if request.priority not in common_pb2.Priority.values():
        violations.append(("priority", f"unknown priority {request.priority}"))
    if violations:
        raise invalid_argument(violations)
    # The gateway always sets max_tokens; a direct caller that does not gets a short answer.
    max_tokens = max_tokens_or_default(sampling, 16, context - len(prompt))
    capacity = model.runner.kv.capacity_tokens
    if len(prompt) + max_tokens > capacity:
        raise MeshError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{len(prompt)} prompt tokens + {max_tokens} max_tokens exceed this worker's KV cache of {capacity} "
            "tokens; shorten the prompt, lower max_tokens, or give workers a larger --kv-cache-memory",
        )
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=sampling.temperature if sampling.HasField("temperature") else 1.0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty if sampling.HasField("repetition_penalty") else 1.0,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(s for s in sampling.stop if s),
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs,
        top_logprobs=sampling.top_logprobs,
        min_tokens=sampling.min_tokens,
        # Unset means true (proto3 optional), as in vLLM.
        skip_special_tokens=sampling.skip_special_tokens if sampling.HasField("skip_special_tokens") else True,
        spaces_between_special_tokens=(
            sampling.spaces_between_special_tokens if sampling.HasField("spaces_between_special_tokens") else True
        ),
        include_stop_str_in_output=sampling.include_stop_str_in_output,
    )


def _merge(first: SequenceOutput, second: SequenceOutput) -> SequenceOutput:
    return SequenceOutput(
        token_ids=first.token_ids + second.token_ids,
        text=first.text + second.text,
        finish=second.finish,
        prompt_tokens=second.prompt_tokens,
        completion_tokens=second.completion_tokens,
        cached_prompt_tokens=second.cached_prompt_tokens,
        error=second.error,
        logprobs=first.logprobs + second.logprobs,
    )


def _chunk(request: common_pb2.TokenRequest, output: SequenceOutput) -> common_pb2.TokenChunk:
    chunk = common_pb2.TokenChunk(
        request_id=request.request_id,
        index=request.index,
        token_ids=output.token_ids,
        text=output.text,
        logprobs=[_logprob(lp) for lp in output.logprobs],
    )
    if output.finish is not None:
        chunk.finish_reason = output.finish
        chunk.usage.CopyFrom(token_usage(output.prompt_tokens, output.completion_tokens, output.cached_prompt_tokens))
    return chunk


def _logprob(logprob: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=logprob.token_id,
        logprob=logprob.logprob,
        top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top],
    )


async def start_worker(config: WorkerConfig) -> RunningServer:
    """Starts serving at once (health NOT_SERVING), loads the model, then reports SERVING."""
    registry = new_registry()
    servicer = WorkerServicer(registry)
    running = await start_server(
        config.host,
        config.port,
        [Servicer.of(servicer, worker_pb2, worker_pb2_grpc, "Worker")],
        serving=False,
        metrics=registry,
    )
    threads = set_threads(config.threads)
    model_dir = Path(config.model) if config.model else await asyncio.to_thread(ensure_builtin_model)
    if not (model_dir / "config.json").exists():
        await running.stop(0)
        raise SystemExit(f"meshserve: {model_dir} is not a Hugging Face model directory (no config.json)")
    name = config.model_name or (BUILTIN_MODEL_NAME if not config.model else model_dir.name)
    try:
        model = await asyncio.to_thread(LoadedModel, model_dir, name, config)
    except ValueError as exc:  # a bad setting (dtype, KV-cache size): say which, not a traceback
        await running.stop(0)
        raise SystemExit(f"meshserve: {exc}") from exc
    servicer.model = model
    model.engine.on_step = servicer.metrics.batch_size.observe
    model.engine.start()
    running.on_drain.append(model.engine.start_draining)

    async def stop_engine() -> None:
        await asyncio.to_thread(model.engine.stop)

    running.on_stop.append(stop_engine)
    await running.set_serving(True)
    runner = model.runner
    log.info("worker loaded %s from %s (%s path, %s, %d threads)", name, model_dir, runner.impl, runner.dtype, threads)
    return running
