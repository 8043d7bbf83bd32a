"""The worker's engine, run in a process of its own (worker/engine_core.py), as the server sees it: the same
submit / cancel / load / drain / stop as an in-process Engine, and the output side here.

Each sequence has its server half here (its detokeniser, stop strings, consumer) and its engine half
there; they share a key. Every step comes back as token ids, finishes and the engine's load, and goes
through the output processor on this side. A stop string found here ends the sequence there. If the
engine process dies, this reports itself draining and calls `on_death`: the worker stops (its routers
resume its sequences elsewhere) and exits non-zero for its supervisor to replace it; without `on_death`,
every open sequence ends with an error.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

from meshserve.common.tokenizer import ModelTokenizer
from meshserve.worker.engine_core import AddSequence, EngineFacts, EngineSpec, StepMessage, run_engine_core
from meshserve.worker.engine_load import EngineLoad
from meshserve.worker.output_processor import OutputProcessor, StepOutputs
from meshserve.worker.sequence import Finish, SamplingOptions, Sequence, SequenceOutput, model_sequence

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0


class EngineProcess:
    def __init__(self, spec: EngineSpec, tokenizer: ModelTokenizer, stall_seconds: float = 0.0) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        # With sequences open and no step for this long the engine is wedged (0: never judged so).
        self.stall_seconds = stall_seconds
        self.stalled = False
        self.facts: EngineFacts | None = None
        self.draining = False
        self.on_step: Callable[[int], None] | None = None
        self.on_death: Callable[[], None] | None = None
        self.outputs = OutputProcessor(end=self._end_there)
        self._keys = itertools.count(1)
        self._open: dict[int, Sequence] = {}  # key -> server half, until its end came back
        self._key_of: dict[int, int] = {}  # id(sequence) -> key
        self._lock = threading.Lock()  # the open maps: the event loop adds, the receiver removes
        # Commands come from the event loop and the output thread; a long one is written in two parts.
        self._send_lock = threading.Lock()
        self._load: EngineLoad | None = None
        self._stopping = False
        self._process: Any = None
        self._receiver: threading.Thread | None = None
        self._progress_at = time.monotonic()  # the last step, or the first sequence after an idle spell

    def start(self, progress: Callable[[str], None] = log.info) -> EngineFacts:
        """Starts the engine process and waits until its model is loaded and compiled (blocking)."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no gRPC or CUDA state forked
        commands_out, commands_in = context.Pipe(duplex=False)
        outputs_out, outputs_in = context.Pipe(duplex=False)
        self._process = context.Process(
            target=run_engine_core,
            args=(self.spec, commands_out, outputs_in),
            name="meshserve-engine",
            daemon=True,
        )
        self._process.start()
        commands_out.close()
        outputs_in.close()
        self._commands, self._outputs_pipe = commands_in, outputs_out
        while True:
            try:
                message = self._outputs_pipe.recv()
            except EOFError:
                code = self._process.exitcode
                raise RuntimeError(f"the engine process exited while starting (exit code {code})") from None
            if message[0] == "log":
                progress(message[1])
            elif message[0] == "failed":
                self._process.join(STOP_TIMEOUT_S)
                raise (ValueError if message[1] == "setting" else RuntimeError)(message[2])
            else:
                self.facts = message[1]
                self._load = self.facts.load
                break
        self.outputs.start()
        self._receiver = threading.Thread(target=self._receive, name="engine-receiver", daemon=True)
        self._receiver.start()
        if self.stall_seconds > 0:
            threading.Thread(target=self._watch, name="engine-watchdog", daemon=True).start()
        return self.facts

    @property
    def max_num_seqs(self) -> int:
        assert self.facts is not None
        return self.facts.max_num_seqs

    def new_sequence(
        self,
        request_id: str,
        prompt_ids: list[int],
        options: SamplingOptions,
        emit: Callable[[SequenceOutput], None],
        **kwargs: Any,
    ) -> Sequence:
        """The server half of a sequence (sequence.model_sequence): its engine half is made in the engine process."""
        assert self.facts is not None
        facts = self.facts
        return model_sequence(
            self.tokenizer, facts.eos_token_ids, facts.max_context_length, request_id, prompt_ids, options, emit,
            **kwargs,
        )  # fmt: skip

    def submit(self, sequence: Sequence, resumed: list[int] | None = None) -> SequenceOutput | None:
        """Sends the sequence to the engine. `resumed` as Engine.submit: when those tokens already end it,
        nothing is sent and its last output is returned."""
        if self._stopping or self._dead:
            raise RuntimeError("the engine is stopping")
        if resumed:
            ended = sequence.replay(resumed)  # the text half here; the engine process replays the ids
            if ended is not None:
                return ended
        key = next(self._keys)
        with self._lock:
            if not self._open:
                self._progress_at = time.monotonic()  # idle until now: the stall clock starts here
            self._open[key] = sequence
            self._key_of[id(sequence)] = key
        add = AddSequence(
            key, sequence.request_id, sequence.prompt_ids, sequence.options, sequence.priority, sequence.deadline,
            list(resumed or ()), sequence.cache_salt,
        )  # fmt: skip
        self._send(("add", add))
        return None

    def cancel(self, sequence: Sequence) -> None:
        sequence.request_cancel()
        key = self._key_of.get(id(sequence))
        if key is not None:
            self._send(("cancel", key))

    def wake(self) -> None:
        """Nothing to do: every change reaches the engine process as a command."""

    def load(self) -> EngineLoad:
        assert self._load is not None
        load = self._load
        return dataclasses.replace(load, draining=True) if self.draining and not load.draining else load

    def start_draining(self) -> None:
        self.draining = True
        self._send(("drain",))

    def stop(self) -> None:
        """Ends every sequence (cancelled), delivers what is left, and ends the engine process."""
        self._stopping = True
        self.draining = True
        self._send(("stop",))
        if self._receiver is not None:
            self._receiver.join(STOP_TIMEOUT_S)
        if self._process is not None:
            self._process.join(STOP_TIMEOUT_S)
            if self._process.is_alive():
                self._process.kill()
        self.outputs.stop()

    @property
    def _dead(self) -> bool:
        return self._process is not None and not self._process.is_alive()

    def _send(self, command: tuple) -> None:
        try:
            with self._send_lock:
                self._commands.send(command)
        except (OSError, ValueError):  # the engine process is gone: the receiver ends every sequence
            pass

    def _end_there(self, sequence: Sequence, finish: Finish) -> None:
        """The output side ended the sequence (a stop string, a failed consumer): the engine drops it too."""
        sequence.request_finish(finish)
        key = self._key_of.get(id(sequence))
        if key is not None:
            self._send(("finish", key, finish))

    def _receive(self) -> None:
        while True:
            try:
                message = self._outputs_pipe.recv()
            except (EOFError, OSError):
                break
            if message[0] == "stopped":
                break
            self._progress_at = time.monotonic()
            step: StepMessage = message[1]
            if step.load is not None:
                self._load = step.load
            if step.batch and self.on_step is not None:
                self.on_step(step.batch)
            self.outputs.put(self._step_outputs(step))
        if self._stopping:
            self._end_all(Finish.CANCELLED, "")
            return
        if not self.stalled:
            log.error("the engine process died (exit code %s); the worker cannot serve", self._process.exitcode)
        self.draining = True
        if self.on_death is not None:
            # The worker stops at once: its streams break, and their routers resume every sequence elsewhere
            # from the tokens already sent (an error here would end them instead).
            self.on_death()
        else:
            self._end_all(Finish.ERROR, "the worker's engine failed; retry on another worker")

    def _watch(self) -> None:
        """A wedged engine (a hung kernel, a deadlock, a frozen process) is ended, so that it fails as a dead
        one does: its health and its streams would otherwise wait on it forever."""
        period = min(1.0, self.stall_seconds / 4)
        while not self._stopping and not self._dead:
            time.sleep(period)
            with self._lock:
                open_sequences = len(self._open)
                quiet = time.monotonic() - self._progress_at
            if open_sequences and quiet > self.stall_seconds and not self._stopping:
                self.stalled = True
                log.error(
                    "the engine made no step for %.1f s with %d sequences in it (--engine-stall-seconds %g): "
                    "it is wedged; ending it, the worker cannot serve",
                    quiet, open_sequences, self.stall_seconds,
                )  # fmt: skip
                self._process.kill()  # the receiver sees it end: the same path as a death
                return

    def _step_outputs(self, step: StepMessage) -> StepOutputs:
        outputs = StepOutputs()
        with self._lock:
            for key, cached in step.cached:
                sequence = self._open.get(key)
                if sequence is not None:
                    sequence.cached_prompt_tokens = cached
            for key, added, scheduled, first_token in step.steps:
                sequence = self._open.get(key)
                if sequence is not None:
                    sequence.added_step, sequence.first_scheduled_step = added, scheduled
                    sequence.first_token_step = first_token
            for key, token_id, logprob, finish in step.tokens:
                sequence = self._open.get(key)
                if sequence is None:
                    continue
                if finish is not None:
                    sequence.finish = finish
                    self._forget(key, sequence)
                outputs.sequences.append(sequence)
                outputs.token_ids.append(token_id)
                outputs.logprobs.append(logprob)
                outputs.finishes.append(finish)
            for key, finish, error in step.ended:
                sequence = self._open.get(key)
                if sequence is not None:
                    sequence.finish = finish
                    self._forget(key, sequence)
                    outputs.ended.append((sequence, finish, error))
        return outputs

    def _forget(self, key: int, sequence: Sequence) -> None:
        del self._open[key]
        self._key_of.pop(id(sequence), None)

    def _end_all(self, finish: Finish, error: str) -> None:
        self.draining = True
        outputs = StepOutputs()
        with self._lock:
            for key, sequence in list(self._open.items()):
                sequence.finish = finish
                self._forget(key, sequence)
                outputs.ended.append((sequence, finish, error))
        self.outputs.put(outputs)
