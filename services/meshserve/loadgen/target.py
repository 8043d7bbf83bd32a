"""What a benchmark sends requests to, and what comes back from one request: the arrival time of each piece of
its stream, not yet any statistic (records.py makes those).

Two targets: grpc_target.GrpcTarget (the mesh's Inference.GenerateStream) and openai_target.OpenAITarget (the
OpenAI HTTP API of meshserve's gateway, vLLM or any other server). Each is an async context manager that
connects and learns the model on entry, raising TargetError when it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from meshserve.loadgen.workload import RequestSpec

OK = "OK"


class TargetError(Exception):
    """The target cannot be used at all (unreachable, refuses the key, serves no model): one line for a person."""


@dataclass
class Chunk:
    """One message of a stream that carried output."""

    at: float  # time.perf_counter() when it arrived
    tokens: int | None  # tokens it carried; None when the API does not say (OpenAI events carry text)
    text: str = ""


@dataclass
class Reply:
    """Everything one request saw, with perf_counter times."""

    sent_at: float
    ended_at: float = 0.0
    status: str = OK  # OK, a gRPC status name, "HTTP 429", or what went wrong on the client's side
    error: str = ""
    retry_delay: float | None = None  # seconds, from the failure's google.rpc.RetryInfo when it has one
    chunks: list[Chunk] = field(default_factory=list)
    token_ids: list[int] | None = None  # the output's token ids, when the API returns them
    completion_tokens: int | None = None  # from the usage the server reported
    prompt_tokens: int | None = None
    finish_reason: str = ""


class Target(Protocol):
    """Sends one request and times its stream; failures are a Reply's status, never an exception."""

    @property
    def name(self) -> str:
        """What it is, for a person: `grpc 127.0.0.1:50051`, `openai http://host:8000/v1`."""
        ...

    @property
    def model(self) -> str: ...

    def describe(self) -> dict[str, object]: ...

    async def send(self, request: RequestSpec) -> Reply: ...
