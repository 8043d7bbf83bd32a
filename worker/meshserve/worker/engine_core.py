"""The engine's own process: the model, the step loop and the sampler, and nothing else.

The worker's server process keeps gRPC, the routers' streams and the output side (detokenising, stop
strings); this process only computes, so its step loop never waits for a GIL that gRPC holds (vLLM v1
splits its EngineCore off the same way). Two one-way pipes join them: commands come in (add, cancel,
finish, drain, stop), and each step goes out as one StepMessage of token ids, finishes and the load.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from meshserve.worker.engine_load import EngineLoad
from meshserve.worker.output_processor import StepOutputs
from meshserve.worker.sequence import Finish, SamplingOptions, Sequence, TokenLogprob

if TYPE_CHECKING:
    from meshserve.worker.engine import Engine
    from meshserve.worker.model_runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process builds: the model and the engine's settings (from WorkerConfig)."""

    model_dir: str
    dtype: str
    block_size: int
    kv_cache_memory: str
    kernels: str
    model_impl: str
    compile: str
    max_num_seqs: int
    max_num_batched_tokens: int
    prefix_caching: bool
    threads: int


@dataclass(frozen=True)
class EngineFacts:
    """What the engine process found once the model was loaded and its step compiled."""

    vocab_size: int
    max_context_length: int
    eos_token_ids: frozenset[int]
    kv_capacity_tokens: int
    max_num_seqs: int
    impl: str
    dtype: str
    device: str
    threads: int
    compile_seconds: float
    load: EngineLoad


@dataclass
class StepMessage:
    """One engine step, by the keys the server gave its sequences."""

    tokens: list[tuple[int, int, TokenLogprob | None, Finish | None]] = field(default_factory=list)
    ended: list[tuple[int, Finish, str]] = field(default_factory=list)
    cached: list[tuple[int, int]] = field(default_factory=list)  # (key, prompt tokens from the prefix cache)
    # With a sequence's first token: (key, added_step, first_scheduled_step, first_token_step) (sequence.py).
    steps: list[tuple[int, int | None, int | None, int | None]] = field(default_factory=list)
    load: EngineLoad | None = None
    batch: int = 0  # sequences that ran in the step (metrics)


@dataclass(frozen=True)
class AddSequence:
    key: int
    request_id: str
    prompt_ids: list[int]
    options: SamplingOptions
    priority: int
    deadline: float | None
    resumed: list[int]
    cache_salt: str


class _StepSender:
    """Stands in for the engine's output processor: each handed-over step leaves as one StepMessage."""

    def __init__(self, engine: Engine, send: Any) -> None:
        self.engine = engine
        self.send = send
        self.keys: dict[int, int] = {}  # id(sequence) -> key
        # key -> sequence, until its end was sent (added by the command thread, dropped on the engine thread)
        self.sequences: dict[int, Sequence] = {}
        self._cached_told: set[int] = set()
        self._batch = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def ran(self, batch: int) -> None:
        self._batch = batch

    def put(self, step: StepOutputs) -> None:
        message = StepMessage(batch=self._batch, load=self.engine.load())
        self._batch = 0
        for sequence, token_id, logprob, finish in zip(
            step.sequences, step.token_ids, step.logprobs, step.finishes, strict=True
        ):
            key = self.keys[id(sequence)]
            if key not in self._cached_told and sequence.cached_prompt_tokens is not None:
                message.cached.append((key, sequence.cached_prompt_tokens))
                message.steps.append(
                    (key, sequence.added_step, sequence.first_scheduled_step, sequence.first_token_step)
                )
                self._cached_told.add(key)
            message.tokens.append((key, token_id, logprob, finish))
            if finish is not None:
                self._forget(sequence)
        for sequence, finish, error in step.ended:
            message.ended.append((self.keys[id(sequence)], finish, error))
            self._forget(sequence)
        self.send(("step", message))

    def _forget(self, sequence: Sequence) -> None:
        key = self.keys.pop(id(sequence), None)
        self.sequences.pop(key, None)
        self._cached_told.discard(key)


def run_engine_core(spec: EngineSpec, commands: Connection, outputs: Connection) -> None:
    """The engine process's main: builds the engine, says it is ready, then applies commands until stopped
    (or until the server's end of the pipe closes: the server is gone)."""
    # The server process handles signals; this one ends when it is told to or the server goes away.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="engine process: %(levelname)s %(name)s: %(message)s")
    # Here only: the server process never imports torch or the model code.
    from meshserve.worker.engine import Engine, set_threads
    from meshserve.worker.model_runner import ModelRunner

    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:  # the engine thread and this one both send
            outputs.send(message)

    try:
        threads = set_threads(spec.threads)
        runner = ModelRunner(
            spec.model_dir,
            spec.dtype,
            block_size=spec.block_size,
            kv_cache_memory=spec.kv_cache_memory,
            kernels=spec.kernels,
            model_impl=spec.model_impl,
            compile=spec.compile,
            max_batch=spec.max_num_seqs,
        )
        seconds = runner.warm_up(lambda line: send(("log", line)))
        engine = Engine(runner, None, spec.max_num_seqs, spec.max_num_batched_tokens, spec.prefix_caching)
    except ValueError as exc:  # a bad setting (dtype, KV-cache size): the server says which
        send(("failed", "setting", str(exc)))
        return
    except Exception as exc:
        log.exception("the engine could not start")
        send(("failed", "error", f"{type(exc).__name__}: {exc}"))
        return
    sender = _StepSender(engine, send)
    engine.outputs = sender  # type: ignore[assignment]
    engine.on_step = sender.ran
    engine.start()
    facts = EngineFacts(
        vocab_size=runner.vocab_size,
        max_context_length=runner.max_context_length,
        eos_token_ids=frozenset(runner.eos_token_ids),
        kv_capacity_tokens=runner.kv.capacity_tokens,
        max_num_seqs=engine.max_num_seqs,
        impl=runner.impl,
        dtype=str(runner.dtype),
        device=str(runner.device),
        threads=threads,
        compile_seconds=seconds,
        load=engine.load(),
    )
    send(("ready", facts))
    _apply_commands(engine, runner, sender, commands, send)


def _apply_commands(engine: Engine, runner: ModelRunner, sender: _StepSender, commands: Connection, send) -> None:
    sequences = sender.sequences
    while True:
        try:
            command = commands.recv()
        except (EOFError, OSError):
            command = ("stop",)  # the server is gone: nobody is left to serve
        kind = command[0]
        if kind == "add":
            add: AddSequence = command[1]
            sequence = Sequence(
                request_id=add.request_id,
                prompt_ids=add.prompt_ids,
                options=add.options,
                detokenizer=None,  # type: ignore[arg-type]  # text is the server's
                eos_token_ids=runner.eos_token_ids,
                max_context_length=runner.max_context_length,
                emit=None,  # type: ignore[arg-type]
                priority=add.priority,
                deadline=add.deadline,
                cache_salt=add.cache_salt,
            )
            if add.resumed:
                from meshserve.worker.engine import resume_ids

                resume_ids(sequence, add.resumed, runner.vocab_size, runner.device)
            sequences[add.key] = sequence
            sender.keys[id(sequence)] = add.key
            try:
                engine.constrain(sequence)
            except ValueError as exc:  # the grammar cannot be followed on this model: it fails alone
                sender.keys.pop(id(sequence), None)
                sequences.pop(add.key, None)
                send(("step", StepMessage(load=engine.load(), ended=[(add.key, Finish.ERROR, str(exc))])))
                continue
            try:
                engine.submit(sequence)
            except RuntimeError:  # stopping: the stop that follows ends it with the rest
                sender.keys.pop(id(sequence), None)
                sequences.pop(add.key, None)
        elif kind in ("cancel", "finish"):
            sequence = sequences.get(command[1])
            if sequence is not None:
                if kind == "cancel":
                    sequence.request_cancel()
                else:
                    sequence.request_finish(command[2])
                engine.wake()
        elif kind == "drain":
            engine.start_draining()
            send(("step", StepMessage(load=engine.load())))
        elif kind == "stop":
            engine.stop()
            send(("stopped",))
            return
