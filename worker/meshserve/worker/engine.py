"""The worker's serving loop: schedule a step, run the model on it, sample, append the token ids; repeat.

Sequences join at any step and leave as soon as they finish, are cancelled or pass their
deadline, freeing their KV blocks. The loop runs on one thread and only computes: each step's
outputs go, as one batch, to the output processor (detokenising, stop strings, delivery), which
runs on a thread of its own meanwhile. Submit, cancel and the load snapshot are the only things
other threads touch.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from meshserve.common.enums import NUM_PRIORITY_VALUES
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.worker.block_manager import BlockManager
from meshserve.worker.engine_load import EngineLoad
from meshserve.worker.grammar import GrammarMatchers
from meshserve.worker.model_runner import ModelRunner
from meshserve.worker.output_processor import OutputProcessor, StepOutputs
from meshserve.worker.sampler import resumed_generator, sample
from meshserve.worker.scheduler import ScheduledChunk, Scheduler
from meshserve.worker.sequence import (
    Finish,
    SamplingOptions,
    Sequence,
    SequenceOutput,
    TokenLogprob,
    model_sequence,
)

log = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 5.0
STEP_TIME_WINDOW_S = 2.0  # the step time reported is the mean over this long: what a request arriving now meets


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: ModelTokenizer | None,
        max_num_seqs: int,
        max_num_batched_tokens: int = 512,
        prefix_caching: bool = True,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.block_manager = BlockManager(runner.kv.num_blocks, runner.kv.block_size, prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self._incoming: collections.deque[Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.draining = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.outputs = OutputProcessor()
        # This step's outputs so far, handed to the output processor when the step is over.
        self._step_outputs = StepOutputs()
        self._finished = 0
        self._cancelled = 0
        self._generated_tokens = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._step_times: collections.deque[tuple[float, float]] = collections.deque()  # (end, seconds) per step
        self._step_times_total = 0.0
        self._step_seconds = 0.0
        self._load = self._snapshot()
        # Called from the engine thread with the number of sequences of each step that ran (metrics).
        self.on_step: Callable[[int], None] | None = None
        self._grammars: GrammarMatchers | None = None  # made at the first constrained sequence

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    def start(self) -> None:
        self.outputs.start()
        self._thread.start()

    def stop(self) -> None:
        """Ends every sequence (cancelled), joins the loop, then delivers what is left to deliver."""
        with self._wake:
            self._stopping = True
            self.draining = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.outputs.stop()

    def start_draining(self) -> None:
        """Reported in the load from now on, so schedulers send nothing new; running sequences go on."""
        self.draining = True

    def new_sequence(
        self,
        request_id: str,
        prompt_ids: list[int],
        options: SamplingOptions,
        emit: Callable[[SequenceOutput], None],
        **kwargs: Any,
    ) -> Sequence:
        """A sequence for this engine's model (sequence.model_sequence)."""
        assert self.tokenizer is not None, "an engine without a tokenizer runs sequences made elsewhere"
        runner = self.runner
        return model_sequence(
            self.tokenizer, runner.eos_token_ids, runner.max_context_length, request_id, prompt_ids, options, emit,
            **kwargs,
        )  # fmt: skip

    def submit(self, sequence: Sequence, resumed: list[int] | None = None) -> SequenceOutput | None:
        """Queues the sequence for the next step. `resumed`: tokens it already produced elsewhere (failover),
        taken without being emitted, its seeded generator advanced past them. When they already end it,
        nothing is queued and its last output is returned for the caller to deliver."""
        if resumed:
            ended = sequence.replay(resumed)
            if ended is not None:
                return ended
            _advance_generator(sequence, len(resumed), self.runner.vocab_size, self.runner.device)
        self.constrain(sequence)
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            self._incoming.append(sequence)
            self._wake.notify()
        return None

    def constrain(self, sequence: Sequence) -> None:
        """A constrained sequence gets its grammar's matcher, past the tokens it already has (a resumed one's);
        ValueError if the grammar cannot be followed."""
        if not sequence.options.grammar or sequence.matcher is not None:
            return
        if self._grammars is None:
            runner = self.runner
            self._grammars = GrammarMatchers(runner.model_dir, runner.vocab_size, runner.eos_token_ids)
        sequence.matcher = self._grammars.matcher(sequence.options.grammar, sequence.output_ids)

    def cancel(self, sequence: Sequence) -> None:
        """Thread-safe: the sequence leaves at the next step (at once when idle)."""
        sequence.request_cancel()
        self.wake()

    def wake(self) -> None:
        """Makes the loop look at cancellations now, even when idle."""
        with self._wake:
            self._wake.notify()

    def load(self) -> EngineLoad:
        with self._wake:
            return dataclasses.replace(self._load, draining=self.draining)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._incoming and not self.scheduler.has_work() and not self._stopping:
                    self._wake.wait()
                stopping = self._stopping
                incoming = list(self._incoming)
                self._incoming.clear()
            for sequence in incoming:
                self.scheduler.add(sequence)
            if stopping:
                now = time.monotonic()
                for sequence in self.scheduler.running + self.scheduler.waiting:
                    # A sequence its output side already ended (a stop string) keeps that reason; others are cancelled.
                    self._end(sequence, sequence.requested_end(now) or Finish.CANCELLED)
                self.hand_out()
                self._publish_load()
                return
            self.step()

    def step(self) -> None:
        """One iteration: drop the sequences that were cancelled, expired or stopped by their output side, then
        schedule, compute and sample, and hand the step's outputs over."""
        now = time.monotonic()
        for sequence in self.scheduler.running + self.scheduler.waiting:
            finish = sequence.requested_end(now)
            if finish is not None:
                self._end(sequence, finish)
        chunks = self.scheduler.schedule()
        if chunks:
            self._run(chunks)
            ended = time.monotonic()
            self._step_times.append((ended, ended - now))
            self._step_times_total += ended - now
            if self.on_step is not None:
                self.on_step(len(chunks))
        elif self.scheduler.waiting and not self.scheduler.running:
            # Nothing runs, so the whole pool was free and the first in line still did not fit: it never will.
            sequence = self.scheduler.waiting[0]
            needed = self.block_manager.blocks_needed(sequence.num_tokens)
            self._end(sequence, Finish.ERROR, f"needs {needed} KV blocks; the pool has {self.block_manager.num_blocks}")
        # The load first: a consumer that reads it when this step's outputs reach it sees the seats they freed.
        self._publish_load()
        self.hand_out()

    def _run(self, chunks: list[ScheduledChunk]) -> None:
        try:
            logits = self.runner.run(chunks)
        except Exception as exc:
            if len(chunks) > 1:
                # Find the culprit: each chunk again on its own (rewriting the same KV slots is harmless).
                log.warning("a model step over %d sequences failed (%s); running them one by one", len(chunks), exc)
                for chunk in chunks:
                    self._run([chunk])
                return
            log.exception("the model failed on sequence %s", chunks[0].sequence.request_id)
            self._end(chunks[0].sequence, Finish.ERROR, f"the worker failed: {type(exc).__name__}: {exc}")
            return
        self.scheduler.update(chunks)
        sampling = [chunk.sequence for chunk in chunks if chunk.samples]
        if not sampling:
            return
        try:
            tokens, logprobs = sample(logits, sampling)
        except Exception as exc:
            log.exception("sampling %d sequences failed", len(sampling))
            for sequence in sampling:
                self._end(sequence, Finish.ERROR, f"the worker failed to sample: {type(exc).__name__}: {exc}")
            return
        self.advance(sampling, tokens, logprobs)

    def advance(self, sequences: list[Sequence], tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """The engine's part of handing out sampled tokens: the ids, and the end of the sequences that ids alone
        finish, whose blocks are freed at once. The text is the output processor's, after hand_out()."""
        finishes = [sequence.add_token_id(token) for sequence, token in zip(sequences, tokens, strict=True)]
        for sequence in sequences:
            if sequence.first_token_step is None:
                sequence.first_token_step = self.scheduler.steps
        for sequence, finish in zip(sequences, finishes, strict=True):
            if finish is not None:
                self.scheduler.remove(sequence)
                self._count(finish)
        step = self._step_outputs
        step.sequences += sequences
        step.token_ids += tokens
        step.logprobs += logprobs
        step.finishes += finishes
        with self._wake:
            self._generated_tokens += len(sequences)
            self._recent.append((time.monotonic(), len(sequences)))

    def hand_out(self) -> None:
        """Gives the outputs of the step to the output processor, in one piece."""
        if self._step_outputs:
            self.outputs.put(self._step_outputs)
            self._step_outputs = StepOutputs()

    def _end(self, sequence: Sequence, finish: Finish, error: str = "") -> None:
        """Takes the sequence out of the scheduler (freeing its blocks); its consumer is told after the step."""
        self.scheduler.remove(sequence)
        if sequence.finished:
            return
        sequence.finish = finish
        self._count(finish)
        self._step_outputs.ended.append((sequence, finish, error))

    def _count(self, finish: Finish | None) -> None:
        with self._wake:
            if finish == Finish.CANCELLED:
                self._cancelled += 1
            else:
                self._finished += 1

    def _publish_load(self) -> None:
        load = self._snapshot()
        with self._wake:
            self._load = load

    def _snapshot(self) -> EngineLoad:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()
        window = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
        while self._step_times and self._step_times[0][0] < now - STEP_TIME_WINDOW_S:
            self._step_times_total -= self._step_times.popleft()[1]
        if self._step_times:  # idle, it keeps the last: the next arrival meets steps like the last ones
            self._step_seconds = max(0.0, self._step_times_total) / len(self._step_times)
        by_priority = [0] * NUM_PRIORITY_VALUES
        for sequence in self.scheduler.waiting:
            by_priority[min(max(sequence.priority, 0), NUM_PRIORITY_VALUES - 1)] += 1
        return EngineLoad(
            running_sequences=len(self.scheduler.running),
            waiting_sequences=len(self.scheduler.waiting) + len(self._incoming),
            waiting_by_priority=tuple(by_priority),
            max_num_seqs=self.scheduler.max_num_seqs,
            max_num_batched_tokens=self.scheduler.max_num_batched_tokens,
            sequences_finished=self._finished,
            sequences_cancelled=self._cancelled,
            generated_tokens=self._generated_tokens,
            free_kv_blocks=self.block_manager.num_free_blocks,
            total_kv_blocks=self.block_manager.num_blocks,
            kv_block_size=self.block_manager.block_size,
            tokens_per_second=sum(n for _, n in list(self._recent)[1:]) / window if window > 0 else 0.0,
            prefix_cache_hit_rate=self.block_manager.stats.hit_rate,
            preemptions=self.scheduler.preemptions,
            draining=self.draining,
            step_seconds=self._step_seconds,
            steps=self.scheduler.steps,
        )


def resume_ids(sequence: Sequence, resumed: list[int], vocab_size: int, device: torch.device) -> None:
    """The engine half of `resume`, for an engine whose sequences' text is kept elsewhere (engine_core)."""
    for token_id in resumed:
        if sequence.add_token_id(token_id) is not None:
            break
    _advance_generator(sequence, len(resumed), vocab_size, device)


def _advance_generator(sequence: Sequence, draws: int, vocab_size: int, device: torch.device) -> None:
    if not sequence.options.greedy:
        sequence.generator = resumed_generator(sequence.options.seed, draws, vocab_size, device=device)


def set_threads(threads: int) -> int:
    """Sets torch's CPU threads; 0 means half the cores (the other services need the rest)."""
    chosen = threads if threads > 0 else max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(chosen)
    return chosen
