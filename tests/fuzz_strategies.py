"""Hypothesis strategies for the JSON side of the fuzz suites: OpenAI bodies, raw bodies, paths and headers, and
the pieces the protos' strategies (fuzz_messages) share with them.

Most fields are valid most of the time (`mostly`, `field`), so that a good share of requests get past the first
check and run on a worker; each field is odd now and then: another JSON type, an extreme number, a boundary of
the built-in model (1412 token ids, a context of 2048), a constraint nested too deep. Valid requests ask for a
handful of tokens: a fuzz run spends its time on many requests, not on long ones.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from hypothesis import strategies as st

VOCAB = 1412  # the built-in model's: ids at and around it are the boundary
CONTEXT = 2048
MODEL = "meshserve-tiny"
token_ids = st.integers(min_value=0, max_value=VOCAB - 1)


def mostly(valid: st.SearchStrategy, odd: st.SearchStrategy, one_in: int = 4) -> st.SearchStrategy:
    """Odd one time in `one_in`."""
    return st.integers(min_value=1, max_value=one_in).flatmap(lambda k: odd if k == one_in else valid)


def odd_field(valid: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """One field of a proto among a few dozen: odd one time in twenty, so that a third of messages are all valid."""
    return mostly(valid, odd, one_in=20)


def sometimes(value: st.SearchStrategy, one_in: int = 4) -> st.SearchStrategy:
    """None (unset) but one time in `one_in`."""
    return mostly(st.none(), value, one_in)


# ---- JSON and text ---------------------------------------------------------------------------------------------

huge_ints = st.integers(min_value=-(2**70), max_value=2**70)
any_floats = st.floats(allow_nan=False, allow_infinity=False)
json_leaves = st.none() | st.booleans() | huge_ints | any_floats | st.text(max_size=12)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# Deeper than any parser's recursion limit, as text: "[[[[..." and '{"a": {"a": ...'.
CLOSERS = {"[": "]", '{"a":': "}", '{"type": "array", "items": ': "}"}
deep_json = st.builds(
    lambda depth, opener, closed: opener * depth + ("0" + CLOSERS[opener] * depth if closed else ""),
    st.sampled_from([10, 900, 1100, 5_000, 30_000]),
    st.sampled_from(sorted(CLOSERS)),
    st.booleans(),
)
text = st.text(max_size=40) | st.sampled_from(["", "Hello", "\x00", "a\u0301", "😀" * 5, "x" * 3000])
json_text = text | st.just("\ud800")  # a lone surrogate: JSON can say it (escaped), a proto string cannot
short_text = st.text(max_size=8)


def field(valid: st.SearchStrategy, extreme: st.SearchStrategy) -> st.SearchStrategy:
    """An optional field of an OpenAI body: with many of them in one body, each is odd only one time in eight."""
    return mostly(valid, extreme | json_values, one_in=8)


# ---- constraints: JSON Schemas, regexes, grammars ----------------------------------------------------------------

schemas = st.sampled_from(
    [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"type": "string", "maxLength": 3},
        {"enum": ["yes", "no"]},
        {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        True,
        False,
        {"$ref": "#/nowhere"},
        {"type": "string", "pattern": "("},
        {"type": "integer", "minimum": 5, "maximum": 1},
        {"type": "number", "minimum": 1e308},
        {"anyOf": []},
        {"type": 5},
    ]
)
regexes = st.sampled_from(["[a-z]{1,4}", "yes|no", r"\d{1,3}", "(", "a{99999}", r"\p{Greek}+", "", "(a|b)*c"]) | text
grammars = st.sampled_from(['start: "a" | "b"', "start: start", "start: /[0-9]+/", "", "%import x"]) | text
choices = st.lists(st.sampled_from(["yes", "no", "maybe", ""]) | short_text, max_size=4)
schema_texts = st.builds(json.dumps, schemas) | deep_json | text

openai_schemas = schemas | json_values | st.builds(json.loads, st.sampled_from(['{"a":' * 50 + "1" + "}" * 50]))
response_formats = st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | st.fixed_dictionaries(
    {
        "type": st.just("json_schema"),
        "json_schema": st.fixed_dictionaries({"name": st.just("x"), "schema": openai_schemas}),
    }
)
structured_outputs = st.one_of(
    st.fixed_dictionaries({"regex": regexes}),
    st.fixed_dictionaries({"choice": choices}),
    st.fixed_dictionaries({"json": openai_schemas | schema_texts}),
    st.fixed_dictionaries({"grammar": grammars}),
    st.fixed_dictionaries({"json_object": st.booleans()}),
)

# ---- OpenAI HTTP bodies ------------------------------------------------------------------------------------------

tool_names = st.sampled_from(["get_weather", "f", ""]) | short_text
openai_tools = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": tool_names}, optional={"parameters": openai_schemas}),
        }
    ),
    max_size=2,
)
tool_choices = st.sampled_from(["auto", "none", "required"]) | st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": tool_names})}
)
message = st.fixed_dictionaries(
    {
        "role": mostly(
            st.sampled_from(["user", "system", "assistant"]),
            st.sampled_from(["tool", "developer", "robot", ""]) | json_values,
            one_in=8,
        ),
        "content": mostly(
            json_text,
            json_values | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": json_text})),
            one_in=8,
        ),
    },
    optional={"name": short_text, "tool_call_id": short_text},
)
common_fields = {
    "model": field(st.sampled_from([MODEL, ""]), st.sampled_from(["nope", "x" * 300])),
    "stream": field(st.booleans(), st.none()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()}), st.just({"x": 1})),
    "n": field(st.integers(min_value=1, max_value=3), huge_ints),
    "stop": field(st.lists(st.text(min_size=1, max_size=4), max_size=2), text | st.lists(text, max_size=20)),
    "seed": field(st.integers(min_value=0, max_value=2**64 - 1), huge_ints),
    "temperature": field(st.floats(min_value=0, max_value=2), any_floats),
    "top_p": field(st.floats(min_value=0.01, max_value=1), any_floats),
    "top_k": field(st.integers(min_value=-1, max_value=50), huge_ints),
    "presence_penalty": field(st.floats(min_value=-2, max_value=2), any_floats),
    "frequency_penalty": field(st.floats(min_value=-2, max_value=2), any_floats),
    "repetition_penalty": field(st.floats(min_value=0.5, max_value=2), any_floats),
    "min_p": field(st.floats(min_value=0, max_value=1), any_floats),
    "priority": field(st.sampled_from(["critical", "high", "normal", "low", "batch"]), st.just("urgent")),
    "stop_token_ids": field(st.lists(st.integers(min_value=0, max_value=100), max_size=2), st.lists(huge_ints)),
    "ignore_eos": field(st.booleans(), st.none()),
    "min_tokens": field(st.sampled_from([0, 0, 0, 1]), huge_ints),
    "skip_special_tokens": field(st.booleans(), st.none()),
    "spaces_between_special_tokens": field(st.booleans(), st.none()),
    "include_stop_str_in_output": field(st.booleans(), st.none()),
    "logit_bias": field(st.just({}), json_values),
    "user": field(st.text(max_size=10), json_values),
    "response_format": field(response_formats, st.just({"type": "xml"})),
    "structured_outputs": field(structured_outputs, st.just({})),
    "guided_regex": field(regexes, st.none()),
    "guided_choice": field(choices, st.none()),
    "guided_json": field(openai_schemas, schema_texts),
}
small_tokens = field(st.integers(min_value=1, max_value=6), huge_ints)
chat_bodies = st.fixed_dictionaries(
    {"messages": mostly(st.lists(message, min_size=1, max_size=3), json_values, one_in=8), "max_tokens": small_tokens},
    optional={
        **common_fields,
        "max_completion_tokens": small_tokens,
        "logprobs": field(st.booleans(), st.none()),
        "top_logprobs": field(st.integers(min_value=0, max_value=20), huge_ints),
        "tools": field(openai_tools, json_values),
        "tool_choice": field(tool_choices, json_values),
        "parallel_tool_calls": field(st.booleans(), st.none()),
    },
)
completion_bodies = st.fixed_dictionaries(
    {
        "prompt": mostly(
            st.text(min_size=1, max_size=40) | st.lists(token_ids, min_size=1, max_size=4),
            json_text | st.lists(json_text, max_size=3) | st.lists(huge_ints, max_size=3) | json_values,
        ),
        "max_tokens": small_tokens,
    },
    optional={
        **common_fields,
        "logprobs": field(st.integers(min_value=0, max_value=5), huge_ints),
        "best_of": field(st.integers(min_value=1, max_value=3), huge_ints),
        "echo": field(st.just(False), json_values),
        "suffix": field(st.just(""), json_values),
    },
)
raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(lambda b: b'{"prompt": "' + b + b'", "max_tokens": 2}', st.binary(max_size=40)),
    st.builds(str.encode, deep_json),
    st.sampled_from(
        [b'{"prompt": NaN}', b'{"prompt": "a", "max_tokens": 1e999}', b'{"prompt": "a", "prompt": 1}', b""]
    ),
)
# What the routes see: known paths, near misses, and percent-encoded junk.
paths = st.sampled_from(
    [
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        f"/v1/models/{MODEL}",
        "/",
        "/v1",
        "/v1/embeddings",
        "//v1/models",
        "/v1/completions/",
        "/v1/models/%00",
        "/v1/../v1/models",
    ]
) | st.builds(lambda p: "/v1/models/" + quote(p), st.text(min_size=1, max_size=20))
methods = st.sampled_from(["GET", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
# Each header is sent one time in four; a foreign Host or Origin is refused (403) before the body is read.
headers = st.builds(
    lambda sent: {name: value for name, value in sent.items() if value is not None},
    st.fixed_dictionaries(
        {
            "Content-Type": mostly(
                st.just("application/json"),
                st.sampled_from(["application/json; charset=utf-8", "text/plain", ""]) | header_text | st.none(),
            ),
            "Authorization": sometimes(st.sampled_from(["Bearer ", "Bearer x", "Basic Zm9vOmJhcg=="]) | header_text),
            "X-Request-Id": sometimes(st.sampled_from(["fuzz-1", "", "a" * 200, "bad id!"]) | header_text),
            "Origin": sometimes(st.sampled_from(["http://127.0.0.1", "https://evil.example", "null"]) | header_text, 8),
            "Host": sometimes(st.sampled_from(["127.0.0.1", "localhost", "evil.example", ""]) | header_text, 8),
            "traceparent": sometimes(
                st.sampled_from(["00-" + "a" * 32 + "-" + "b" * 16 + "-01", "garbage"]) | header_text
            ),
        }
    ),
)
