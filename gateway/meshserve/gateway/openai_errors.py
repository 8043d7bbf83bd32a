"""Errors as OpenAI clients see them: `{"error": {message, type, param, code}}` with its HTTP status, every
field named as the caller named it.

Two sources name fields: the request models (pydantic's errors, by JSON location) and the proto-level checks
both APIs share (gateway/validation.py: `sampling.max_tokens`), whose names are mapped back to the request
field that filled them, as the models' `Proto` markers declare.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from google.rpc import error_details_pb2
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from meshserve.common.errors import HTTP_STATUS, MeshError
from meshserve.gateway.openai_models import UNION_TAGS, OpenAIRequestBody, proto_marker
from meshserve.gateway.openai_responses import ErrorInfo, ErrorResponse

Violation = tuple[str, str]

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    504: "timeout_error",
}
ERROR_CODES = {401: "invalid_api_key", 413: "request_too_large"}

# What pydantic's errors mean for a JSON body, in words that say what to send instead. Errors of a type
# (`*_type`) then say what came; errors of a value show it.
MESSAGES = {
    "extra_forbidden": "is not a recognised field of this endpoint",
    "missing": "is required",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "model_type": "must be an object",
    "dict_type": "must be an object",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "finite_number": "must be a finite number",
    "literal_error": "must be {expected}",
}
SHOWS_VALUE = {"greater_than_equal", "less_than_equal", "finite_number", "literal_error", "priority", "float32",
               "prompt_type"}  # fmt: skip


class HttpError(MeshError):
    """A failure of HTTP's own, with its HTTP status: gRPC has no such status."""

    http_status = 400


class BodyTooLarge(HttpError):
    """413 (gRPC's message size limit is RESOURCE_EXHAUSTED)."""

    http_status = 413


class BodyTimeout(HttpError):
    """408: a body still arriving after --http-body-seconds (trickled a byte at a time, it would hold the
    connection and its buffer for as long as the sender likes)."""

    http_status = 408


class UnsupportedMediaType(HttpError):
    """415: a body that is not declared JSON. A browser sends a cross-site form or text/plain POST without
    asking the server first (a CORS "simple" request); refusing those keeps any web page a developer opens
    from driving a mesh on their machine."""

    http_status = 415


def request_violations(error: ValidationError, model: type[BaseModel]) -> list[Violation]:
    """pydantic's errors for a request body as (field, what to fix), unknown fields first: often the cause."""
    found = []
    for detail in error.errors(include_url=False):
        unknown = detail["type"] == "extra_forbidden"
        found.append((not unknown, _path(detail["loc"], unknown), _message(detail, model)))
    return [(path, why) for _, path, why in sorted(found, key=lambda v: v[0])]


def _path(loc: tuple[int | str, ...], unknown: bool) -> str:
    """`messages[0].content[1].text` from pydantic's location, without the union tags it adds."""
    path = ""
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int):
            path += f"[{part}]"
        elif unknown and last:  # a name the caller made up: printable, and never empty
            shown = json.dumps(part[:64], ensure_ascii=True)[1:-1] or '""'
            path += f".{shown}" if path else shown
        elif not (i > 0 and part in UNION_TAGS):
            path += f".{part}" if path else part
    return path


def _message(detail: ErrorDetails, model: type[BaseModel]) -> str:
    kind = detail["type"]
    if kind not in MESSAGES:
        message = detail["msg"]  # ours (PydanticCustomError), or pydantic's own words
    else:
        message = MESSAGES[kind].format(**detail.get("ctx", {}))
    if kind == "missing" and len(detail["loc"]) == 1:
        description = model.model_fields[str(detail["loc"][0])].description
        message += f": {description}" if description else ""
    elif kind.endswith("_type") and kind not in SHOWS_VALUE:
        message += f", got {json_type(detail['input'])}"
    elif kind in SHOWS_VALUE:
        message += f", got {short(detail['input'])}"
    return message


def json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return {list: "a list", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def short(value: Any, limit: int = 40) -> str:
    huge = isinstance(value, int) and abs(value) >= 10**30
    text = "a huge integer" if huge else json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.cache
def _proto_names(model: type[BaseModel]) -> tuple[tuple[str, str], ...]:
    """(proto field, request field) for every field the model marks, longest proto path first."""
    pairs = []
    for name in model.model_fields:
        marker = proto_marker(model, name)
        if marker is not None:
            pairs += [(path, name) for path in (marker.path, *marker.also)]
    return tuple(sorted(pairs, key=lambda pair: -len(pair[0])))


def caller_name(field_path: str, body: OpenAIRequestBody | None) -> str:
    """The name the caller used for a field a proto-level check named (`sampling.stop[1]` -> `stop[1]`)."""
    if body is None:  # the body did not parse: its errors already use its names
        return field_path
    if field_path == "request_id":
        return "X-Request-Id"
    matches = [
        (path, name)
        for path, name in _proto_names(type(body))
        if field_path == path or (field_path.startswith(path) and field_path[len(path)] in ".[")
    ]
    if not matches:
        return field_path.removeprefix("sampling.")
    longest = len(matches[0][0])
    names = [name for path, name in matches if len(path) == longest]
    # Two fields for one proto field (max_tokens, max_completion_tokens): the one the caller sent.
    sent = [name for name in names if name in body.model_fields_set]
    return (sent[-1] if sent else names[0]) + field_path[longest:]


_SAMPLING_IN_TEXT = re.compile(r"\bsampling\.\w+")


def caller_text(description: str, body: OpenAIRequestBody | None) -> str:
    return _SAMPLING_IN_TEXT.sub(lambda m: caller_name(m.group(0), body), description)


def error_body(error: MeshError, body: OpenAIRequestBody | None) -> tuple[int, ErrorResponse]:
    """OpenAI's error shape and HTTP status for a MeshError."""
    status = error.http_status if isinstance(error, HttpError) else HTTP_STATUS.get(error.code, 500)
    violations = [
        (caller_name(v.field, body), caller_text(v.description, body))
        for detail in error.details
        if isinstance(detail, error_details_pb2.BadRequest)
        for v in detail.field_violations
    ]
    if violations:
        message = "; ".join(f"{name}: {why}" for name, why in violations)
        param = violations[0][0]
    else:
        message = caller_text(error.message, body) or error.code.name
        head = message.split(":", 1)[0]
        param = head if ":" in message and " " not in head else None
    if status == 404:
        code = "model_not_found" if param == "model" else "not_found"
    else:
        code = ERROR_CODES.get(status, error.code.name.lower())
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=code))
