"""A GenerateRequest from a call's arguments: a prompt or chat messages, and sampling as keywords."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshserve.common.enums import PRIORITY_BY_NAME
from meshserve.v1 import common_pb2, inference_pb2

Message = Mapping[str, str] | tuple[str, str] | common_pb2.ChatMessage


def make_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Message] | None = None,
    request: inference_pb2.GenerateRequest | None = None,
    model: str = "",
    n: int = 1,
    priority: str | int = "normal",
    request_id: str = "",
    **sampling: Any,
) -> inference_pb2.GenerateRequest:
    """Exactly one of `prompt` (text), `messages` (chat: {"role": ..., "content": ...} or (role, content)) or
    `request` (a whole GenerateRequest, for batches, map-reduce, best_of, ...; sent as it is). `sampling`:
    SamplingParams fields by name (max_tokens=32, temperature=0, stop=["\\n"], seed=7, ...)."""
    inputs = (("prompt", prompt), ("messages", messages), ("request", request))
    given = [name for name, value in inputs if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages or request (given: {', '.join(given) or 'none'})")
    if request is not None:
        if sampling:
            raise ValueError("sampling keywords go in the request's own SamplingParams when a request is given")
        return request
    try:
        params = common_pb2.SamplingParams(**sampling)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad sampling parameter: {exc}") from None
    built = inference_pb2.GenerateRequest(
        model=model, sampling=params, n=n, priority=_priority(priority), request_id=request_id
    )
    if prompt is not None:
        built.prompt = prompt
    else:
        for message in messages or ():
            built.messages.messages.append(_chat_message(message))
    return built


def _priority(priority: str | int) -> int:
    if isinstance(priority, int):
        return priority
    try:
        return PRIORITY_BY_NAME[priority.lower()]
    except KeyError:
        raise ValueError(f"priority must be one of {', '.join(PRIORITY_BY_NAME)}, not {priority!r}") from None


def _chat_message(message: Message) -> common_pb2.ChatMessage:
    if isinstance(message, common_pb2.ChatMessage):
        return message
    if isinstance(message, tuple):
        role, content = message
        return common_pb2.ChatMessage(role=role, content=content)
    return common_pb2.ChatMessage(role=message["role"], content=message["content"])
