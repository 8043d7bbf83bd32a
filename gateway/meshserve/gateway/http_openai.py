"""OpenAI's JSON <-> meshserve's GenerateRequest and responses. Pure functions: no HTTP, no gRPC.

Only types and what a proto field can hold are checked here; ranges, lengths and the model's
context are checked once, by gateway/validation.py, for both APIs. Its errors name proto fields
(`sampling.max_tokens`); `openai_param` renames them to what the caller sent (`max_tokens`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshserve.common.enums import FINISH_REASON_NAMES, PRIORITY_BY_NAME
from meshserve.common.errors import invalid_argument
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.v1 import common_pb2, inference_pb2

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
FLOAT32_MAX = 3.4028234663852886e38

# Accepted by both endpoints. top_k, min_p, repetition_penalty, ignore_eos and stop_token_ids are
# meshserve's (as in vLLM), passed by the openai package through `extra_body`.
COMMON_FIELDS = {
    "model", "stream", "stream_options", "n", "stop", "seed", "max_tokens", "temperature", "top_p",
    "presence_penalty", "frequency_penalty", "priority", "user", "logit_bias", "logprobs",
    "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids",
}  # fmt: skip
CHAT_FIELDS = COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "store", "metadata",
}  # fmt: skip
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "best_of", "echo", "suffix"}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

Violations = list[tuple[str, str]]


@dataclass
class OpenAIRequest:
    request: inference_pb2.GenerateRequest
    chat: bool
    stream: bool = False
    include_usage: bool = False
    # Which of max_tokens / max_completion_tokens the caller used, to name it in errors.
    max_tokens_param: str = "max_tokens"


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
        raise invalid_argument([("body", f"must be a JSON object, got {_json_type(data)}")])
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def chat_request(body: Mapping[str, Any]) -> OpenAIRequest:
    violations: Violations = []
    _unknown_fields(body, CHAT_FIELDS, violations)
    request, parsed = _common(body, violations, chat=True)
    messages = body.get("messages")
    if messages is None:
        violations.append(("messages", "is required: a list of {role, content} objects"))
    elif not isinstance(messages, list):
        violations.append(("messages", f"must be a list of {{role, content}} objects, got {_json_type(messages)}"))
    else:
        chat_messages = inference_pb2.ChatMessages()
        for i, message in enumerate(messages):
            role, content = _message(message, f"messages[{i}]", violations)
            chat_messages.messages.add(role=role, content=content)
        request.messages.CopyFrom(chat_messages)
    max_tokens = _int(body, "max_tokens", 1, UINT32_MAX, violations)
    max_completion_tokens = _int(body, "max_completion_tokens", 1, UINT32_MAX, violations)
    if max_tokens is not None and max_completion_tokens is not None and max_tokens != max_completion_tokens:
        violations.append(("max_completion_tokens", f"conflicts with max_tokens ({max_tokens}); send one of them"))
    if max_completion_tokens is not None:
        request.sampling.max_tokens = max_completion_tokens
        parsed.max_tokens_param = "max_completion_tokens"
    elif max_tokens is not None:
        request.sampling.max_tokens = max_tokens
    logprobs = _bool(body, "logprobs", violations)
    top_logprobs = _int(body, "top_logprobs", 0, UINT32_MAX, violations)
    if logprobs:
        request.sampling.logprobs = True
    if top_logprobs is not None:
        request.sampling.top_logprobs = top_logprobs
    if body.get("response_format") not in (None, {"type": "text"}):
        violations.append(("response_format", 'only {"type": "text"} is supported'))
    for name in ("tools", "functions"):
        if body.get(name) not in (None, []):
            violations.append((name, "tool and function calling are not supported"))
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            violations.append((name, 'only "none" is supported (no tool calling)'))
    _bool(body, "parallel_tool_calls", violations)
    _bool(body, "store", violations)
    if violations:
        raise invalid_argument(violations)
    parsed.request = request
    return parsed


def completion_request(body: Mapping[str, Any]) -> OpenAIRequest:
    violations: Violations = []
    _unknown_fields(body, COMPLETION_FIELDS, violations)
    request, parsed = _common(body, violations, chat=False)
    _prompt(body.get("prompt"), request, violations)
    max_tokens = _int(body, "max_tokens", 1, UINT32_MAX, violations)
    if max_tokens is not None:
        request.sampling.max_tokens = max_tokens
    # Completions' logprobs is the number of alternatives per token (0: only the chosen one's).
    logprobs = _int(body, "logprobs", 0, UINT32_MAX, violations)
    if logprobs is not None:
        request.sampling.logprobs = True
        request.sampling.top_logprobs = logprobs
    best_of = _int(body, "best_of", 1, UINT32_MAX, violations)
    if best_of is not None:
        request.best_of = best_of
    if _bool(body, "echo", violations):
        violations.append(("echo", "is not supported; the prompt is not repeated in the completion"))
    if _str(body, "suffix", violations):
        violations.append(("suffix", "is not supported (no fill-in-the-middle)"))
    if violations:
        raise invalid_argument(violations)
    parsed.request = request
    return parsed


def _common(
    body: Mapping[str, Any], violations: Violations, chat: bool
) -> tuple[inference_pb2.GenerateRequest, OpenAIRequest]:
    request = inference_pb2.GenerateRequest()
    parsed = OpenAIRequest(request, chat)
    request.model = _str(body, "model", violations) or ""
    parsed.stream = bool(_bool(body, "stream", violations))
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            violations.append(("stream_options", 'must be an object like {"include_usage": true}'))
        else:
            parsed.include_usage = bool(_bool(options, "include_usage", violations, "stream_options."))
        if not parsed.stream:
            violations.append(("stream_options", "is only allowed with stream: true"))
    n = _int(body, "n", 1, UINT32_MAX, violations)
    if n is not None:
        request.n = n
    priority = body.get("priority")
    if priority is not None:
        if isinstance(priority, str) and priority.lower() in PRIORITY_BY_NAME:
            request.priority = PRIORITY_BY_NAME[priority.lower()]
        else:
            violations.append(("priority", f"must be one of {', '.join(PRIORITY_BY_NAME)}, got {_short(priority)}"))
    sampling = request.sampling
    stop = body.get("stop")
    if isinstance(stop, str):
        _check_text(stop, "stop", violations)
        sampling.stop.append(stop)
    elif isinstance(stop, list):
        for i, item in enumerate(stop):
            if not isinstance(item, str):
                violations.append((f"stop[{i}]", f"must be a string, got {_json_type(item)}"))
            elif _check_text(item, f"stop[{i}]", violations):
                sampling.stop.append(item)
    elif stop is not None:
        violations.append(("stop", f"must be a string or a list of strings, got {_json_type(stop)}"))
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        ids = _token_ids(stop_ids, "stop_token_ids", violations)
        sampling.stop_token_ids.extend(ids)
    seed = _int(body, "seed", 0, UINT64_MAX, violations)
    if seed is not None:
        sampling.seed = seed
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = _float(body, name, violations)
        if value is not None:
            setattr(sampling, name, value)
    for name in ("presence_penalty", "frequency_penalty", "min_p"):
        value = _float(body, name, violations)
        if value is not None:
            setattr(sampling, name, value)
    top_k = _int(body, "top_k", -1, UINT32_MAX, violations)
    if top_k is not None and top_k > 0:  # -1 means off in vLLM and others
        sampling.top_k = top_k
    if _bool(body, "ignore_eos", violations):
        sampling.ignore_eos = True
    _str(body, "user", violations)
    if body.get("logit_bias") not in (None, {}):
        violations.append(("logit_bias", "is not supported"))
    return request, parsed


def _prompt(prompt: Any, request: inference_pb2.GenerateRequest, violations: Violations) -> None:
    """A string, a list of token ids, or a batch: a list of strings or of token-id lists."""
    if prompt is None:
        violations.append(("prompt", "is required: a string, a list of token ids, or a list of either"))
    elif isinstance(prompt, str):
        if _check_text(prompt, "prompt", violations):
            request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        request.token_ids.ids.extend(_token_ids(prompt, "prompt", violations))
    elif isinstance(prompt, list) and prompt:
        inputs = []
        for i, item in enumerate(prompt):
            one = inference_pb2.BatchInput()
            if isinstance(item, str):
                if _check_text(item, f"prompt[{i}]", violations):
                    one.prompt = item
            elif isinstance(item, list):
                one.token_ids.ids.extend(_token_ids(item, f"prompt[{i}]", violations))
            else:
                violations.append((f"prompt[{i}]", f"must be a string or a list of token ids, got {_json_type(item)}"))
            inputs.append(one)
        if len(inputs) == 1:  # one prompt in a list is that prompt
            only = inputs[0]
            if only.HasField("prompt"):
                request.prompt = only.prompt
            else:
                request.token_ids.CopyFrom(only.token_ids)
        else:
            request.batch.inputs.extend(inputs)
    else:
        violations.append(("prompt", f"must be a non-empty string or list, got {_short(prompt)}"))


def _message(message: Any, where: str, violations: Violations) -> tuple[str, str]:
    if not isinstance(message, dict):
        violations.append((where, f"must be an object with role and content, got {_json_type(message)}"))
        return "", ""
    role = message.get("role")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        violations.append((f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {_short(role)}"))
        role = ""
    content = message.get("content")
    if content is None:
        return role, ""
    if isinstance(content, str):
        return role, content if _check_text(content, f"{where}.content", violations) else ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                if _check_text(part["text"], f"{where}.content[{j}].text", violations):
                    texts.append(part["text"])
            else:
                violations.append((f"{where}.content[{j}]", 'must be {"type": "text", "text": "..."} (text only)'))
        return role, "".join(texts)
    violations.append((f"{where}.content", f"must be a string or a list of text parts, got {_json_type(content)}"))
    return role, ""


def _token_ids(value: Any, name: str, violations: Violations) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        violations.append((name, "must be a list of integer token ids"))
        return []
    if any(not 0 <= v <= UINT32_MAX for v in value):
        violations.append((name, f"token ids must be between 0 and {UINT32_MAX}"))
        return []
    return value


def _unknown_fields(body: Mapping[str, Any], allowed: set[str], violations: Violations) -> None:
    for name in sorted(set(body) - allowed):
        shown = json.dumps(name[:64], ensure_ascii=True)[1:-1] or '""'  # printable, and never empty
        violations.append((shown, "is not a recognised field of this endpoint"))


def _int(
    body: Mapping[str, Any], name: str, low: int, high: int, violations: Violations, prefix: str = ""
) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        violations.append((prefix + name, f"must be an integer, got {_json_type(value)}"))
        return None
    if not low <= value <= high:
        violations.append((prefix + name, f"must be between {low} and {high}, got {_short(value)}"))
        return None
    return value


def _float(body: Mapping[str, Any], name: str, violations: Violations) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        violations.append((name, f"must be a number, got {_json_type(value)}"))
        return None
    # float32 on the wire: larger values would silently become infinity.
    finite = abs(value) <= FLOAT32_MAX if isinstance(value, int) else math.isfinite(value) and abs(value) <= FLOAT32_MAX
    if not finite:
        violations.append((name, f"must be a finite number, got {_short(value)}"))
        return None
    return float(value)


def _bool(body: Mapping[str, Any], name: str, violations: Violations, prefix: str = "") -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    violations.append((prefix + name, f"must be true or false, got {_json_type(value)}"))
    return None


def _str(body: Mapping[str, Any], name: str, violations: Violations) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        violations.append((name, f"must be a string, got {_json_type(value)}"))
        return None
    return value if _check_text(value, name, violations) else None


def _check_text(text: str, name: str, violations: Violations) -> bool:
    """JSON's \\ud800 escapes decode to lone surrogates, which are not text (nor UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        violations.append((name, f"is not valid Unicode text (lone surrogate at character {exc.start})"))
        return False
    return True


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return {list: "a list", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = (
        json.dumps(value, ensure_ascii=True) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    )
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- errors: proto field names -> the caller's names -------------------------------------------------

_SAMPLING_IN_TEXT = re.compile(r"\bsampling\.(\w+)")


def openai_param(field_path: str, parsed: OpenAIRequest | None) -> str:
    """The name the caller used for a field a proto-level check named."""
    chat = parsed is not None and parsed.chat
    if field_path.startswith("sampling."):
        rest = field_path.removeprefix("sampling.")
        if rest.startswith("max_tokens"):
            return (parsed.max_tokens_param if parsed else "max_tokens") + rest.removeprefix("max_tokens")
        if rest.startswith("top_logprobs") and parsed is not None and not chat:
            return "logprobs" + rest.removeprefix("top_logprobs")
        return rest
    head = re.split(r"[.\[]", field_path, maxsplit=1)[0]
    if head in ("prompt", "input", "token_ids"):
        return "messages" if chat else "prompt"
    if head == "batch":  # batch.inputs[i]... came from the completions prompt list
        return "prompt" + field_path.removeprefix("batch.inputs")
    if head == "request_id":
        return "X-Request-Id"
    return field_path


def openai_text(description: str, parsed: OpenAIRequest | None) -> str:
    return _SAMPLING_IN_TEXT.sub(lambda m: openai_param(m.group(0), parsed), description)


# ---- responses -----------------------------------------------------------------------------------------


def usage_json(usage: common_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


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

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, reply: inference_pb2.GenerateResponse) -> dict[str, Any]:
        choices = []
        for completion in reply.completions:
            logprobs = (
                self._logprobs(completion.index, completion.logprobs) if self.parsed.request.sampling.logprobs else None
            )
            choice: dict[str, Any] = {"index": completion.index}
            if self.parsed.chat:
                choice["message"] = {"role": "assistant", "content": completion.text}
            else:
                choice["text"] = completion.text
            choice["logprobs"] = logprobs
            choice["finish_reason"] = finish_reason(completion.finish_reason)
            choices.append(choice)
        obj = "chat.completion" if self.parsed.chat else "text_completion"
        return {**self._envelope(obj), "choices": choices, "usage": usage_json(reply.usage)}

    def chunk(self, message: inference_pb2.GenerateStreamResponse) -> dict[str, Any] | None:
        """The stream event for one mesh message, or None (the final message without include_usage)."""
        obj = "chat.completion.chunk" if self.parsed.chat else "text_completion"
        if message.final:
            if not self.parsed.include_usage:
                return None
            return {**self._envelope(obj), "choices": [], "usage": usage_json(message.usage)}
        index = message.index
        logprobs = self._logprobs(index, message.logprobs) if self.parsed.request.sampling.logprobs else None
        choice: dict[str, Any] = {"index": index}
        if self.parsed.chat:
            delta: dict[str, Any] = {}
            if index not in self._started:
                delta["role"] = "assistant"
            if message.text or index not in self._started:
                delta["content"] = message.text
            choice["delta"] = delta
        else:
            choice["text"] = message.text
        self._started.add(index)
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason(message.finish_reason)
        event = {**self._envelope(obj), "choices": [choice]}
        if self.parsed.include_usage:
            event["usage"] = None
        return event

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, index: int, logprobs: Any) -> dict[str, Any]:
        if self.parsed.chat:
            content = []
            for lp in logprobs:
                token = self._token_text(lp.token_id)
                content.append(
                    {
                        "token": token,
                        "logprob": lp.logprob,
                        "bytes": list(token.encode("utf-8")),
                        "top_logprobs": [
                            {
                                "token": (alt := self._token_text(top.token_id)),
                                "logprob": top.logprob,
                                "bytes": list(alt.encode("utf-8")),
                            }
                            for top in lp.top_logprobs
                        ],
                    }
                )
            return {"content": content, "refusal": None}
        tokens, offsets = [], []
        offset = self._offsets.get(index, 0)
        for lp in logprobs:
            token = self._token_text(lp.token_id)
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
        self._offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{self._token_text(t.token_id): t.logprob for t in lp.top_logprobs} for lp in logprobs],
            "text_offset": offsets,
        }


def models_json(models: list[common_pb2.ModelInfo]) -> dict[str, Any]:
    return {"object": "list", "data": [model_json(model) for model in models]}


def model_json(model: common_pb2.ModelInfo) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": 0,
        "owned_by": "meshserve",
        "max_model_len": model.max_context_length,
    }
