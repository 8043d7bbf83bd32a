"""What calls return: plain dataclasses read from the gateway's replies (finish reasons as names: "stop",
"length", "cancelled", "error"; None while an index has not finished)."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.client.errors import MeshClientError
from meshserve.common.enums import FINISH_REASON_NAMES
from meshserve.common.errors import MeshError
from meshserve.v1 import common_pb2, inference_pb2


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_prompt_tokens: int = 0

    @classmethod
    def of(cls, usage: common_pb2.Usage) -> Usage:
        return cls(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cached_prompt_tokens)


@dataclass(frozen=True)
class Output:
    """One completion of a whole answer (index i * n + j: sample j of input i)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    mean_logprob: float | None = None
    errors: list[MeshClientError] = field(default_factory=list)  # best_effort: why this index failed


@dataclass(frozen=True)
class Completion:
    """A whole answer: every output, ordered by index, and the usage of the request."""

    request_id: str
    model: str
    outputs: list[Output]
    usage: Usage

    @property
    def text(self) -> str:
        """The first output's text (the only one unless n > 1 or a batch)."""
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else None

    @classmethod
    def of(cls, reply: inference_pb2.GenerateResponse) -> Completion:
        outputs = [
            Output(
                index=c.index,
                text=c.text,
                token_ids=list(c.token_ids),
                finish_reason=_finish_reason(c.finish_reason),
                usage=Usage.of(c.usage),
                logprobs=list(c.logprobs),
                mean_logprob=c.mean_logprob if c.HasField("mean_logprob") else None,
                errors=[_client_error(e) for e in c.errors],
            )
            for c in reply.completions
        ]
        return cls(reply.request_id, reply.model, outputs, Usage.of(reply.usage))


@dataclass(frozen=True)
class Chunk:
    """One message of a stream: new tokens of one index. The last chunk of an index has its finish_reason
    and usage; the stream's very last one has `final` set, no tokens and the usage of the whole request."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None
    final: bool = False
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    mean_logprob: float | None = None
    error: MeshClientError | None = None  # best_effort: why this index failed

    @classmethod
    def of(cls, message: inference_pb2.GenerateStreamResponse) -> Chunk:
        return cls(
            request_id=message.request_id,
            index=message.index,
            text=message.text,
            token_ids=list(message.token_ids),
            finish_reason=_finish_reason(message.finish_reason),
            usage=Usage.of(message.usage) if message.HasField("usage") else None,
            final=message.final,
            logprobs=list(message.logprobs),
            mean_logprob=message.mean_logprob if message.HasField("mean_logprob") else None,
            error=_client_error(message.error) if message.HasField("error") else None,
        )


def _finish_reason(value: int) -> str | None:
    return FINISH_REASON_NAMES.get(value) if value else None


def _client_error(status: common_pb2.ErrorStatus) -> MeshClientError:
    error = MeshError.of_status(status)
    return MeshClientError(error.code, error.message, error.details)
