"""The worker's gRPC service: proto <-> engine sequences. One model replica per process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from meshserve.config import WorkerConfig
from meshserve.errors import MeshError, grpc_errors, invalid_argument, unavailable
from meshserve.logs import current_request_id
from meshserve.sampling import sampling_violations, token_id_violations
from meshserve.server import RunningServer, Servicer, start_server
from meshserve.tokenizer import ModelTokenizer, read_tokenizer_files
from meshserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from meshserve.worker.builtin_model import BUILTIN_MODEL_NAME, ensure_builtin_model
from meshserve.worker.engine import Engine, set_threads
from meshserve.worker.model_runner import ModelRunner
from meshserve.worker.sequence import Finish, SamplingOptions, Sequence, SequenceOutput

log = logging.getLogger(__name__)

FINISH_REASONS = {
    Finish.STOP: common_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    Finish.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    Finish.ERROR: common_pb2.FINISH_REASON_ERROR,
}


class LoadedModel:
    def __init__(self, model_dir: Path, name: str, dtype: str, max_num_seqs: int) -> None:
        self.dir = model_dir
        self.name = name
        self.runner = ModelRunner(model_dir, dtype)
        self.tokenizer = ModelTokenizer.from_dir(model_dir)
        self.engine = Engine(self.runner, max_num_seqs)
        self.info = common_pb2.ModelInfo(
            name=name,
            max_context_length=self.runner.max_context_length,
            vocab_size=self.runner.vocab_size,
            eos_token_ids=sorted(self.runner.eos_token_ids),
            tokenizer_files=read_tokenizer_files(model_dir),
        )


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self) -> None:
        self.model: LoadedModel | None = None

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
        sequence = Sequence(
            request_id=request.request_id,
            prompt_ids=list(request.prompt_token_ids),
            options=options,
            detokenizer=model.tokenizer.detokenizer(request.prompt_token_ids),
            eos_token_ids=model.runner.eos_token_ids,
            max_context_length=model.runner.max_context_length,
            emit=lambda output: loop.call_soon_threadsafe(outputs.put_nowait, output),
        )
        try:
            model.engine.submit(sequence)
        except RuntimeError as exc:
            raise unavailable(f"the worker is shutting down ({exc}); retry on another worker") from exc
        try:
            while True:
                output = await outputs.get()
                # Outputs that piled up while the client was slow leave as one message.
                while not outputs.empty() and output.finish is None:
                    output = _merge(output, outputs.get_nowait())
                if output.error:
                    raise MeshError(grpc.StatusCode.INTERNAL, output.error)
                yield _chunk(request, output)
                if output.finish is not None:
                    return
        finally:
            # Client cancelled, deadline passed or server stopping: the engine drops it at the next step.
            sequence.request_cancel()

    @grpc_errors
    async def DescribeModel(
        self, request: worker_pb2.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        return self._loaded().info

    @grpc_errors
    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadReport:
        load = self._loaded().engine.load()
        return worker_pb2.LoadReport(
            running_sequences=load.running_sequences,
            waiting_sequences=load.waiting_sequences,
            max_num_seqs=load.max_num_seqs,
            sequences_finished=load.sequences_finished,
            sequences_cancelled=load.sequences_cancelled,
            generated_tokens=load.generated_tokens,
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
    if violations:
        raise invalid_argument(violations)
    return SamplingOptions(
        # The gateway always sets max_tokens; a direct caller that does not gets a short answer.
        max_tokens=sampling.max_tokens if sampling.HasField("max_tokens") else max(1, min(16, context - len(prompt))),
        temperature=sampling.temperature if sampling.HasField("temperature") else 1.0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(s for s in sampling.stop if s),
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
    )


def _merge(first: SequenceOutput, second: SequenceOutput) -> SequenceOutput:
    return SequenceOutput(
        token_ids=first.token_ids + second.token_ids,
        text=first.text + second.text,
        finish=second.finish,
        prompt_tokens=second.prompt_tokens,
        completion_tokens=second.completion_tokens,
        error=second.error,
    )


def _chunk(request: common_pb2.TokenRequest, output: SequenceOutput) -> common_pb2.TokenChunk:
    chunk = common_pb2.TokenChunk(
        request_id=request.request_id, index=request.index, token_ids=output.token_ids, text=output.text
    )
    if output.finish is not None:
        chunk.finish_reason = FINISH_REASONS[output.finish]
        chunk.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=output.prompt_tokens,
                completion_tokens=output.completion_tokens,
                total_tokens=output.prompt_tokens + output.completion_tokens,
            )
        )
    return chunk


async def start_worker(config: WorkerConfig) -> RunningServer:
    """Starts serving at once (health NOT_SERVING), loads the model, then reports SERVING."""
    servicer = WorkerServicer()
    running = await start_server(
        config.host,
        config.port,
        [
            Servicer(
                servicer,
                worker_pb2_grpc.add_WorkerServicer_to_server,
                worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,
            )
        ],
        serving=False,
    )
    threads = set_threads(config.threads)
    model_dir = Path(config.model) if config.model else await asyncio.to_thread(ensure_builtin_model)
    if not (model_dir / "config.json").exists():
        await running.stop(0)
        raise SystemExit(f"meshserve: {model_dir} is not a Hugging Face model directory (no config.json)")
    name = config.model_name or (BUILTIN_MODEL_NAME if not config.model else model_dir.name)
    servicer.model = await asyncio.to_thread(LoadedModel, model_dir, name, config.dtype, config.max_num_seqs)
    servicer.model.engine.start()

    async def stop_engine() -> None:
        assert servicer.model is not None
        await asyncio.to_thread(servicer.model.engine.stop)

    running.on_stop.append(stop_engine)
    await running.set_serving(True)
    log.info("worker loaded %s from %s (%d threads)", name, model_dir, threads)
    return running
