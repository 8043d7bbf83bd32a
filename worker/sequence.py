"""The state of one sequence in the worker: its tokens, its stop conditions and the text it has emitted."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from meshserve.tokenizer import IncrementalDetokenizer


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass
class SequenceOutput:
    """What one engine step produced for one sequence (several steps merge into one message downstream)."""

    token_ids: list[int]
    text: str
    finish: Finish | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    options: SamplingOptions
    detokenizer: IncrementalDetokenizer
    eos_token_ids: frozenset[int]
    max_context_length: int
    # Called from the engine thread with every output; must be thread-safe.
    emit: Callable[[SequenceOutput], None]
    output_ids: list[int] = field(default_factory=list)
    finish: Finish | None = None
    # Text decoded but not yet emitted because it may be the beginning of a stop string.
    _held_text: str = ""
    _cancel_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    def request_cancel(self) -> None:
        """Thread-safe: the engine drops the sequence at its next step."""
        self._cancel_requested.set()

    def append_token(self, token_id: int) -> None:
        """Adds a sampled token, decides whether the sequence is done, and emits what is new."""
        assert not self.finished, "a finished sequence takes no more tokens"
        self.output_ids.append(token_id)
        text = self._held_text + self.detokenizer.add(token_id)
        finish = None
        stop_at = _first_stop(text, self.options.stop)
        if stop_at is not None:
            text, finish = text[:stop_at], Finish.STOP
        elif token_id in self.options.stop_token_ids or (
            token_id in self.eos_token_ids and not self.options.ignore_eos
        ):
            finish = Finish.STOP
        elif len(self.output_ids) >= self.options.max_tokens:
            finish = Finish.LENGTH
        elif len(self.prompt_ids) + len(self.output_ids) >= self.max_context_length:
            finish = Finish.LENGTH
        if finish is None:
            keep = _longest_stop_prefix_suffix(text, self.options.stop)
            text, self._held_text = (text[: len(text) - keep], text[len(text) - keep :]) if keep else (text, "")
        else:
            self._held_text = ""
        self.finish = finish
        self._emit([token_id], text)

    def end(self, finish: Finish, error: str = "") -> None:
        """Finishes the sequence without a new token (cancelled, or failed)."""
        if self.finished:
            return
        self.finish = finish
        self._emit([], "", error)

    def _emit(self, token_ids: list[int], text: str, error: str = "") -> None:
        self.emit(
            SequenceOutput(
                token_ids=token_ids,
                text=text,
                finish=self.finish,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(self.output_ids),
                error=error,
            )
        )


def _first_stop(text: str, stops: Seq[str]) -> int | None:
    positions = [pos for pos in (text.find(s) for s in stops) if pos >= 0]
    return min(positions) if positions else None


def _longest_stop_prefix_suffix(text: str, stops: Seq[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-length:]):
                longest = length
                break
    return longest
