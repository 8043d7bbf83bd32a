"""Checks a public GenerateRequest and turns it into the mesh's tokenised request.

Every failure names its field.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from meshserve.errors import invalid_argument
from meshserve.gateway.models import ServedModel
from meshserve.sampling import sampling_violations, token_id_violations
from meshserve.tokenizer import ChatTemplateError
from meshserve.v1 import common_pb2, inference_pb2

MAX_PROMPT_BYTES = 4 * 1024 * 1024
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")


@dataclass
class ValidatedRequest:
    token_request: common_pb2.TokenRequest
    n: int
    model: ServedModel


def validate(
    request: inference_pb2.GenerateRequest, model: ServedModel, default_max_tokens: int, max_n: int
) -> ValidatedRequest:
    violations: list[tuple[str, str]] = []
    sampling = request.sampling

    prompt_ids = _prompt_ids(request, model, violations)

    if request.request_id and not REQUEST_ID.match(request.request_id):
        violations.append(("request_id", "must be 1-128 characters of letters, digits and . _ : / -"))
    n = request.n or 1
    if n > max_n:
        violations.append(("n", f"must be between 1 and {max_n}"))
    if request.priority not in common_pb2.Priority.values():
        violations.append(("priority", "must be one of " + ", ".join(common_pb2.Priority.keys()[1:])))

    context = model.info.max_context_length
    room = context - len(prompt_ids)
    if prompt_ids and room < 1:
        violations.append(
            (
                "prompt",
                f"is {len(prompt_ids)} tokens; the model's context of {context} leaves no room to generate",
            )
        )
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else max(1, min(default_max_tokens, room))
    violations += sampling_violations(sampling, len(prompt_ids), context, model.info.vocab_size)

    if violations:
        raise invalid_argument(violations)

    token_request = common_pb2.TokenRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        model=model.name,
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        priority=request.priority or common_pb2.PRIORITY_NORMAL,
    )
    token_request.sampling.max_tokens = max_tokens
    return ValidatedRequest(token_request, n, model)


def _prompt_ids(
    request: inference_pb2.GenerateRequest, model: ServedModel, violations: list[tuple[str, str]]
) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        violations.append(("input", "one of prompt, messages or token_ids is required"))
        return []
    if kind == "prompt":
        if not request.prompt:
            violations.append(("prompt", "must not be empty"))
            return []
        if len(request.prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
            violations.append(("prompt", f"must be at most {MAX_PROMPT_BYTES} bytes"))
            return []
        return model.tokenizer.encode(request.prompt)
    if kind == "messages":
        messages = request.messages.messages
        if not messages:
            violations.append(("messages", "must hold at least one message"))
            return []
        for i, message in enumerate(messages):
            if not message.role:
                violations.append((f"messages[{i}].role", "must not be empty (system, user, assistant, ...)"))
        if violations:
            return []
        try:
            return model.tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in messages])
        except ChatTemplateError as exc:
            violations.append(("messages", str(exc)))
            return []
    ids = list(request.token_ids.ids)
    violations += token_id_violations("token_ids", ids, model.info.vocab_size)
    return ids
