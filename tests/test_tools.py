"""Tool calling in the chat API, through the unmodified `openai` client: tools rendered by the chat template,
tool_choice named, required, auto and none, calls streamed as deltas, and the history of calls and results."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from meshserve.gateway.tools import AUTO, ToolCallStream, ToolUse
from meshserve.v1 import common_pb2, inference_pb2

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["utc", "local"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_a_named_tool_choice_returns_a_call_whose_arguments_follow_the_schema(client):
    for seed in range(10):
        reply = client.chat.completions.create(
            model="meshserve-tiny", messages=ASK, tools=TOOLS, tool_choice=NAMED, seed=seed, max_tokens=100
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_a_streamed_call_arrives_as_deltas_that_add_up_to_the_whole_call(client):
    whole = (
        client.chat.completions.create(
            model="meshserve-tiny", messages=ASK, tools=TOOLS, tool_choice=NAMED, seed=3, max_tokens=100
        )
        .choices[0]
        .message.tool_calls[0]
    )
    stream = client.chat.completions.create(
        model="meshserve-tiny", messages=ASK, tools=TOOLS, tool_choice=NAMED, seed=3, max_tokens=100, stream=True
    )
    deltas, finishes = [], []
    for chunk in stream:
        for choice in chunk.choices:
            deltas += choice.delta.tool_calls or []
            finishes.append(choice.finish_reason)
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].type == "function"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == whole.function.arguments
    assert finishes[-1] == "tool_calls"


def test_required_calls_one_of_the_tools_and_none_answers_in_text(client):
    schemas = {"get_weather": WEATHER, "get_time": TIME}
    for seed in range(6):
        reply = client.chat.completions.create(
            model="meshserve-tiny", messages=ASK, tools=TOOLS, tool_choice="required", seed=seed, max_tokens=100
        )
        (call,) = reply.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert reply.choices[0].finish_reason == "tool_calls"
    text = client.chat.completions.create(
        model="meshserve-tiny", messages=ASK, tools=TOOLS, tool_choice="none", seed=1, max_tokens=8
    ).choices[0]
    assert text.message.tool_calls is None and text.message.content is not None


def test_calls_and_results_in_the_history_are_rendered_by_the_template(client, tokenizer):
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]  # fmt: skip
    reply = client.chat.completions.create(model="meshserve-tiny", messages=history, tools=TOOLS, max_tokens=4)
    rendered = tokenizer.render_chat(
        [
            {"role": "user", "content": ASK[0]["content"]},
            {"role": "assistant", "content": "", "tool_calls": history[1]["tool_calls"]},
            {"role": "tool", "content": "18 degrees", "tool_call_id": "call_1"},
        ],
        tools=TOOLS,
    )
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in rendered
    assert '<tool_response id="call_1">18 degrees</tool_response>' in rendered
    assert '"name": "get_time"' in rendered.split("<|user|>")[0]  # the tools, in the system turn first
    assert reply.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    # Without tools the template writes what it always did.
    plain = tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert plain == "<s><|user|>\nHi<|end|>\n<|assistant|>\n"


def test_auto_reads_a_call_the_model_writes_and_releases_text_that_is_none():
    def read(pieces: list[str]) -> list[inference_pb2.GenerateStreamResponse]:
        reader = ToolCallStream(ToolUse(AUTO))
        messages = []
        for i, piece in enumerate(pieces):
            message = inference_pb2.GenerateStreamResponse(text=piece)
            if i == len(pieces) - 1:
                message.finish_reason = common_pb2.FINISH_REASON_STOP
            reader.read(message)
            messages.append(message)
        return messages

    call = read(["<tool_", 'call>{"name": "get_time", ', '"arguments": {"zone": "utc"}}', "</tool_call>"])
    assert [m.text for m in call] == ["", "", "", ""]
    (delta,) = call[-1].tool_calls
    assert delta.name == "get_time" and json.loads(delta.arguments) == {"zone": "utc"} and delta.id
    assert call[-1].finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    text = read(["<to", "day is fine", "."])
    assert "".join(m.text for m in text) == "<today is fine." and not any(m.tool_calls for m in text)
    assert text[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    broken = read(["<tool_call>", '{"name": 3}', "</tool_call>"])  # not a call after all: its text
    assert "".join(m.text for m in broken) == '<tool_call>{"name": 3}</tool_call>'


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "names no tool"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
          "tool_choice": "required"}, "tools[0].parameters", "frob"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].name", "letters"),
        ({"tools": [], "tool_choice": "required"}, "tool_choice", "no tools"),
        ({"response_format": {"type": "json_object"}, "tool_choice": NAMED}, "response_format", "conflicts"),
    ],
)  # fmt: skip
def test_a_bad_tool_request_is_a_400_naming_the_field(client, extra, param, says):
    body = {"tools": TOOLS, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="meshserve-tiny", messages=ASK, max_tokens=5, extra_body=body)
    error = caught.value.body
    assert error["param"].startswith(param) and says in error["message"], error
