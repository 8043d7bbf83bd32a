"""Tool calling, the gateway's part: the tools go into the chat template; `tool_choice` decides how the output
is read, and, when a call is required, constrains it (common/structured.py) to the tools' schemas.

- auto: the model decides; an answer that is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  (the built-in template's convention, Hermes-style) is read as that call, anything else is text.
- none: the answer is text.
- required: one call of one of the tools: the output is `{"name": ..., "arguments": {...}}`, constrained.
- a named function: the output is that function's arguments, constrained to its parameters' schema, and
  streams as argument deltas of the one call.

The calls leave as ToolCall messages (whole in a Completion, deltas in a stream) and the finish reason is
TOOL_CALLS; the text they came from is not sent.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from meshserve.common.sampling import Violation
from meshserve.common.structured import grammar_of
from meshserve.v1 import common_pb2, inference_pb2

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
AUTO, NONE, REQUIRED, NAMED = "auto", "none", "required", "named"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolUse:
    """How a request's output is read: its mode and, for a named choice, the function."""

    mode: str
    function: str = ""


def tool_use(request: inference_pb2.GenerateRequest, violations: list[Violation]) -> ToolUse | None:
    """The request's tool use (None without tools), its problems added to `violations`."""
    choice = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if not request.tools:
        if choice == "function" or (
            choice == "mode" and request.tool_choice.mode == inference_pb2.TOOL_CHOICE_REQUIRED
        ):
            violations.append(("tool_choice", "asks for a tool call, but the request has no tools"))
        return None
    if request.WhichOneof("input") != "messages":
        violations.append(("tools", "are only taken with chat messages"))
    if len(request.tools) > MAX_TOOLS:
        violations.append(("tools", f"must hold at most {MAX_TOOLS} tools, got {len(request.tools)}"))
        return None
    names = [tool.name for tool in request.tools]
    for index, tool in enumerate(request.tools):
        if not TOOL_NAME.match(tool.name):
            violations.append((f"tools[{index}].name", "must be 1-64 letters, digits and _ . -"))
        elif names.index(tool.name) != index:
            violations.append(
                (f"tools[{index}].name", f"{tool.name!r} is already the name of tools[{names.index(tool.name)}]")
            )
        if tool.parameters:
            try:
                parameters = json.loads(tool.parameters)
            except json.JSONDecodeError as exc:
                violations.append((f"tools[{index}].parameters", f"is not JSON: {exc.msg}"))
                continue
            except RecursionError:
                violations.append((f"tools[{index}].parameters", "is nested too deeply"))
                continue
            if not isinstance(parameters, dict):
                violations.append((f"tools[{index}].parameters", "must be a JSON Schema object"))
    if choice == "function":
        if request.tool_choice.function not in names:
            violations.append(("tool_choice", f"names no tool of the request: {request.tool_choice.function[:64]!r}"))
            return None
        use = ToolUse(NAMED, request.tool_choice.function)
    elif choice == "mode" and request.tool_choice.mode not in inference_pb2.ToolChoiceMode.values():
        violations.append(("tool_choice", "must be auto, none, required or a function"))
        return None
    else:
        mode = request.tool_choice.mode if choice == "mode" else inference_pb2.TOOL_CHOICE_AUTO
        modes = {inference_pb2.TOOL_CHOICE_NONE: NONE, inference_pb2.TOOL_CHOICE_REQUIRED: REQUIRED}
        use = ToolUse(modes.get(mode, AUTO))
    # The schemas that will constrain the output must compile (checked here to name the tool).
    for index, tool in enumerate(request.tools):
        if tool.parameters and (use.mode == REQUIRED or use.function == tool.name):
            try:
                grammar_of(common_pb2.StructuredOutput(json_schema=tool.parameters))
            except ValueError as exc:
                violations.append((f"tools[{index}].parameters", str(exc)))
    return use


def template_tools(request: inference_pb2.GenerateRequest) -> list[dict[str, Any]]:
    """The tools as chat templates take them (OpenAI's shape)."""
    tools = []
    for tool in request.tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        function["parameters"] = _parameters(tool)
        tools.append({"type": "function", "function": function})
    return tools


def template_message(message: common_pb2.ChatMessage) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        rendered["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments or "{}"}}
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name:
        rendered["name"] = message.name
    return rendered


def tool_grammar(request: inference_pb2.GenerateRequest, use: ToolUse) -> common_pb2.StructuredOutput | None:
    """The constraint a required or named call puts on the output."""
    if use.mode == NAMED:
        tool = next(t for t in request.tools if t.name == use.function)
        return common_pb2.StructuredOutput(json_schema=json.dumps(_parameters(tool)))
    if use.mode == REQUIRED:
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": _parameters(tool)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in request.tools
        ]
        return common_pb2.StructuredOutput(json_schema=json.dumps({"anyOf": calls}))
    return None


def _parameters(tool: common_pb2.Tool) -> dict[str, Any]:
    """The tool's schema; parameters that are not a JSON object (tool_use refuses the request for them) stand in
    as any object, so that the template still renders and the refusal names the field."""
    try:
        parameters = json.loads(tool.parameters) if tool.parameters else ANY_OBJECT
    except (ValueError, RecursionError):
        return ANY_OBJECT
    return parameters if isinstance(parameters, dict) else ANY_OBJECT


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def read_calls(text: str, use: ToolUse) -> list[common_pb2.ToolCall] | None:
    """The calls a whole output makes, or None when it is text."""
    if use.mode == NAMED:
        return [common_pb2.ToolCall(index=0, id=new_call_id(), name=use.function, arguments=text)]
    if use.mode == REQUIRED:
        call = _call(text)
        return [call] if call is not None else None
    if use.mode == AUTO:
        stripped = text.strip()
        if stripped.startswith(CALL_OPEN) and stripped.endswith(CALL_CLOSE):
            call = _call(stripped[len(CALL_OPEN) : -len(CALL_CLOSE)])
            return [call] if call is not None else None
    return None


def _call(text: str) -> common_pb2.ToolCall | None:
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return None
    arguments = body.get("arguments", {})
    return common_pb2.ToolCall(index=0, id=new_call_id(), name=body["name"], arguments=json.dumps(arguments))


@dataclass
class ToolCallStream:
    """One index's stream read as tool calls: a named call's text goes out as argument deltas at once; a
    required or auto call is held until the output is whole (auto releases text that is no call)."""

    use: ToolUse
    held: list[str] = field(default_factory=list)
    call_id: str = ""

    def read(self, message: inference_pb2.GenerateStreamResponse) -> None:
        """Rewrites `message` in place: text becomes call deltas, or is held."""
        if self.use.mode == NONE or message.final:
            return
        text, message.text = message.text, ""
        if self.use.mode == NAMED:
            delta = message.tool_calls.add(index=0, arguments=text)
            if not self.call_id:
                self.call_id = delta.id = new_call_id()
                delta.name = self.use.function
            elif not text:
                del message.tool_calls[:]
        else:
            self.held.append(text)
            if self.use.mode == AUTO and not _may_be_call("".join(self.held)):
                message.text, self.held = "".join(self.held), []  # plain text after all: released
                self.use = ToolUse(NONE)
        if message.finish_reason:
            if self.use.mode in (REQUIRED, AUTO):
                whole, self.held = "".join(self.held), []
                calls = read_calls(whole, self.use) if message.finish_reason == common_pb2.FINISH_REASON_STOP else None
                if calls is None:  # not a (whole) call: the text it was
                    message.text = whole
                    return
                message.tool_calls.extend(calls)
            if (message.tool_calls or self.call_id) and message.finish_reason == common_pb2.FINISH_REASON_STOP:
                message.finish_reason = common_pb2.FINISH_REASON_TOOL_CALLS


def _may_be_call(text: str) -> bool:
    """The text so far could still be the start of `<tool_call>...` (leading whitespace allowed)."""
    stripped = text.lstrip()
    return stripped.startswith(CALL_OPEN) or CALL_OPEN.startswith(stripped)
