"""The worker's proto conversions, in one place: a TokenRequest into engine options (checked as if the
caller were hostile), engine outputs into stream chunks, the engine's load into a LoadReport."""

from __future__ import annotations

import dataclasses

import grpc
import llguidance

from meshserve.common.errors import MeshError, invalid_argument
from meshserve.common.sampling import max_tokens_or_default, sampling_violations, token_id_violations
from meshserve.common.structured import grammar_of
from meshserve.common.usage import token_usage
from meshserve.v1 import common_pb2, worker_pb2
from meshserve.worker.engine_load import EngineLoad
from meshserve.worker.sequence import SamplingOptions, SequenceOutput, TokenLogprob


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: the model served and the room this worker has."""

    name: str
    vocab_size: int
    max_context_length: int
    kv_capacity_tokens: int
    # The tokenizer as llguidance reads it (as the engine's GrammarMatchers do): a constrained sequence's
    # resumed tokens are checked against its grammar here, so that a caller's bad ones are its error.
    grammar_tokenizer: llguidance.LLTokenizer | None = None


def sampling_options(request: common_pb2.TokenRequest, model: ModelLimits) -> SamplingOptions:
    """The worker trusts no caller: a request that reaches it directly gets the same checks as at the edge."""
    prompt = request.prompt_token_ids
    violations = token_id_violations("prompt_token_ids", prompt, model.vocab_size)
    if request.model and request.model != model.name:
        violations.append(("model", f"this worker serves {model.name!r}, not {request.model[:200]!r}"))
    sampling = request.sampling
    context = model.max_context_length
    violations += sampling_violations(sampling, len(prompt), context, model.vocab_size)
    if len(prompt) >= context:
        violations.append(("prompt_token_ids", f"{len(prompt)} tokens leave no room in the context of {context}"))
    resumed = request.resume_token_ids
    if resumed:
        violations += token_id_violations("resume_token_ids", resumed, model.vocab_size)
        # As many as max_tokens is an end the first worker never sent (replay finishes it); more is a lie.
        if sampling.HasField("max_tokens") and len(resumed) > sampling.max_tokens:
            violations.append(("resume_token_ids", f"{len(resumed)} tokens are more than max_tokens"))
        if len(prompt) + len(resumed) > context:
            violations.append(("resume_token_ids", f"prompt + resumed tokens exceed the context of {context}"))
    if request.priority not in common_pb2.Priority.values():
        violations.append(("priority", f"unknown priority {request.priority}"))
    if violations:
        raise invalid_argument(violations)
    grammar = grammar_of(sampling.structured)  # checked with the rest (sampling_violations)
    if grammar and resumed and model.grammar_tokenizer is not None:
        matcher = llguidance.LLMatcher(model.grammar_tokenizer, grammar, log_level=0)
        matcher.consume_tokens(list(resumed))
        if matcher.is_error():
            why = f"do not follow sampling.structured: {matcher.get_error()[:300]}"
            raise invalid_argument([("resume_token_ids", why)])
    # The gateway always sets max_tokens; a direct caller that does not gets a short answer.
    max_tokens = max_tokens_or_default(sampling, 16, context - len(prompt))
    if len(prompt) + max_tokens > model.kv_capacity_tokens:
        raise MeshError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{len(prompt)} prompt tokens + {max_tokens} max_tokens exceed this worker's KV cache of "
            f"{model.kv_capacity_tokens} tokens; shorten the prompt, lower max_tokens, or give workers a larger "
            "--kv-cache-memory",
        )
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=sampling.temperature if sampling.HasField("temperature") else 1.0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty if sampling.HasField("repetition_penalty") else 1.0,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(s for s in sampling.stop if s),
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs,
        top_logprobs=sampling.top_logprobs,
        min_tokens=sampling.min_tokens,
        # Unset means true (proto3 optional), as in vLLM.
        skip_special_tokens=sampling.skip_special_tokens if sampling.HasField("skip_special_tokens") else True,
        spaces_between_special_tokens=(
            sampling.spaces_between_special_tokens if sampling.HasField("spaces_between_special_tokens") else True
        ),
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        grammar=grammar,
    )


def stream_chunk(index: int, outputs: list[SequenceOutput]) -> common_pb2.StreamChunk:
    """One chunk for a sequence's outputs of one or more steps: their tokens, text and logprobs in order; the
    finish (or error) and usage of the last."""
    last = outputs[-1]
    if len(outputs) == 1:
        chunk = common_pb2.StreamChunk(index=index, token_ids=last.token_ids, text=last.text)
    else:
        chunk = common_pb2.StreamChunk(
            index=index,
            token_ids=[t for output in outputs for t in output.token_ids],
            text="".join(output.text for output in outputs),
        )
    logprobs = [lp for output in outputs for lp in output.logprobs]
    if logprobs:
        chunk.logprobs.extend(_logprob(lp) for lp in logprobs)
    if last.error:
        chunk.error.CopyFrom(MeshError(grpc.StatusCode.INTERNAL, last.error).error_status())
    elif last.finish is not None:
        chunk.finish_reason = last.finish
        chunk.usage.CopyFrom(token_usage(last.prompt_tokens, last.completion_tokens, last.cached_prompt_tokens))
    return chunk


def error_chunk(index: int, error: MeshError) -> common_pb2.StreamChunk:
    return common_pb2.StreamChunk(index=index, error=error.error_status())


def load_report(load: EngineLoad) -> worker_pb2.LoadReport:
    return worker_pb2.LoadReport(**dataclasses.asdict(load))


def _logprob(logprob: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=logprob.token_id,
        logprob=logprob.logprob,
        top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top],
    )
