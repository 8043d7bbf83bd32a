"""What each request of a benchmark asks for: its prompt, its output length and its sampling, reproducibly.

Request number k of a workload is the same request on every run with the same seed, whichever level or
concurrency slot sends it: everything about it comes from a generator seeded with (seed, k).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Literal

# Prompt token ids are drawn from this range: ordinary merged tokens in any BPE vocabulary at least this large
# (byte tokens and special tokens sit below it or far above), so the same prompts suit any server's model.
PROMPT_ID_LOW, PROMPT_ID_HIGH = 300, 1300
# Text prompts (chat, or --prompt-format text) are these words, one per prompt token asked for; how many tokens
# that makes depends on the server's tokenizer, and each record keeps the count the server reported.
WORDS = (
    "river stone lantern harbor quiet market winter orchard signal copper meadow thunder paper garden engine "
    "silver candle bridge forest window valley rocket marble ocean whisper tower saddle violin desert island"
).split()

PromptFormat = Literal["ids", "text"]
Endpoint = Literal["completions", "chat"]


@dataclass(frozen=True)
class LengthDistribution:
    """A token count per request: fixed (`32`), `uniform:16-64` (both ends included) or `normal:mean,sd`
    (rounded, at least 1)."""

    kind: Literal["fixed", "uniform", "normal"]
    a: float  # fixed: the count; uniform: the low end; normal: the mean
    b: float = 0.0  # uniform: the high end; normal: the standard deviation

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}-{int(self.b)}"
        return f"normal:{self.a:g},{self.b:g}"


def parse_length(text: str) -> LengthDistribution:
    """`32`, `uniform:16-64` or `normal:64,16`; ValueError says what is wrong (argparse shows it)."""
    kind, colon, spec = text.strip().partition(":")
    try:
        if not colon:
            distribution = LengthDistribution("fixed", int(kind))
        elif kind == "uniform":
            low, high = (int(x) for x in spec.split("-"))
            distribution = LengthDistribution("uniform", low, high)
        elif kind == "normal":
            mean, sd = (float(x) for x in spec.split(","))
            distribution = LengthDistribution("normal", mean, sd)
        else:
            raise ValueError(kind)
    except ValueError:
        raise ValueError(f"{text!r} is not a token count: give N, uniform:LOW-HIGH or normal:MEAN,SD") from None
    a, b = distribution.a, distribution.b
    if distribution.kind == "fixed" and a < 1:
        raise ValueError(f"a token count must be at least 1, not {a:g}")
    if distribution.kind == "uniform" and not 1 <= a <= b:
        raise ValueError(f"uniform:LOW-HIGH needs 1 <= LOW <= HIGH, not {a:g}-{b:g}")
    if distribution.kind == "normal" and not (math.isfinite(a + b) and a >= 1 and b >= 0):
        raise ValueError(f"normal:MEAN,SD needs MEAN >= 1 and SD >= 0, not {a:g},{b:g}")
    return distribution


@dataclass(frozen=True)
class RequestSpec:
    """One request as the workload made it: exactly one of prompt_token_ids and prompt_text is set."""

    number: int  # its place in the workload, from 0; also what makes its prompt unique
    prompt_token_ids: tuple[int, ...] | None
    prompt_text: str | None
    max_tokens: int
    temperature: float
    seed: int | None  # sampling seed when temperature > 0 (greedy needs none)
    ignore_eos: bool  # ask the server to go on past end-of-sequence, so the output is max_tokens long
    request_id: str = ""  # sent as the request's id when set, so the mesh's logs of it can be found (the soak)

    @property
    def prompt_tokens_asked(self) -> int:
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)
        return len((self.prompt_text or "").split())


@dataclass
class Workload:
    """Makes the requests of a benchmark, numbered from 0; `next_request()` hands out the next one."""

    prompt_tokens: LengthDistribution = field(default_factory=lambda: LengthDistribution("fixed", 32))
    output_tokens: LengthDistribution = field(default_factory=lambda: LengthDistribution("fixed", 64))
    seed: int = 0
    temperature: float = 0.0
    endpoint: Endpoint = "completions"
    prompt_format: PromptFormat = "ids"  # chat always sends text
    ignore_eos: bool = True
    _numbers: itertools.count = field(default_factory=itertools.count, init=False, repr=False, compare=False)

    def request(self, number: int) -> RequestSpec:
        rng = random.Random(f"{self.seed}:{number}")
        prompt_length, max_tokens = self.prompt_tokens.sample(rng), self.output_tokens.sample(rng)
        seed = rng.randrange(2**31) if self.temperature > 0 else None
        ids = text = None
        if self.endpoint == "chat" or self.prompt_format == "text":
            text = unique_text(number, prompt_length, rng)
        else:
            ids = unique_token_ids(number, prompt_length, rng)
        return RequestSpec(number, ids, text, max_tokens, self.temperature, seed, self.ignore_eos)

    def next_request(self) -> RequestSpec:
        return self.request(next(self._numbers))

    def describe(self) -> dict[str, object]:
        return {
            "prompt_tokens": str(self.prompt_tokens),
            "output_tokens": str(self.output_tokens),
            "seed": self.seed,
            "temperature": self.temperature,
            "endpoint": self.endpoint,
            "prompt_format": "text" if self.endpoint == "chat" else self.prompt_format,
            "ignore_eos": self.ignore_eos,
        }


def unique_token_ids(number: int, length: int, rng: random.Random) -> tuple[int, ...]:
    """`length` ids whose first two spell `number`, so no two prompts share even their first KV block (the
    prefix cache cannot make one request cheaper because of another)."""
    span = PROMPT_ID_HIGH - PROMPT_ID_LOW
    head = [PROMPT_ID_LOW + number % span, PROMPT_ID_LOW + (number // span) % span]
    tail = [rng.randrange(PROMPT_ID_LOW, PROMPT_ID_HIGH) for _ in range(max(0, length - 2))]
    return tuple((head + tail)[:length])


def unique_text(number: int, length: int, rng: random.Random) -> str:
    """The request's number, then words: `length` words in all."""
    return " ".join([str(number), *(rng.choice(WORDS) for _ in range(length - 1))])
