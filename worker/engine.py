"""The worker's serving loop: takes waiting sequences in batches and decodes each batch step by step.

This is simple (static) batching: sequences that arrive while a batch runs wait for the
next batch; finished and cancelled sequences leave the running batch at once.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from dataclasses import dataclass

import torch

from meshserve.worker.model_runner import ModelRunner
from meshserve.worker.sampler import make_generator, sample
from meshserve.worker.sequence import Finish, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLoad:
    running_sequences: int
    waiting_sequences: int
    max_num_seqs: int
    sequences_finished: int
    sequences_cancelled: int
    generated_tokens: int


class Engine:
    def __init__(self, runner: ModelRunner, max_num_seqs: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, not {max_num_seqs}")
        self.runner = runner
        self.max_num_seqs = max_num_seqs
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._finished = 0
        self._cancelled = 0
        self._generated_tokens = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends every sequence (cancelled) and joins the loop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, sequence: Sequence) -> None:
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            self._waiting.append(sequence)
            self._wake.notify()

    def load(self) -> EngineLoad:
        with self._wake:
            return EngineLoad(
                running_sequences=len(self._running),
                waiting_sequences=len(self._waiting),
                max_num_seqs=self.max_num_seqs,
                sequences_finished=self._finished,
                sequences_cancelled=self._cancelled,
                generated_tokens=self._generated_tokens,
            )

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    for sequence in self._waiting:
                        self._end(sequence, Finish.CANCELLED)
                    self._waiting.clear()
                    return
                batch = []
                while self._waiting and len(batch) < self.max_num_seqs:
                    batch.append(self._waiting.popleft())
                self._running = batch
            try:
                self._run_batch(batch)
            except Exception as exc:
                log.exception("batch of %d sequences failed", len(batch))
                for sequence in batch:
                    self._end(sequence, Finish.ERROR, f"the worker failed: {type(exc).__name__}: {exc}")
            finally:
                with self._wake:
                    self._running = []

    def _run_batch(self, batch: list[Sequence]) -> None:
        running = self._without_cancelled(batch)
        if not running:
            return
        generators = {id(s): make_generator(s.options.seed) for s in running}
        logits, state = self.runner.prefill([s.prompt_ids for s in running])
        while True:
            next_tokens = [sample(logits[row], s.options, generators[id(s)]) for row, s in enumerate(running)]
            for sequence, token in zip(running, next_tokens, strict=True):
                sequence.append_token(token)
                if sequence.finished:
                    self._count_finished(sequence)
            with self._wake:
                self._generated_tokens += len(running)
            keep_rows = [row for row, s in enumerate(running) if not s.finished and not s.cancel_requested]
            for sequence in running:
                if not sequence.finished and sequence.cancel_requested:
                    self._end(sequence, Finish.CANCELLED)
            if not keep_rows or self._stopping:
                for sequence in running:
                    self._end(sequence, Finish.CANCELLED)
                return
            running = [running[row] for row in keep_rows]
            with self._wake:
                self._running = list(running)
            logits = self.runner.decode(state, [next_tokens[row] for row in keep_rows], keep_rows)

    def _without_cancelled(self, batch: list[Sequence]) -> list[Sequence]:
        for sequence in batch:
            if sequence.cancel_requested:
                self._end(sequence, Finish.CANCELLED)
        return [s for s in batch if not s.finished]

    def _end(self, sequence: Sequence, finish: Finish, error: str = "") -> None:
        if sequence.finished:
            return
        sequence.end(finish, error)
        self._count_finished(sequence)

    def _count_finished(self, sequence: Sequence) -> None:
        with self._wake:
            if sequence.finish == Finish.CANCELLED:
                self._cancelled += 1
            else:
                self._finished += 1


def set_threads(threads: int) -> int:
    """Sets torch's CPU threads; 0 means half the cores (the other services need the rest)."""
    chosen = threads if threads > 0 else max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(chosen)
    return chosen
