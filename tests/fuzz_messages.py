"""Hypothesis strategies for the protos: the public GenerateRequest, the mesh's TokenRequest, FanOutRequest and a
worker stream's commands, and the bytes a broken peer sends. As in fuzz_strategies (the JSON side), most fields
are valid most of the time; each is odd one time in twenty (`odd_field`), so that many messages run on a worker.
"""

from __future__ import annotations

from hypothesis import strategies as st

from fuzz_strategies import (
    CONTEXT,
    MODEL,
    VOCAB,
    choices,
    grammars,
    mostly,
    odd_field,
    regexes,
    schema_texts,
    short_text,
    sometimes,
    text,
    token_ids,
    tool_names,
)
from meshserve.v1 import aggregator_pb2, common_pb2, inference_pb2, worker_pb2

# ---- sampling and the public request --------------------------------------------------------------------------

structured = st.one_of(
    st.builds(common_pb2.StructuredOutput, json_schema=schema_texts),
    st.builds(common_pb2.StructuredOutput, json_object=st.booleans()),
    st.builds(common_pb2.StructuredOutput, regex=regexes),
    st.builds(common_pb2.StructuredOutput, choice=st.builds(common_pb2.Choices, choices=choices)),
    st.builds(common_pb2.StructuredOutput, grammar=grammars),
)
uint32 = st.integers(min_value=0, max_value=2**32 - 1)
float32 = st.floats(width=32)
odd_token_ids = st.sampled_from([VOCAB - 1, VOCAB, VOCAB + 1, 2**31, 2**32 - 1])
prompts = mostly(
    st.lists(token_ids, min_size=1, max_size=8),
    st.just([])
    | st.lists(odd_token_ids, min_size=1, max_size=3)
    | st.builds(
        lambda n, t: [t] * n, st.sampled_from([CONTEXT - 8, CONTEXT - 1, CONTEXT, CONTEXT + 1, 5000]), token_ids
    ),
)
max_tokens = odd_field(st.integers(min_value=1, max_value=6), st.sampled_from([None, 0, 32, CONTEXT, 2**32 - 1]))
sampling = st.builds(
    common_pb2.SamplingParams,
    max_tokens=max_tokens,
    temperature=odd_field(st.none() | st.floats(min_value=0, max_value=2, width=32), float32),
    top_p=odd_field(st.none() | st.floats(min_value=0.125, max_value=1, width=32), float32),
    top_k=odd_field(st.integers(min_value=0, max_value=50), uint32),
    seed=st.none() | st.integers(min_value=0, max_value=2**64 - 1),
    stop=odd_field(st.lists(st.text(min_size=1, max_size=4), max_size=2), st.lists(st.text(max_size=300), max_size=20)),
    stop_token_ids=odd_field(st.lists(token_ids, max_size=2), st.lists(uint32, max_size=3)),
    ignore_eos=st.booleans(),
    min_p=odd_field(st.floats(min_value=0, max_value=1, width=32), float32),
    repetition_penalty=odd_field(st.none() | st.floats(min_value=0.5, max_value=2, width=32), float32),
    presence_penalty=odd_field(st.floats(min_value=-2, max_value=2, width=32), float32),
    frequency_penalty=odd_field(st.floats(min_value=-2, max_value=2, width=32), float32),
    logprobs=st.booleans(),
    top_logprobs=odd_field(st.sampled_from([0, 0, 0, 2]), uint32),
    min_tokens=odd_field(st.sampled_from([0, 0, 0, 1]), uint32),
    skip_special_tokens=st.none() | st.booleans(),
    spaces_between_special_tokens=st.none() | st.booleans(),
    include_stop_str_in_output=st.booleans(),
    structured=sometimes(structured, one_in=8),
)
priorities = odd_field(st.integers(min_value=0, max_value=5), st.integers(min_value=-(2**31), max_value=2**31 - 1))
failure_policies = odd_field(
    st.integers(min_value=0, max_value=2), st.integers(min_value=-(2**31), max_value=2**31 - 1)
)
models = odd_field(st.sampled_from(["", MODEL]), st.sampled_from(["nope", "x" * 1000]))
prompt_texts = mostly(st.text(min_size=1, max_size=40), text)
chat_messages = st.builds(
    inference_pb2.ChatMessages,
    messages=st.lists(
        st.builds(
            common_pb2.ChatMessage,
            role=odd_field(
                st.sampled_from(["user", "system", "assistant"]), st.sampled_from(["", "tool"]) | short_text
            ),
            content=text,
            tool_call_id=sometimes(short_text) | st.just(""),
        ),
        min_size=1,
        max_size=3,
    )
    | st.just([]),
)
proto_tools = st.lists(
    st.builds(common_pb2.Tool, name=tool_names, description=short_text, parameters=st.just("") | schema_texts),
    max_size=2,
)
proto_tool_choice = sometimes(
    st.builds(inference_pb2.ToolChoice, mode=st.integers(min_value=0, max_value=3))
    | st.builds(inference_pb2.ToolChoice, function=tool_names),
    one_in=12,
)
batch_input = st.one_of(
    st.builds(inference_pb2.BatchInput, prompt=prompt_texts, sampling=sometimes(sampling)),
    st.builds(inference_pb2.BatchInput, messages=chat_messages, sampling=sometimes(sampling)),
    st.builds(inference_pb2.BatchInput, token_ids=st.builds(inference_pb2.TokenIds, ids=prompts)),
)
paragraph = "The mesh routes requests to workers. Each worker runs one model.\n\n"
map_texts = st.sampled_from(["", "   ", "Short text.", paragraph * 3, paragraph * 40]) | text
map_templates = st.sampled_from(["", "Summarize: {chunk}", "no placeholder", "{chunk}" * 3]) | short_text
reduce_templates = st.sampled_from(["", "Merge: {outputs}", "no placeholder"]) | short_text
chunk_tokens = mostly(st.sampled_from([0, 16, 64]), st.sampled_from([1, 3, CONTEXT, 2**32 - 1]))
map_reduce = st.builds(
    inference_pb2.MapReduce,
    text=map_texts,
    map_template=map_templates,
    reduce_template=reduce_templates,
    chunk_tokens=chunk_tokens,
    map_sampling=sometimes(sampling, one_in=2),
)
generate_inputs = mostly(
    st.fixed_dictionaries({"prompt": prompt_texts})
    | st.fixed_dictionaries({"messages": chat_messages})
    | st.fixed_dictionaries({"token_ids": st.builds(inference_pb2.TokenIds, ids=prompts)}),
    st.just({})
    | st.fixed_dictionaries({"batch": st.builds(inference_pb2.BatchInputs, inputs=st.lists(batch_input, max_size=3))})
    | st.fixed_dictionaries({"map_reduce": map_reduce}),
)
fan_out_sizes = mostly(st.integers(min_value=0, max_value=2), uint32, one_in=16)
grpc_requests = st.builds(
    lambda inputs, **fields: inference_pb2.GenerateRequest(**inputs, **fields),
    generate_inputs,
    model=models,
    sampling=sampling,
    n=fan_out_sizes,
    best_of=fan_out_sizes,
    priority=priorities,
    request_id=odd_field(st.sampled_from(["", "fuzz-1", "a/b:c.d_e"]), st.text(max_size=140)),
    dedupe=st.booleans(),
    order_by_score=st.booleans(),
    failure_policy=failure_policies,
    tools=odd_field(st.just([]), proto_tools),
    tool_choice=proto_tool_choice,
    cache_salt=odd_field(st.just(""), st.text(max_size=300)),
)
list_models_requests = st.builds(
    common_pb2.ListModelsRequest, names_only=st.booleans(), include_tokenizer_files=st.booleans()
)

# ---- the mesh's own messages ---------------------------------------------------------------------------------

token_requests = st.builds(
    common_pb2.TokenRequest,
    request_id=odd_field(st.sampled_from(["fuzz", "fuzz/c0"]), st.text(max_size=300)),
    model=models,
    prompt_token_ids=prompts,
    sampling=sampling,
    priority=priorities,
    tenant=odd_field(st.sampled_from(["", "tenant-a"]), st.text(max_size=100)),
    index=odd_field(st.just(0), uint32),
    resume_token_ids=odd_field(
        st.just([]), st.lists(token_ids, max_size=8) | st.lists(odd_token_ids, min_size=1, max_size=2)
    ),
    parent_id=odd_field(st.just(""), st.text(max_size=40)),
    client_request_id=odd_field(st.just(""), st.text(max_size=200)),
    cache_salt=odd_field(st.just(""), st.text(max_size=300)),
)
fan_out_requests = st.builds(
    aggregator_pb2.FanOutRequest,
    request=token_requests,
    n=fan_out_sizes,
    best_of=fan_out_sizes,
    inputs=mostly(
        st.just([]),
        st.lists(
            st.builds(aggregator_pb2.FanOutInput, prompt_token_ids=prompts, sampling=sometimes(sampling)), max_size=3
        ),
    ),
    map_reduce=sometimes(
        st.builds(
            aggregator_pb2.MapReduceTask,
            text=map_texts,
            map_template=map_templates,
            reduce_template=reduce_templates,
            chunk_tokens=chunk_tokens,
            map_sampling=sometimes(sampling, one_in=2),
        ),
        one_in=6,
    ),
    dedupe=st.booleans(),
    order_by_score=st.booleans(),
    failure_policy=failure_policies,
)
sequence_ids = mostly(st.integers(min_value=1, max_value=10**6), st.sampled_from([0, 1, 2, 2**63, 2**64 - 1]))
trace_contexts = mostly(
    st.just({}),
    st.dictionaries(st.sampled_from(["traceparent", "tracestate", "baggage"]) | short_text, text, max_size=3),
)
# A cancel one command in five: of a sequence still running, one that ended, one never submitted.
link_commands = mostly(
    st.builds(
        lambda submit: worker_pb2.LinkCommand(submit=submit),
        st.builds(
            worker_pb2.SubmitSequence,
            sequence_id=sequence_ids,
            request=token_requests,
            timeout_ms=mostly(st.sampled_from([0, 5_000]), st.sampled_from([1, 50, 2**32 - 1])),
            trace_context=trace_contexts,
        ),
    ),
    st.builds(lambda i: worker_pb2.LinkCommand(cancel=worker_pb2.CancelSequence(sequence_id=i)), sequence_ids),
    one_in=5,
)


def mutated(message: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """A valid message's bytes with some flipped, cut short or extended: what a broken peer sends."""

    def mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None, tail: bytes) -> bytes:
        out = bytearray(data)
        for position, value in flips:
            if out:
                out[position % len(out)] = value
        if cut is not None:
            out = out[: cut % (len(out) + 1)]
        return bytes(out) + tail

    return st.builds(
        mutate,
        message.map(lambda m: m.SerializeToString()),
        st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), max_size=3),
        st.none() | st.integers(min_value=0),
        st.binary(max_size=8),
    )


def raw_messages(message: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=200) | mutated(message)
