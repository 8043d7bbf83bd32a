"""Constrained output through the unmodified `openai` client: response_format (json_schema, json_object) and
vLLM's structured_outputs (regex, choice, grammar), streamed and not."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from test_structured import CHOICES, PERSON, REGEX

MESSAGES = [{"role": "user", "content": "Describe someone"}]
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def test_json_schema_output_validates_for_50_seeds_streamed_and_not(client):
    for seed in range(50):
        reply = client.chat.completions.create(
            model="meshserve-tiny", messages=MESSAGES, response_format=PERSON_FORMAT, seed=seed, max_tokens=200
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        stream = client.chat.completions.create(
            model="meshserve-tiny", messages=MESSAGES, response_format=PERSON_FORMAT, seed=seed, max_tokens=200,
            stream=True,
        )  # fmt: skip
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == choice.message.content, seed


def test_a_regex_and_a_choice_hold_for_50_seeds_streamed_and_not_on_both_endpoints(client):
    regex = {"structured_outputs": {"regex": REGEX}}
    choice = {"structured_outputs": {"choice": CHOICES}}
    for seed in range(50):
        text = (
            client.completions.create(model="meshserve-tiny", prompt="Say", seed=seed, max_tokens=40, extra_body=regex)
            .choices[0]
            .text
        )
        assert re.fullmatch(REGEX, text), (seed, text)
        streamed = client.completions.create(
            model="meshserve-tiny", prompt="Say", seed=seed, max_tokens=40, extra_body=regex, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed if c.choices) == text
        answer = (
            client.chat.completions.create(
                model="meshserve-tiny", messages=MESSAGES, seed=seed, max_tokens=20, extra_body=choice
            )
            .choices[0]
            .message.content
        )
        assert answer in CHOICES
        streamed = client.chat.completions.create(
            model="meshserve-tiny", messages=MESSAGES, seed=seed, max_tokens=20, extra_body=choice, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answer


def test_a_grammar_and_json_object_mode(client):
    grammar = 'start: "[" WORD ("," WORD)* "]"\nWORD: /[a-z]{1,5}/'
    lark = {"structured_outputs": {"grammar": grammar}}
    text = (
        client.completions.create(model="meshserve-tiny", prompt="List", seed=1, max_tokens=60, extra_body=lark)
        .choices[0]
        .text
    )
    assert re.fullmatch(r"\[[a-z]{1,5}(,[a-z]{1,5})*\]", text), text
    reply = client.chat.completions.create(
        model="meshserve-tiny", messages=MESSAGES, seed=2, max_tokens=60, response_format={"type": "json_object"}
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert reply.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
         "response_format", "frob"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "is required"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "unclosed group"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"choice": ["a"]}, "guided_regex": "b"}, "guided_regex", "conflicts with"),
    ],
)  # fmt: skip
def test_a_bad_constraint_is_a_400_naming_the_field(client, extra, field, says):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="meshserve-tiny", messages=MESSAGES, max_tokens=5, extra_body=extra)
    error = caught.value.body
    assert error["param"].startswith(field) and says in error["message"], error
