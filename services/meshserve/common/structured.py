"""Constrained decoding's grammars: a StructuredOutput (JSON Schema, any JSON object, a regex, a choice among
strings, a Lark grammar) as the llguidance grammar the worker's matcher enforces token by token.

llguidance (MIT, Microsoft's guidance team; what vLLM's `guidance` backend runs) was chosen over xgrammar
and outlines-core for this mesh: its wheel needs nothing else (xgrammar's pulls in torch, transformers and
triton, which the gateway's image must not carry), it validates a grammar without a tokenizer (so the
gateway refuses a bad one before any worker is used), a mask costs microseconds on CPU with no warm-up
compile per schema, and a matcher replays tokens (failover) by consuming them.

The gateway and the worker both call `grammar_of`: the gateway to refuse a bad request early, the worker
because it trusts no caller.
"""

from __future__ import annotations

import functools
import json

import llguidance

from meshserve.v1 import common_pb2

MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or grammar
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 4096
# Compact JSON (the separators of json.dumps): a random-weights model would otherwise spin in whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Any object, for json_object mode.
ANY_OBJECT_SCHEMA = {"type": "object"}


def kind_of(structured: common_pb2.StructuredOutput) -> str:
    return structured.WhichOneof("kind") or ""


def grammar_of(structured: common_pb2.StructuredOutput) -> str:
    """The llguidance grammar for `structured`, checked; ValueError says what is wrong, in the caller's terms.
    An empty string when nothing is asked."""
    if not kind_of(structured):
        return ""
    return _compiled(structured.SerializeToString(deterministic=True))


# Services send the same few schemas over and over, and the gateway and the worker each check every request:
# compiled once per distinct constraint (at most 256 of at most 64 KiB each).
@functools.lru_cache(maxsize=256)
def _compiled(serialized: bytes) -> str:
    structured = common_pb2.StructuredOutput.FromString(serialized)
    kind = kind_of(structured)
    if kind == "json_schema":
        text = _bounded(structured.json_schema, "json_schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not JSON: {exc.msg} at character {exc.pos}") from None
        except RecursionError:
            raise ValueError("is nested too deeply") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("must be a JSON Schema: an object (or true/false)")
        grammar = _json_grammar(schema)
    elif kind == "json_object":
        if not structured.json_object:
            raise ValueError("json_object must be true when set")
        grammar = _json_grammar(ANY_OBJECT_SCHEMA)
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(_bounded(structured.regex, "regex"))
    elif kind == "choice":
        grammar = llguidance.LLMatcher.grammar_from_lark(_choice_lark(list(structured.choice.choices)))
    else:
        grammar = llguidance.LLMatcher.grammar_from_lark(_bounded(structured.grammar, "grammar"))
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(_first_lines(error))
    return grammar


def _json_grammar(schema: dict | bool) -> str:
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as exc:
        raise ValueError(f"is not a JSON Schema llguidance takes: {exc}") from None


def _choice_lark(choices: list[str]) -> str:
    if not choices:
        raise ValueError("choice needs at least one string")
    if len(choices) > MAX_CHOICES:
        raise ValueError(f"{len(choices)} choices; at most {MAX_CHOICES}")
    for index, choice in enumerate(choices):
        if not choice:
            raise ValueError(f"choice {index} is empty")
        if len(choice) > MAX_CHOICE_CHARS:
            raise ValueError(f"choice {index} has {len(choice)} characters; at most {MAX_CHOICE_CHARS}")
    # Lark string literals take JSON's escapes; each choice is matched as it is, byte for byte.
    return "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def _bounded(text: str, name: str) -> str:
    if not text:
        raise ValueError(f"{name} is empty")
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"{name} has {len(text)} characters; at most {MAX_SPEC_CHARS}")
    return text


def _first_lines(message: str, lines: int = 4, chars: int = 500) -> str:
    """llguidance's errors point into the grammar with a few lines; enough to fix it, bounded in size."""
    return "\n".join(message.strip().splitlines()[:lines])[:chars]
