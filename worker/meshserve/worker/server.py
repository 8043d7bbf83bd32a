"""The worker's gRPC service, one model replica per process: a router's stream (worker/link.py) over the
engine, the model's description and its load."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import llguidance
from prometheus_client import CollectorRegistry

from meshserve.common.config import WorkerConfig
from meshserve.common.errors import MeshError, grpc_errors
from meshserve.common.metrics import new_registry
from meshserve.common.server import RunningServer, Servicer, start_server
from meshserve.common.tls import mesh_tls
from meshserve.common.tokenizer import ModelTokenizer, read_tokenizer_files
from meshserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from meshserve.worker.builtin_model import BUILTIN_MODEL_NAME, ensure_builtin_model
from meshserve.worker.engine_core import EngineSpec
from meshserve.worker.engine_process import EngineProcess
from meshserve.worker.link import Link
from meshserve.worker.metrics import WorkerMetrics
from meshserve.worker.protocol import ModelLimits, load_report

log = logging.getLogger(__name__)


class LoadedModel:
    def __init__(self, model_dir: Path, name: str, config: WorkerConfig) -> None:
        self.dir = model_dir
        self.name = name
        self.tokenizer = ModelTokenizer.from_dir(model_dir)
        spec = EngineSpec(
            str(model_dir),
            config.dtype,
            config.block_size,
            config.kv_cache_memory,
            config.kernels,
            config.model_impl,
            config.compile,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.prefix_caching,
            config.threads,
        )
        self.engine = EngineProcess(spec, self.tokenizer, config.engine_stall_seconds)
        self.facts = self.engine.start(lambda line: log.info("%s", line))
        if self.facts.compile_seconds:
            log.info("the decode step compiled in %.1f s (cached for the next start)", self.facts.compile_seconds)
        grammar_tokenizer = llguidance.LLTokenizer(
            (model_dir / "tokenizer.json").read_text(),
            n_vocab=self.facts.vocab_size,
            eos_token=sorted(self.facts.eos_token_ids),
        )
        self.limits = ModelLimits(
            name,
            self.facts.vocab_size,
            self.facts.max_context_length,
            self.facts.kv_capacity_tokens,
            grammar_tokenizer,
        )
        self.info = common_pb2.ModelInfo(
            name=name,
            max_context_length=self.facts.max_context_length,
            vocab_size=self.facts.vocab_size,
            eos_token_ids=sorted(self.facts.eos_token_ids),
            tokenizer_files=read_tokenizer_files(model_dir),
        )


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, metrics_registry: CollectorRegistry, stream_interval: int = 1) -> None:
        self.model: LoadedModel | None = None
        self.stream_interval = stream_interval
        self.metrics = WorkerMetrics(metrics_registry, lambda: self.model.engine.load() if self.model else None)

    def _loaded(self) -> LoadedModel:
        if self.model is None:
            raise MeshError(grpc.StatusCode.UNAVAILABLE, "the worker is still loading its model; retry shortly")
        return self.model

    @grpc_errors
    async def Connect(
        self, commands: AsyncIterator[worker_pb2.LinkCommand], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.LinkEvent]:
        model = self._loaded()
        async for event in Link(model.engine, model.limits, self.metrics, self.stream_interval).events(commands):
            yield event

    @grpc_errors
    async def DescribeModel(
        self, request: worker_pb2.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        return self._loaded().info

    @grpc_errors
    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadReport:
        return load_report(self._loaded().engine.load())


async def start_worker(config: WorkerConfig) -> RunningServer:
    """Starts serving at once (health NOT_SERVING), loads the model, then reports SERVING."""
    if config.stream_interval < 1:
        raise SystemExit(f"meshserve: --stream-interval must be at least 1 token, got {config.stream_interval}")
    if config.engine_stall_seconds < 0:
        raise SystemExit(f"meshserve: --engine-stall-seconds must be 0 (never) or more: {config.engine_stall_seconds}")
    tls = mesh_tls(config, "worker")
    registry = new_registry()
    servicer = WorkerServicer(registry, config.stream_interval)
    running = await start_server(
        config.host,
        config.port,
        [Servicer.of(servicer, worker_pb2, worker_pb2_grpc, "Worker")],
        serving=False,
        metrics=registry,
        tls=tls,
    )
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
    loop = asyncio.get_running_loop()

    def engine_died() -> None:  # on the engine's receiver thread
        # Nothing here can serve: not serving, and the process ends so its supervisor starts a new one.
        reason = "the worker's engine was wedged" if model.engine.stalled else "the worker's engine process died"
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(_fail(running, reason)))

    model.engine.on_death = engine_died
    running.on_drain.append(model.engine.start_draining)

    async def stop_engine() -> None:
        await asyncio.to_thread(model.engine.stop)

    running.on_stop.append(stop_engine)
    await running.set_serving(True)
    facts = model.facts
    log.info(
        "worker loaded %s from %s (%s path, %s on %s, %d threads, the engine in its own process)",
        name,
        model_dir,
        facts.impl,
        facts.dtype,
        facts.device,
        facts.threads,
    )
    return running


async def _fail(running: RunningServer, reason: str) -> None:
    running.failure = reason
    log.error("stopping: %s", running.failure)
    await running.stop(0)
