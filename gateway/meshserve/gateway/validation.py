"""Checks a public GenerateRequest and turns it into the mesh's tokenised request.

Every failure names its field.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from meshserve.common.errors import invalid_argument
from meshserve.common.map_reduce import template_violations
from meshserve.common.models import ServedModel
from meshserve.common.sampling import max_tokens_or_default, sampling_violations, token_id_violations
from meshserve.common.tokenizer import ChatTemplateError
from meshserve.gateway.tools import ToolUse, template_message, template_tools, tool_grammar, tool_use
from meshserve.v1 import aggregator_pb2, common_pb2, inference_pb2

MAX_PROMPT_BYTES = 4 * 1024 * 1024
# The largest request message the public gRPC port receives: a prompt (or a batch's prompts, which share one
# MAX_PROMPT_BYTES) with room for everything else a valid request holds (sampling, stop strings, a grammar).
MAX_REQUEST_BYTES = 2 * MAX_PROMPT_BYTES
MAX_MESSAGES = 4096  # a conversation's turns; far above any context, far below what would stall the loop
FAN_OUT_INPUTS = ("batch", "map_reduce")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
MAX_CACHE_SALT_CHARS = 256


@dataclass
class ValidatedRequest:
    token_request: common_pb2.TokenRequest
    n: int
    model: ServedModel
    # Set when the request fans out (n > 1, best_of > 1, a batch, a map-reduce): it goes to the aggregator.
    fan_out: aggregator_pb2.FanOutRequest | None = None
    # Set when the request has tools: how its output is read (gateway/tools.py).
    tools: ToolUse | None = None
    # What its prompts cost the tenant: the prompt, a batch's inputs together, or a map-reduce's text.
    prompt_tokens: int = 0

    @property
    def response_id(self) -> str:
        """The id its answer carries: the caller's own if it chose one, else the mesh's."""
        return self.token_request.client_request_id or self.token_request.request_id


def validate(
    request: inference_pb2.GenerateRequest, model: ServedModel, default_max_tokens: int, max_n: int
) -> ValidatedRequest:
    violations: list[tuple[str, str]] = []
    sampling = request.sampling

    kind = request.WhichOneof("input")
    use = tool_use(request, violations)
    prompt_ids = [] if kind in FAN_OUT_INPUTS else _prompt_ids(request, model, violations, use=use)
    if use is not None and (constraint := tool_grammar(request, use)) is not None:
        if sampling.HasField("structured"):
            violations.append(("sampling.structured", f"conflicts with tool_choice {use.mode}: send one of them"))
        else:
            sampling = common_pb2.SamplingParams()
            sampling.CopyFrom(request.sampling)
            sampling.structured.CopyFrom(constraint)

    if request.request_id and not REQUEST_ID.match(request.request_id):
        violations.append(("request_id", "must be 1-128 characters of letters, digits and . _ : / -"))
    if len(request.cache_salt) > MAX_CACHE_SALT_CHARS:
        violations.append(("cache_salt", f"must be at most {MAX_CACHE_SALT_CHARS} characters"))
    n = request.n or 1
    if n > max_n:
        violations.append(("n", f"must be between 1 and {max_n}"))
    best_of = request.best_of or n
    if request.best_of and not n <= best_of <= max_n:
        violations.append(("best_of", f"must be between n ({n}) and {max_n}, got {best_of}"))
    if request.failure_policy not in common_pb2.FailurePolicy.values():
        violations.append(("failure_policy", "must be one of " + ", ".join(common_pb2.FailurePolicy.keys()[1:])))
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
    if kind == "map_reduce":
        # The reduce's prompt is the map outputs: a quarter of the context is left to its answer by default.
        room = context // 4
    max_tokens = max_tokens_or_default(sampling, default_max_tokens, room)
    violations += sampling_violations(sampling, len(prompt_ids), context, model.info.vocab_size)
    if kind == "map_reduce" and not sampling.HasField("max_tokens") and sampling.min_tokens > max_tokens:
        violations.append(
            (
                "sampling.min_tokens",
                f"must be at most {max_tokens}, the reduce's default max_tokens (a quarter of the context); "
                "set sampling.max_tokens to ask for more",
            )
        )
    inputs: list[aggregator_pb2.FanOutInput] = []
    if kind == "batch":
        inputs = _batch_inputs(request.batch, sampling, model, default_max_tokens, max_n, violations)
    elif kind == "map_reduce":
        violations += _map_reduce_violations(request.map_reduce, model)

    if violations:
        raise invalid_argument(violations)

    token_request = common_pb2.TokenRequest(
        # Ours, always: a caller's id may repeat or copy another tenant's; it travels as a label.
        request_id=uuid.uuid4().hex,
        client_request_id=request.request_id,
        cache_salt=request.cache_salt,
        model=model.name,
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        priority=request.priority or common_pb2.PRIORITY_NORMAL,
    )
    token_request.sampling.max_tokens = max_tokens
    fan_out = None
    if kind in FAN_OUT_INPUTS or best_of > 1:
        # Its `request` is filled in when it is sent: the parent as admitted (tenant, priority).
        fan_out = aggregator_pb2.FanOutRequest(
            n=n,
            best_of=best_of,
            inputs=inputs,
            dedupe=request.dedupe,
            order_by_score=request.order_by_score,
            failure_policy=request.failure_policy,
        )
        if kind == "map_reduce":
            task = request.map_reduce
            fan_out.map_reduce.text = task.text
            fan_out.map_reduce.map_template = task.map_template
            fan_out.map_reduce.reduce_template = task.reduce_template
            fan_out.map_reduce.chunk_tokens = task.chunk_tokens
            if task.HasField("map_sampling"):
                fan_out.map_reduce.map_sampling.CopyFrom(task.map_sampling)
    if kind == "batch":
        prompt_tokens = sum(len(item.prompt_token_ids) for item in inputs)
    elif kind == "map_reduce":  # the aggregator tokenises it again to split it; counted here to charge it
        prompt_tokens = len(model.tokenizer.encode(request.map_reduce.text))
    else:
        prompt_tokens = len(prompt_ids)
    return ValidatedRequest(token_request, n, model, fan_out, use, prompt_tokens)


def _batch_inputs(
    batch: inference_pb2.BatchInputs,
    sampling: common_pb2.SamplingParams,
    model: ServedModel,
    default_max_tokens: int,
    max_n: int,
    violations: list[tuple[str, str]],
) -> list[aggregator_pb2.FanOutInput]:
    """Each input tokenised. Whether its prompt fits the context is left to its own sub-request, so that
    under best_effort one input too long fails alone."""
    if not 1 <= len(batch.inputs) <= max_n:
        violations.append(("batch.inputs", f"must hold between 1 and {max_n} inputs, got {len(batch.inputs)}"))
        return []
    # All inputs together are bounded as one prompt is, before any is tokenised.
    size = sum(item.ByteSize() for item in batch.inputs)
    if size > MAX_PROMPT_BYTES:
        violations.append(("batch.inputs", f"must be at most {MAX_PROMPT_BYTES} bytes in all, got {size}"))
        return []
    context, vocab_size = model.info.max_context_length, model.info.vocab_size
    inputs = []
    for i, item in enumerate(batch.inputs):
        field = f"batch.inputs[{i}]"
        ids = _prompt_ids(item, model, violations, prefix=f"{field}.")
        fan_out_input = aggregator_pb2.FanOutInput(prompt_token_ids=ids)
        if item.HasField("sampling"):
            for name, why in sampling_violations(item.sampling, 0, context, vocab_size):
                violations.append((f"{field}.{name}", why))
            fan_out_input.sampling.CopyFrom(item.sampling)
        elif not sampling.HasField("max_tokens"):  # the default max_tokens depends on this input's length
            fan_out_input.sampling.CopyFrom(sampling)
        if fan_out_input.HasField("sampling") and not fan_out_input.sampling.HasField("max_tokens"):
            fan_out_input.sampling.max_tokens = max_tokens_or_default(
                fan_out_input.sampling, default_max_tokens, context - len(ids)
            )
        inputs.append(fan_out_input)
    return inputs


def _map_reduce_violations(task: inference_pb2.MapReduce, model: ServedModel) -> list[tuple[str, str]]:
    """Field checks; how the text splits and whether the outputs fit the reduce is the aggregator's to say."""
    violations: list[tuple[str, str]] = []
    context = model.info.max_context_length
    if not task.text.strip():
        violations.append(("map_reduce.text", "must hold some text"))
    elif len(task.text.encode("utf-8")) > MAX_PROMPT_BYTES:
        violations.append(("map_reduce.text", f"must be at most {MAX_PROMPT_BYTES} bytes"))
    violations += template_violations(task.map_template, task.reduce_template)
    if task.chunk_tokens and not 4 <= task.chunk_tokens < context:
        violations.append(("map_reduce.chunk_tokens", f"must be 0 (automatic) or between 4 and {context - 1}"))
    if task.HasField("map_sampling"):
        for name, why in sampling_violations(task.map_sampling, 0, context, model.info.vocab_size):
            violations.append((f"map_reduce.map_{name}", why))  # sampling.top_p -> map_reduce.map_sampling.top_p
    return violations


def _prompt_ids(
    request: inference_pb2.GenerateRequest | inference_pb2.BatchInput,
    model: ServedModel,
    violations: list[tuple[str, str]],
    prefix: str = "",
    use: ToolUse | None = None,
) -> list[int]:
    """The input's token ids; violations are named under `prefix` (a batch input's "batch.inputs[i].")."""
    kind = request.WhichOneof("input")
    if kind is None:
        violations.append((f"{prefix}input", "one of prompt, messages or token_ids is required"))
        return []
    if kind == "prompt":
        if not request.prompt:
            violations.append((f"{prefix}prompt", "must not be empty"))
            return []
        if len(request.prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
            violations.append((f"{prefix}prompt", f"must be at most {MAX_PROMPT_BYTES} bytes"))
            return []
        return model.tokenizer.encode(request.prompt)
    if kind == "messages":
        messages = request.messages.messages
        if not messages:
            violations.append((f"{prefix}messages", "must hold at least one message"))
            return []
        if len(messages) > MAX_MESSAGES:  # counted before any is looked at
            violations.append((f"{prefix}messages", f"must hold at most {MAX_MESSAGES} messages, got {len(messages)}"))
            return []
        bad_roles = [i for i, message in enumerate(messages) if not message.role]
        for i in bad_roles:
            violations.append((f"{prefix}messages[{i}].role", "must not be empty (system, user, assistant, ...)"))
        if bad_roles:
            return []
        # The same bound as a prompt: rendering and tokenising a giant conversation would stall the gateway.
        size = sum(m.ByteSize() for m in messages) + sum(t.ByteSize() for t in getattr(request, "tools", ()))
        if size > MAX_PROMPT_BYTES:
            violations.append((f"{prefix}messages", f"must be at most {MAX_PROMPT_BYTES} bytes of text, got {size}"))
            return []
        tools = template_tools(request) if use is not None else None
        try:
            return model.tokenizer.encode_chat([template_message(m) for m in messages], tools=tools)
        except ChatTemplateError as exc:
            violations.append((f"{prefix}messages", str(exc)))
            return []
    ids = list(request.token_ids.ids)
    violations += token_id_violations(f"{prefix}token_ids", ids, model.info.vocab_size)
    return ids
