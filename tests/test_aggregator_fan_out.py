"""Fan-out through the aggregator (gateway -> aggregator -> router -> two workers, real gRPC servers on loopback):
n samples, best_of, order_by_score, dedupe and batches, each index checked against its sub-request sent alone."""

from __future__ import annotations

import pytest

from fan_out import WAIT_S, FanOutMesh, alone, sampling, stream, with_seed
from meshserve.v1 import common_pb2, inference_pb2


@pytest.fixture
def mesh(fan_out_mesh: FanOutMesh) -> FanOutMesh:
    """These tests' mesh: the two-worker fan-out mesh, not the session's one-worker one."""
    return fan_out_mesh


def test_n4_seeded_each_index_equals_its_derived_seed_alone(mesh):
    params = sampling(12, temperature=1.0, seed=1234)
    request = inference_pb2.GenerateRequest(prompt="Once upon a time", sampling=params, n=4)
    tokens, last, final = stream(mesh, request)
    assert sorted(tokens) == [0, 1, 2, 3]
    for index in range(4):
        expected = alone(mesh, with_seed(params, 1234 + index), prompt="Once upon a time")
        # Tokens concatenated in arrival order: equal only if no chunk of the index was reordered.
        assert tokens[index] == list(expected.token_ids), f"index {index} differs from seed {1234 + index} alone"
        assert last[index].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert last[index].usage.completion_tokens == 12
    assert len({tuple(t) for t in tokens.values()}) == 4, "four seeds gave identical samples"
    prompt_tokens = last[0].usage.prompt_tokens
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (prompt_tokens, 48)


def test_indices_interleave_as_they_come(mesh):
    """A short index finishes while a long one still streams: no head-of-line blocking by the slow index."""
    batch = inference_pb2.BatchInputs(
        inputs=[
            inference_pb2.BatchInput(prompt="The slow one", sampling=sampling(120, temperature=0.0)),
            inference_pb2.BatchInput(prompt="The fast one", sampling=sampling(2, temperature=0.0)),
        ]
    )
    order = [
        (m.index, bool(m.finish_reason))
        for m in mesh.inference.GenerateStream(inference_pb2.GenerateRequest(batch=batch), timeout=WAIT_S)
        if not m.final
    ]
    fast_done = order.index((1, True))
    slow_done = order.index((0, True))
    assert fast_done < slow_done
    assert any(index == 0 for index, _ in order[fast_done + 1 :]), "index 0 sent nothing after index 1 finished"


def test_best_of_4_returns_the_highest_mean_logprob(mesh):
    params = sampling(8, temperature=1.5, seed=77)
    request = inference_pb2.GenerateRequest(prompt="The river", sampling=params, n=1, best_of=4)
    tokens, last, final = stream(mesh, request)
    assert sorted(tokens) == [0]
    candidates = [alone(mesh, with_seed(params, 77 + j, logprobs=True), prompt="The river") for j in range(4)]
    means = [sum(lp.logprob for lp in c.logprobs) / len(c.logprobs) for c in candidates]
    best = max(range(4), key=lambda j: (means[j], -j))
    assert len({round(m, 5) for m in means}) == 4, f"candidates tie, the check would prove nothing: {means}"
    assert tokens[0] == list(candidates[best].token_ids), f"chose another than candidate {best} of means {means}"
    assert last[0].mean_logprob == pytest.approx(means[best], abs=1e-4)
    assert not last[0].logprobs, "log-probabilities were not asked for"
    # Every candidate's tokens are paid for.
    assert final.usage.completion_tokens == 4 * 8


def test_order_by_score_returns_every_sample_best_first(mesh):
    params = sampling(6, temperature=1.5, seed=5)
    request = inference_pb2.GenerateRequest(prompt="Lanterns", sampling=params, n=3, order_by_score=True)
    reply = mesh.inference.Generate(request, timeout=WAIT_S)
    assert [c.index for c in reply.completions] == [0, 1, 2]
    scores = [c.mean_logprob for c in reply.completions]
    assert scores == sorted(scores, reverse=True)
    samples = {tuple(alone(mesh, with_seed(params, 5 + j), prompt="Lanterns").token_ids) for j in range(3)}
    assert {tuple(c.token_ids) for c in reply.completions} == samples


def test_dedupe_leaves_out_identical_completions(mesh):
    greedy = sampling(6, temperature=0.0)
    request = inference_pb2.GenerateRequest(prompt="Copper", sampling=greedy, n=3, dedupe=True)
    tokens, _, final = stream(mesh, request)
    assert list(tokens) == [0], "three greedy samples are identical: one should remain"
    assert tokens[0] == list(alone(mesh, greedy, prompt="Copper").token_ids)
    assert final.usage.completion_tokens == 18


def test_batch_of_8_each_index_equals_its_prompt_alone(mesh):
    prompts = [f"Prompt number {i} about the {word}" for i, word in enumerate("abcdefgh")]
    params = [sampling(3 + i, temperature=0.0 if i % 2 else 0.8, seed=100 + i) for i in range(8)]
    batch = inference_pb2.BatchInputs(
        inputs=[inference_pb2.BatchInput(prompt=p, sampling=s) for p, s in zip(prompts, params, strict=True)]
    )
    tokens, last, final = stream(mesh, inference_pb2.GenerateRequest(batch=batch))
    assert sorted(tokens) == list(range(8))
    for i in range(8):
        assert tokens[i] == list(alone(mesh, params[i], prompt=prompts[i]).token_ids), f"index {i}"
        assert last[i].usage.completion_tokens == 3 + i
    assert final.usage.completion_tokens == sum(3 + i for i in range(8))
    assert final.usage.prompt_tokens == sum(last[i].usage.prompt_tokens for i in range(8))
