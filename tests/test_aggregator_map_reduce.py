"""Map-reduce through the aggregator over a text many times the model's context, checked against the same map
and reduce calls made by hand."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from fan_out import FanOutMesh, alone, long_text, sampling, stream
from meshserve.aggregator.chunking import split_text
from meshserve.v1 import common_pb2, inference_pb2


@pytest.fixture
def mesh(fan_out_mesh: FanOutMesh) -> FanOutMesh:
    """These tests' mesh: the two-worker fan-out mesh, not the session's one-worker one."""
    return fan_out_mesh


def test_map_reduce_over_10x_the_context_equals_the_steps_by_hand(mesh, tokenizer):
    context = 2048
    text = long_text(tokenizer, 10 * context)
    map_template = "Summarize: {chunk}\nSummary:"
    reduce_template = "Combine these summaries:\n{outputs}\nFinal summary:"
    map_params = sampling(5, temperature=0.0)
    reduce_params = sampling(10, temperature=0.0)
    request = inference_pb2.GenerateRequest(
        request_id="map-reduce-10x",
        sampling=reduce_params,
        map_reduce=inference_pb2.MapReduce(
            text=text,
            map_template=map_template,
            reduce_template=reduce_template,
            chunk_tokens=1024,
            map_sampling=map_params,
        ),
    )
    tokens, last, final = stream(mesh, request, timeout=120)
    assert list(tokens) == [0]
    assert last[0].finish_reason == common_pb2.FINISH_REASON_LENGTH

    chunks = split_text(text, lambda s: len(tokenizer.encode(s, add_special_tokens=False)), 1024)
    assert len(chunks) >= 20
    assert " ".join(chunks).split() == text.split(), "the chunks lost or reordered words"
    children = mesh.parent("map-reduce-10x")
    assert children is not None and children.in_flight == 0
    assert children.dispatched == len(chunks) + 1  # every map call and the reduce
    assert children.peak_workers >= 2, "the map calls never ran on two workers at once"
    assert children.peak_in_flight >= 2

    with ThreadPoolExecutor(8) as pool:
        map_outputs = list(
            pool.map(lambda c: alone(mesh, map_params, prompt=map_template.replace("{chunk}", c)), chunks)
        )
    reduce_prompt = reduce_template.replace("{outputs}", "\n\n".join(o.text.strip() for o in map_outputs))
    by_hand = alone(mesh, reduce_params, prompt=reduce_prompt)
    assert tokens[0] == list(by_hand.token_ids)
    assert final.usage.completion_tokens == 5 * len(chunks) + 10
    map_prompt_tokens = sum(len(tokenizer.encode(map_template.replace("{chunk}", c))) for c in chunks)
    assert final.usage.prompt_tokens == map_prompt_tokens + by_hand.usage.prompt_tokens


def test_map_reduce_defaults_summarise(mesh, tokenizer):
    text = long_text(tokenizer, 3000)
    request = inference_pb2.GenerateRequest(
        sampling=sampling(8, temperature=0.0), map_reduce=inference_pb2.MapReduce(text=text)
    )
    reply = mesh.inference.Generate(request, timeout=120)
    assert len(reply.completions) == 1 and len(reply.completions[0].token_ids) == 8
    # Two chunks (default budget 1024 tokens) of up to 128 summary tokens each, then the reduce.
    assert reply.usage.prompt_tokens > 3000 and reply.usage.completion_tokens > 8
