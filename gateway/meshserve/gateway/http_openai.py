"""OpenAI's JSON <-> meshserve's GenerateRequest and responses. Pure functions: no HTTP, no gRPC.

The request models (openai_models) check what the JSON holds; this file copies each field to the proto
field its `Proto` marker names and translates the prompt and messages. Ranges, lengths and the model's
context are checked once, by gateway/validation.py, for both APIs.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message
from pydantic import BaseModel, ValidationError

from meshserve.common.enums import FINISH_REASON_NAMES
from meshserve.common.errors import invalid_argument
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.gateway import openai_responses as out
from meshserve.gateway.openai_errors import json_type, request_violations
from meshserve.gateway.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequestBody,
    TokenIds,
    proto_marker,
)
from meshserve.gateway.openai_structured import structured_output
from meshserve.v1 import common_pb2, inference_pb2


@dataclass
class OpenAIRequest:
    request: inference_pb2.GenerateRequest
    body: OpenAIRequestBody

    @property
    def chat(self) -> bool:
        return isinstance(self.body, ChatCompletionRequest)

    @property
    def stream(self) -> bool:
        return bool(self.body.stream)

    @property
    def include_usage(self) -> bool:
        options = self.body.stream_options
        return options is not None and bool(options.include_usage)


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body; INVALID_ARGUMENT naming what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"byte {body[exc.start]:#04x} at offset {exc.start}"
        raise invalid_argument([("body", f"is not valid UTF-8 ({where})")]) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise invalid_argument([("body", "is nested too deeply")]) from None
    except ValueError as exc:
        raise invalid_argument([("body", f"is not valid JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise invalid_argument([("body", f"must be a JSON object, got {json_type(data)}")])
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def chat_request(data: dict[str, Any]) -> OpenAIRequest:
    return _request(ChatCompletionRequest, data)


def completion_request(data: dict[str, Any]) -> OpenAIRequest:
    return _request(CompletionRequest, data)


def _request(model: type[ChatCompletionRequest] | type[CompletionRequest], data: dict[str, Any]) -> OpenAIRequest:
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise invalid_argument(request_violations(exc, model)) from None
    request = inference_pb2.GenerateRequest()
    for name, path in _copied_fields(model):
        value = getattr(body, name)
        if value is not None:
            _fill(request, path, value)
    structured, violations = structured_output(body)
    if structured is not None:
        request.sampling.structured.CopyFrom(structured)
    if body.stream_options is not None and not body.stream:
        violations.append(("stream_options", "is only allowed with stream: true"))
    if isinstance(body, ChatCompletionRequest):
        chat_messages = request.messages.messages
        for message in body.messages:
            added = chat_messages.add(
                role=message.role,
                content=message.text,
                tool_call_id=message.tool_call_id or "",
                name=message.name or "",
            )
            for call in message.tool_calls or ():
                added.tool_calls.add(id=call.id, name=call.function.name, arguments=call.function.arguments)
        request.messages.SetInParent()  # an empty list is still the messages input (validation says it is empty)
        for tool in body.tools or ():
            function = tool.function
            parameters = json.dumps(function.parameters) if function.parameters is not None else ""
            request.tools.add(name=function.name, description=function.description or "", parameters=parameters)
        if isinstance(body.tool_choice, str):
            modes = {"auto": inference_pb2.TOOL_CHOICE_AUTO, "none": inference_pb2.TOOL_CHOICE_NONE}
            request.tool_choice.mode = modes.get(body.tool_choice, inference_pb2.TOOL_CHOICE_REQUIRED)
        elif body.tool_choice is not None:
            request.tool_choice.function = body.tool_choice.function.name
        if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
            violations.append(
                ("max_completion_tokens", f"conflicts with max_tokens ({body.max_tokens}); send one of them")
            )
    else:
        _prompt(body.prompt, request)
        if body.logprobs is not None:  # completions' logprobs is the number of alternatives: asking for some
            request.sampling.logprobs = True
    if violations:
        raise invalid_argument(violations)
    return OpenAIRequest(request, body)


@functools.cache
def _copied_fields(model: type[BaseModel]) -> tuple[tuple[str, str], ...]:
    """(request field, proto path) of every field whose value goes to the proto as it is."""
    markers = ((name, proto_marker(model, name)) for name in model.model_fields)
    return tuple((name, marker.path) for name, marker in markers if marker is not None and marker.copy)


def _fill(message: Message, path: str, value: Any) -> None:
    """Sets the field at a dotted path (`sampling.top_p`); a list extends a repeated field."""
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
    if isinstance(value, list):
        getattr(message, name).extend(value)
    else:
        setattr(message, name, value)


def _prompt(prompt: str | TokenIds | list[str | TokenIds], request: inference_pb2.GenerateRequest) -> None:
    """A string, a list of token ids, or a batch: a list of strings or of token-id lists (one is that prompt)."""
    if isinstance(prompt, str) or all(isinstance(item, int) for item in prompt):
        _input(prompt, request)
    elif len(prompt) == 1:
        _input(prompt[0], request)
    else:
        for item in prompt:
            _input(item, request.batch.inputs.add())


def _input(prompt: Any, request: inference_pb2.GenerateRequest | inference_pb2.BatchInput) -> None:
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.token_ids.ids.extend(prompt)


# ---- responses -----------------------------------------------------------------------------------------


def usage_model(usage: common_pb2.Usage) -> out.Usage:
    return out.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=out.PromptTokensDetails(cached_tokens=usage.cached_prompt_tokens),
    )


def _assistant_message(completion: inference_pb2.Completion) -> out.AssistantMessage:
    if not completion.tool_calls:
        return out.AssistantMessage(content=completion.text)
    calls = [
        out.ToolCall(id=call.id, function=out.FunctionCall(name=call.name, arguments=call.arguments))
        for call in completion.tool_calls
    ]
    return out.AssistantMessage(content=None, tool_calls=calls)


def _tool_call_delta(call: common_pb2.ToolCall) -> out.ToolCallDelta:
    """A call's first piece carries its id, type and name; every piece its share of the arguments."""
    function = out.FunctionCallDelta(arguments=call.arguments)
    if call.id:
        function.name = call.name
        return out.ToolCallDelta(index=call.index, id=call.id, type="function", function=function)
    return out.ToolCallDelta(index=call.index, function=function)


def finish_reason(reason: int) -> str | None:
    return FINISH_REASON_NAMES.get(reason)


@dataclass
class ResponseShaper:
    """Builds OpenAI response objects for one request (both endpoints, whole and streamed)."""

    parsed: OpenAIRequest
    model: str
    request_id: str
    tokenizer: ModelTokenizer
    created: int = field(default_factory=lambda: int(time.time()))
    # Streaming state per choice index: whether its role was sent, its text offset (completions logprobs).
    _started: set[int] = field(default_factory=set)
    _offsets: dict[int, int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.parsed.chat else "cmpl-") + self.request_id

    @property
    def _logprobs_asked(self) -> bool:
        return self.parsed.request.sampling.logprobs

    def whole(self, reply: inference_pb2.GenerateResponse) -> out.ChatCompletion | out.Completion:
        envelope = {"id": self.id, "created": self.created, "model": self.model, "usage": usage_model(reply.usage)}
        if self.parsed.chat:
            chat_choices = [
                out.ChatChoice(
                    index=c.index,
                    message=_assistant_message(c),
                    logprobs=self._chat_logprobs(c.logprobs) if self._logprobs_asked else None,
                    finish_reason=finish_reason(c.finish_reason),
                )
                for c in reply.completions
            ]
            return out.ChatCompletion(**envelope, choices=chat_choices)
        choices = [
            out.CompletionChoice(
                index=c.index,
                text=c.text,
                logprobs=self._completion_logprobs(c.index, c.logprobs) if self._logprobs_asked else None,
                finish_reason=finish_reason(c.finish_reason),
            )
            for c in reply.completions
        ]
        return out.Completion(**envelope, object="text_completion", choices=choices)

    def chunk(self, message: inference_pb2.GenerateStreamResponse) -> str | None:
        """The stream event's JSON for one mesh message, or None (the final message without include_usage)."""
        chat = self.parsed.chat
        envelope: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.model,
        }
        if self.parsed.include_usage:
            envelope["usage"] = usage_model(message.usage) if message.final else None
        if message.final:
            if not self.parsed.include_usage:
                return None
            final = out.ChatCompletionChunk(**envelope, choices=[]) if chat else out.Completion(**envelope, choices=[])
            return final.model_dump_json(exclude_unset=True)
        index, finish = message.index, finish_reason(message.finish_reason)
        event: out.ChatCompletionChunk | out.Completion
        if chat:
            delta = out.ChatDelta()
            if index not in self._started:
                delta.role = "assistant"
            if message.tool_calls:
                delta.tool_calls = [_tool_call_delta(call) for call in message.tool_calls]
            elif message.text or index not in self._started:
                delta.content = message.text
            logprobs = self._chat_logprobs(message.logprobs) if self._logprobs_asked else None
            choice = out.ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
            event = out.ChatCompletionChunk(**envelope, choices=[choice])
        else:
            text_logprobs = self._completion_logprobs(index, message.logprobs) if self._logprobs_asked else None
            text = out.CompletionChoice(index=index, text=message.text, logprobs=text_logprobs, finish_reason=finish)
            event = out.Completion(**envelope, choices=[text])
        self._started.add(index)
        return event.model_dump_json(exclude_unset=True)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, logprobs: Sequence[common_pb2.TokenLogprob]) -> out.ChatLogprobs:
        content = []
        for lp in logprobs:
            token = self._token_text(lp.token_id)
            alternatives = [
                out.TopLogprob(token=(alt := self._token_text(top.token_id)), logprob=top.logprob, bytes=_bytes(alt))
                for top in lp.top_logprobs
            ]
            content.append(
                out.ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=_bytes(token), top_logprobs=alternatives)
            )
        return out.ChatLogprobs(content=content, refusal=None)

    def _completion_logprobs(self, index: int, logprobs: Sequence[common_pb2.TokenLogprob]) -> out.CompletionLogprobs:
        tokens, offsets = [], []
        offset = self._offsets.get(index, 0)
        for lp in logprobs:
            token = self._token_text(lp.token_id)
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
        self._offsets[index] = offset
        return out.CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in logprobs],
            top_logprobs=[{self._token_text(t.token_id): t.logprob for t in lp.top_logprobs} for lp in logprobs],
            text_offset=offsets,
        )


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def model_card(model: common_pb2.ModelInfo) -> out.ModelCard:
    return out.ModelCard(id=model.name, max_model_len=model.max_context_length)


def model_list(models: list[common_pb2.ModelInfo]) -> out.ModelList:
    return out.ModelList(data=[model_card(model) for model in models])
