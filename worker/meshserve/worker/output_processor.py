"""The engine's outputs, once per step, turned into text and delivered, on a thread of their own.

The engine thread only computes: per step it appends each sampled token id, ends the sequences that ids
alone finish, and hands the step over as one StepOutputs. Here, meanwhile, each token is detokenised,
stop strings are looked for (text that may start one held back), and the outputs go to their consumers:
one call of `emit` each on this thread, or, for sequences that name a loop, one call_soon_threadsafe per
loop for everything that is ready, rather than one wake-up per token per stream.

A stop string can only be found here, a step or two after the engine computed the token that completes
it: the sequence ends as STOP at once for its consumer, the engine is asked to drop it, and the tokens it
computed meanwhile are dropped here, so no text, token or usage past the stop is ever seen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from meshserve.worker.sequence import Finish, Sequence, SequenceOutput, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class StepOutputs:
    """What one engine step hands over: each sequence that took a token, with the token, its logprob and
    the engine's finish for it (from ids alone); and the sequences that ended without a token."""

    sequences: list[Sequence] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    finishes: list[Finish | None] = field(default_factory=list)
    ended: list[tuple[Sequence, Finish, str]] = field(default_factory=list)  # (sequence, finish, error)

    def __bool__(self) -> bool:
        return bool(self.sequences or self.ended)


def _finish_here(sequence: Sequence, finish: Finish) -> None:
    sequence.request_finish(finish)


class OutputProcessor:
    def __init__(self, end: Callable[[Sequence, Finish], None] = _finish_here) -> None:
        """`end` stops a sequence the output side ended (a stop string, a failed consumer) where its engine runs."""
        self._steps: queue.SimpleQueue[StepOutputs | None] = queue.SimpleQueue()  # None: stop
        self._thread: threading.Thread | None = None
        self._end = end

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine-outputs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Delivers every step handed over so far, then ends the thread."""
        if self._thread is None:
            return
        self._steps.put(None)
        self._thread.join(timeout=30)
        self._thread = None

    def put(self, step: StepOutputs) -> None:
        """Hands a step over. Until start() (steps driven by hand: tests, bench) it is processed at once."""
        if self._thread is None:
            self.process([step])
        else:
            self._steps.put(step)

    def _loop(self) -> None:
        while True:
            steps = [self._steps.get()]
            # Behind by several steps (the GIL, a slow consumer): they go out together, one wake-up per loop.
            while not self._steps.empty():
                steps.append(self._steps.get_nowait())
            self.process([step for step in steps if step is not None])
            if None in steps:
                return

    def process(self, steps: list[StepOutputs]) -> None:
        """Turns these steps' tokens into outputs, in order, and delivers them."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, SequenceOutput]]] = {}
        for step in steps:
            for sequence, token_id, logprob, finish in zip(
                step.sequences, step.token_ids, step.logprobs, step.finishes, strict=True
            ):
                if sequence.output_finished:
                    continue  # computed after its stop string, before the engine dropped it
                try:
                    output = sequence.text_output(token_id, finish, logprob)
                except Exception as exc:  # one sequence's detokeniser failing is its own
                    log.exception("the output of sequence %s failed", sequence.request_id)
                    output = sequence.end_output(Finish.ERROR, f"the worker failed: {type(exc).__name__}: {exc}")
                if output.finish is not None and finish is None:  # the engine goes on computing it: stop it
                    self._end(sequence, output.finish)
                _deliver(sequence, output, by_loop, self._end)
            for sequence, finish, error in step.ended:
                if not sequence.output_finished:
                    _deliver(sequence, sequence.end_output(finish, error), by_loop, self._end)
        for loop, outputs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_emit_all, outputs, self._end)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for sequence, _ in outputs:
                    self._end(sequence, Finish.CANCELLED)


def _deliver(
    sequence: Sequence,
    output: SequenceOutput,
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, SequenceOutput]]],
    end: Callable[[Sequence, Finish], None],
) -> None:
    if sequence.loop is None:
        _emit(sequence, output, end)
    else:
        by_loop.setdefault(sequence.loop, []).append((sequence, output))


def _emit_all(outputs: list[tuple[Sequence, SequenceOutput]], end: Callable[[Sequence, Finish], None]) -> None:
    """On the loop: every output that was ready for its streams."""
    for sequence, output in outputs:
        _emit(sequence, output, end)


def _emit(sequence: Sequence, output: SequenceOutput, end: Callable[[Sequence, Finish], None]) -> None:
    """A consumer that raises ends its own sequence (ERROR), and only that one."""
    try:
        sequence.emit(output)
    except Exception as exc:
        log.exception("the consumer of sequence %s failed", sequence.request_id)
        end(sequence, Finish.ERROR)
        failed = dataclasses.replace(
            output,
            token_ids=[],
            text="",
            logprobs=[],
            finish=Finish.ERROR,
            error=f"the worker failed: {type(exc).__name__}: {exc}",
        )
        try:
            sequence.emit(failed)
        except Exception:
            log.exception("could not tell the consumer of %s that it failed", sequence.request_id)
