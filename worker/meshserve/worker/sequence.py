"""The state of one sequence in the worker: its tokens, its stop conditions and the text it has emitted.

It has two halves, each touched by one thread once the sequence is submitted. The engine's: the token ids,
the KV-cache bookkeeping and the stop conditions that ids alone decide (stop tokens, EOS, max_tokens, the
context), so that a finished sequence frees its blocks at once. The output side's (the output processor):
the detokeniser, the stop strings, and the text held back because it may be the start of one.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from typing import Any

from meshserve.common.tokenizer import IncrementalDetokenizer, ModelTokenizer
from meshserve.v1 import common_pb2

_arrivals = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"


class Finish(enum.IntEnum):
    """Why a sequence ended: the proto's FinishReason values, so they go on the wire as they are."""

    STOP = common_pb2.FINISH_REASON_STOP
    LENGTH = common_pb2.FINISH_REASON_LENGTH
    CANCELLED = common_pb2.FINISH_REASON_CANCELLED
    ERROR = common_pb2.FINISH_REASON_ERROR


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # Until this many tokens are out, EOS and stop_token_ids are masked and stop strings not looked for.
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constrained decoding: the llguidance grammar the output must follow (common/structured.py); "" for none.
    grammar: str = ""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class SequenceOutput:
    """What one engine step produced for one sequence (several steps merge into one message downstream)."""

    token_ids: list[int]
    text: str
    finish: Finish | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    error: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    options: SamplingOptions
    detokenizer: IncrementalDetokenizer
    eos_token_ids: frozenset[int]
    max_context_length: int
    # Called with every output, on the output processor's thread; or, when `loop` is set, on that loop.
    emit: Callable[[SequenceOutput], None]
    priority: int = common_pb2.PRIORITY_NORMAL  # lower values are more important
    # time.monotonic() after which the sequence is dropped (cancelled); None: no deadline.
    deadline: float | None = None
    # Its prompt reuses cached KV blocks only of sequences with the same salt (TokenRequest.cache_salt).
    cache_salt: str = ""
    # The loop `emit` must run on: the output processor hands each step's outputs for all the sequences of
    # one loop over in one call_soon_threadsafe, not one wake-up per token per stream.
    loop: asyncio.AbstractEventLoop | None = None
    output_ids: list[int] = field(default_factory=list)
    # The engine's: why it stopped computing the sequence (set on its thread).
    finish: Finish | None = None
    # Engine state: the scheduler and the block manager own these.
    status: Status = Status.WAITING
    arrival: int = field(default_factory=lambda: next(_arrivals))
    block_table: list[int] = field(default_factory=list)
    # Leading tokens (prompt then output) whose keys and values are in the KV cache.
    num_computed_tokens: int = 0
    # Prompt tokens found in the prefix cache when the sequence was first scheduled.
    cached_prompt_tokens: int | None = None
    num_preemptions: int = 0
    # Engine steps (Scheduler.steps): done when it arrived, the one that scheduled its first chunk, the one that
    # sampled its first token. The server half of an engine in another process gets them with the first token.
    added_step: int | None = None
    first_scheduled_step: int | None = None
    first_token_step: int | None = None
    generator: Any = None  # the sampler's per-sequence random generator
    matcher: Any = None  # constrained decoding: the engine's llguidance matcher (worker/grammar.py)
    _cancel_requested: threading.Event = field(default_factory=threading.Event)
    _min_tokens_masked: tuple[int, ...] | None = None
    # Output side. Text decoded but not yet emitted because it may be the beginning of a stop string.
    _held_text: str = ""
    # Output tokens the output side has taken: it runs behind the engine, whose output_ids may be longer.
    _tokens_out: int = 0
    # The finish its consumer was told; outputs the engine computed after it are dropped.
    _output_finish: Finish | None = None
    # The output side ended the sequence (a stop string, a failed consumer): the engine drops it at its next
    # step, as a cancel but finishing with this reason.
    _requested_finish: Finish | None = None

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def rank(self) -> tuple[int, int]:
        """Scheduling order: more important priority first, then first come."""
        return (self.priority, self.arrival)

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.monotonic()) >= self.deadline

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    def request_cancel(self) -> None:
        """Thread-safe: the engine drops the sequence at its next step."""
        self._cancel_requested.set()

    def request_finish(self, finish: Finish) -> None:
        """Thread-safe: the output side has ended the sequence; the engine drops it at its next step and the
        output side takes nothing more of it."""
        self._requested_finish = finish

    def requested_end(self, now: float) -> Finish | None:
        """Why the engine must drop the sequence at this step, if it must."""
        if self._requested_finish is not None:
            return self._requested_finish
        return Finish.CANCELLED if self.cancel_requested or self.expired(now) else None

    @property
    def output_finished(self) -> bool:
        """The output side has told the consumer the end (or was asked to stop): later outputs are dropped."""
        return self._output_finish is not None or self._requested_finish is not None

    @property
    def masked_token_ids(self) -> tuple[int, ...]:
        """Ids the sampler must not draw for the next token: the ones that would stop the sequence, while it
        has fewer than min_tokens tokens out."""
        if len(self.output_ids) >= self.options.min_tokens:
            return ()
        if self._min_tokens_masked is None:
            stopping = set(self.options.stop_token_ids)
            if not self.options.ignore_eos:
                stopping |= self.eos_token_ids
            self._min_tokens_masked = tuple(sorted(stopping))
        return self._min_tokens_masked

    def add_token_id(self, token_id: int) -> Finish | None:
        """Engine half: takes a sampled token and decides from ids alone whether the sequence is done."""
        assert not self.finished, "a finished sequence takes no more tokens"
        self.output_ids.append(token_id)
        count = len(self.output_ids)
        # Before min_tokens nothing stops the sequence but its length.
        if count >= self.options.min_tokens and (
            token_id in self.options.stop_token_ids or (token_id in self.eos_token_ids and not self.options.ignore_eos)
        ):
            self.finish = Finish.STOP
        elif count >= self.options.max_tokens or len(self.prompt_ids) + count >= self.max_context_length:
            self.finish = Finish.LENGTH
        if self.matcher is not None:
            self.matcher.consume_token(token_id)
            # The grammar is complete and takes nothing more: the output is whole (ignore_eos or not).
            if self.finish is None and self.matcher.is_stopped():
                self.finish = Finish.STOP
        return self.finish

    def text_output(self, token_id: int, finish: Finish | None, logprob: TokenLogprob | None = None) -> SequenceOutput:
        """Output half: what a token the engine appended adds to the text, given the engine's finish for it; a
        stop string found here ends the sequence as STOP (the caller makes the engine drop it)."""
        self._tokens_out += 1
        new_text = self.detokenizer.add(token_id)
        text = self._held_text + new_text
        # Stop strings are looked for from min_tokens on, but at the first such step only those that end in
        # its new text: the held text was never checked.
        checks_stop = self._tokens_out >= self.options.min_tokens
        unchecked = len(self._held_text) if self._tokens_out == self.options.min_tokens else 0
        stop = _first_stop(text, self.options.stop, unchecked) if checks_stop else None
        if stop is not None:
            at, matched = stop
            text = text[: at + len(matched)] if self.options.include_stop_str_in_output else text[:at]
            finish = Finish.STOP
        elif finish == Finish.STOP and new_text and self._drops_stop_text(token_id):
            # A stop token or EOS. As vLLM: its text is left out unless asked for. (A grammar's last token
            # also ends the sequence as STOP, and is output.)
            text = text[: len(text) - len(new_text)]
        if finish is None:
            keep = _longest_stop_prefix_suffix(text, self.options.stop)
            text, self._held_text = (text[: len(text) - keep], text[len(text) - keep :]) if keep else (text, "")
        else:
            self._held_text = ""
        self._output_finish = finish
        return self._output([token_id], text, logprobs=[logprob] if logprob is not None else [])

    def _drops_stop_text(self, token_id: int) -> bool:
        if self.options.include_stop_str_in_output:
            return False
        return token_id in self.options.stop_token_ids or (
            token_id in self.eos_token_ids and not self.options.ignore_eos
        )

    def end_output(self, finish: Finish, error: str = "") -> SequenceOutput:
        """Output half: the last output of a sequence that ended without a new token (cancelled, or failed)."""
        self._held_text = ""
        self._output_finish = finish
        return self._output([], "", error)

    def append_token(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        """Both halves at once on the caller's thread, and emits what is new (a sequence no engine runs)."""
        self.emit(self._append_both(token_id, logprob))

    def replay(self, token_ids: Seq[int]) -> SequenceOutput | None:
        """Takes tokens the consumer already has (failover) without emitting them, so the detokeniser and
        the text held back as a possible stop-string start are as if this sequence had produced them.

        When these tokens already end the sequence (its first worker died after sending its last token but
        before its end), returns that end instead: the finish, the usage and the text the consumer was never
        sent, so the stream still ends normally."""
        for token_id in token_ids:
            finish = self.add_token_id(token_id)
            # As the consumer got it: every one of these tokens came without an end.
            output = self.text_output(token_id, None)
            if output.finish is not None:  # a stop string: the text before it is the consumer's last
                self.finish = output.finish
                return replace(output, token_ids=[], logprobs=[])
            if finish is not None:
                held, self._held_text = self._held_text, ""
                self._output_finish = finish
                return self._output([], held)
        return None

    def _append_both(self, token_id: int, logprob: TokenLogprob | None = None) -> SequenceOutput:
        output = self.text_output(token_id, self.add_token_id(token_id), logprob)
        if self.finish is None:  # a stop string: with no engine in between, the engine half ends at once
            self.finish = output.finish
        return output

    def _output(
        self, token_ids: list[int], text: str, error: str = "", logprobs: list[TokenLogprob] | None = None
    ) -> SequenceOutput:
        return SequenceOutput(
            token_ids=token_ids,
            text=text,
            finish=self._output_finish,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self._tokens_out,
            cached_prompt_tokens=self.cached_prompt_tokens or 0,
            error=error,
            logprobs=logprobs or [],
        )


def _first_stop(text: str, stops: Seq[str], unchecked: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in `text` (position, stop), the first listed on a tie; only matches that end
    past the first `unchecked` characters count."""
    found = [(pos, i) for i, s in enumerate(stops) if (pos := text.find(s, max(0, unchecked - len(s) + 1))) >= 0]
    if not found:
        return None
    pos, i = min(found)
    return pos, stops[i]


def _longest_stop_prefix_suffix(text: str, stops: Seq[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-length:]):
                longest = length
                break
    return longest


def model_sequence(
    tokenizer: ModelTokenizer,
    eos_token_ids: frozenset[int],
    max_context_length: int,
    request_id: str,
    prompt_ids: list[int],
    options: SamplingOptions,
    emit: Callable[[SequenceOutput], None],
    **kwargs: Any,
) -> Sequence:
    """A sequence of one model (its eos ids, its context, a detokeniser of its tokenizer); kwargs: priority,
    deadline, loop (the event loop `emit` must run on; without one it runs on the output processor's thread)."""
    return Sequence(
        request_id=request_id,
        prompt_ids=prompt_ids,
        options=options,
        detokenizer=tokenizer.detokenizer(
            prompt_ids, options.skip_special_tokens, options.spaces_between_special_tokens
        ),
        eos_token_ids=eos_token_ids,
        max_context_length=max_context_length,
        emit=emit,
        **kwargs,
    )
