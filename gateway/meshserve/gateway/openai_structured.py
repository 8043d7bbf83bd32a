"""Constrained output in the OpenAI API: OpenAI's `response_format` (`json_schema`, `json_object`, `text`),
vLLM's `structured_outputs` (`json`, `json_object`, `regex`, `choice`, `grammar`) and its older `guided_*`
fields, as the one StructuredOutput of the request's SamplingParams (common/structured.py checks it)."""

from __future__ import annotations

import json
from typing import Any

from meshserve.common.sampling import Violation
from meshserve.gateway.openai_models import GenerationRequest, StructuredOutputs
from meshserve.v1 import common_pb2


def structured_output(body: GenerationRequest) -> tuple[common_pb2.StructuredOutput | None, list[Violation]]:
    """The request's one constraint, if any, and what is wrong with how it was asked."""
    asked: list[tuple[str, common_pb2.StructuredOutput]] = []
    violations: list[Violation] = []
    if body.response_format is not None:
        format_ = body.response_format
        if format_.type == "json_object":
            asked.append(("response_format", common_pb2.StructuredOutput(json_object=True)))
        elif format_.type == "json_schema":
            if format_.json_schema is None:
                violations.append(("response_format.json_schema", 'is required with type "json_schema"'))
            else:
                schema = json.dumps(format_.json_schema.json_schema)
                asked.append(("response_format", common_pb2.StructuredOutput(json_schema=schema)))
        elif format_.json_schema is not None:
            violations.append(
                ("response_format.json_schema", f'is only taken with type "json_schema", not {format_.type!r}')
            )
    if body.structured_outputs is not None:
        outputs = body.structured_outputs
        kinds = [name for name in StructuredOutputs.model_fields if getattr(outputs, name) is not None]
        if len(kinds) != 1:
            violations.append(
                ("structured_outputs", "must set exactly one of json, json_object, regex, choice, grammar")
            )
        else:
            asked.append(("structured_outputs", _vllm(kinds[0], getattr(outputs, kinds[0]))))
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        value = getattr(body, name)
        if value is not None:
            asked.append((name, _vllm(name.removeprefix("guided_"), value)))
    if len(asked) > 1:
        names = ", ".join(name for name, _ in asked)
        violations.append(
            (asked[1][0], f"conflicts with {asked[0][0]}: send one way of constraining the output ({names})")
        )
    return (asked[0][1] if asked else None), violations


def _vllm(kind: str, value: Any) -> common_pb2.StructuredOutput:
    if kind in ("json", "json_"):
        text = value if isinstance(value, str) else json.dumps(value)
        return common_pb2.StructuredOutput(json_schema=text)
    if kind == "json_object":
        return common_pb2.StructuredOutput(json_object=bool(value))
    if kind == "choice":
        return common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=value))
    return common_pb2.StructuredOutput(**{kind: value})
