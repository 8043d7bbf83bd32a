"""The engine on the built-in model: batched == alone, under preemption and prefix hits; no leaks; priorities."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_support import (
    PATHS,
    WAIT_S,
    Result,
    assert_no_leaks,
    make_sequence,
    mixed_requests,
    run_all,
    run_alone,
    start_engine,
)
from meshserve.worker.engine import Engine
from meshserve.worker.model_runner import ModelRunner
from meshserve.worker.sequence import Finish, SamplingOptions, SequenceOutput
from support import wait_for


@pytest.fixture(scope="module", params=list(PATHS))
def path(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(model_dir, tokenizer, path):
    """32 mixed requests, each run alone on an engine without prefix caching: the tokens to match."""
    engine = start_engine(model_dir, prefix_caching=False, path=path)
    try:
        requests = mixed_requests(32, seed=1, vocab=engine.runner.vocab_size)
        return requests, run_alone(engine, tokenizer, requests)
    finally:
        engine.stop()


def test_engine_matches_transformers_greedy(model_dir, tokenizer):
    prompt = tokenizer.encode("The router picks a worker for each request")
    engine = start_engine(model_dir)
    try:
        [result] = run_all(engine, tokenizer, [(prompt, SamplingOptions(max_tokens=20, temperature=0.0))])
    finally:
        engine.stop()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt) :]
    assert result.tokens == expected.tolist()[: len(result.tokens)]


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param({"max_num_batched_tokens": 128}, id="concurrent-chunked"),
        pytest.param({"num_blocks": 48, "max_num_batched_tokens": 256}, id="tiny-pool-preempts"),
        pytest.param({"block_size": 8, "max_num_seqs": 7, "max_num_batched_tokens": 64}, id="small-blocks"),
    ],
)
def test_concurrent_equals_alone(model_dir, tokenizer, reference, path, setup):
    """On every path and dtype, bf16 included: the fast path's kernels reduce in an order that does not
    depend on the batch, so a sequence's tokens do not depend on what it is batched with."""
    requests, expected = reference
    engine = start_engine(model_dir, path=path, **setup)
    try:
        results = run_all(engine, tokenizer, requests)
        assert_no_leaks(engine)
    finally:
        engine.stop()
    for i, (result, tokens) in enumerate(zip(results, expected, strict=True)):
        assert result.finish == Finish.LENGTH
        assert result.tokens == tokens, f"request {i} differs from its run alone"
    if "num_blocks" in setup:
        assert engine.scheduler.preemptions > 0, "the tiny pool was meant to force preemption"


def test_prefix_cache_hits_give_the_same_tokens(model_dir, tokenizer, reference, path):
    """Requests sharing a long system prompt skip its prefill, and still produce the same tokens."""
    requests, _ = reference
    system = requests[6][0][:150] if len(requests[6][0]) >= 150 else list(range(10, 160))
    shared = [(system + prompt[:20], options) for prompt, options in requests[:12]]
    cold = start_engine(model_dir, prefix_caching=False, path=path)
    try:
        expected = run_alone(cold, tokenizer, shared)
    finally:
        cold.stop()
    engine = start_engine(model_dir, max_num_batched_tokens=128, path=path)
    try:
        [first] = run_all(engine, tokenizer, shared[:1])
        assert first.outputs[-1].cached_prompt_tokens == 0
        results = run_all(engine, tokenizer, shared[1:])
        assert_no_leaks(engine)
    finally:
        engine.stop()
    assert [first.tokens] + [r.tokens for r in results] == expected
    for result in results:
        assert result.outputs[-1].cached_prompt_tokens >= 144  # nine full blocks of the system prompt
    assert engine.block_manager.stats.hit_rate > 0.5
    assert engine.load().prefix_cache_hit_rate == engine.block_manager.stats.hit_rate


def test_higher_priority_preempts_running_lower_priority(model_dir, tokenizer):
    engine = start_engine(model_dir, max_num_seqs=2)
    long = SamplingOptions(max_tokens=200, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    try:
        expected = run_alone(engine, tokenizer, [(p, long) for p in prompts])
        low = [make_sequence(engine, tokenizer, p, long, priority=4) for p in prompts]
        for sequence, _ in low:
            engine.submit(sequence)
        wait_for(lambda: all(len(r.tokens) >= 5 for _, r in low), "five tokens of both low requests", WAIT_S)
        [critical] = run_all(
            engine, tokenizer, [([12, 13], SamplingOptions(max_tokens=5, temperature=0.0))], priority=1
        )
        assert critical.finish == Finish.LENGTH
        # The critical request ran while both seats were held by low-priority ones: one of them made room.
        assert any(not r.done.is_set() for _, r in low)
        assert engine.scheduler.preemptions >= 1
        for _, result in low:
            assert result.done.wait(WAIT_S)
        assert_no_leaks(engine)
    finally:
        engine.stop()
    assert [r.tokens for _, r in low] == expected


def test_same_priority_does_not_preempt(model_dir, tokenizer):
    engine = start_engine(model_dir, max_num_seqs=1)
    try:
        first, first_result = make_sequence(engine, tokenizer, [5, 6], SamplingOptions(max_tokens=60, temperature=0))
        engine.submit(first)
        second, second_result = make_sequence(engine, tokenizer, [7, 8], SamplingOptions(max_tokens=2, temperature=0))
        engine.submit(second)
        assert second_result.done.wait(WAIT_S)
        assert first_result.done.is_set(), "a request of the same priority jumped the queue"
        assert engine.scheduler.preemptions == 0
    finally:
        engine.stop()


def test_thousand_requests_leave_no_leaks(model_dir, tokenizer):
    """Cancellations, failures, expired deadlines and preemptions: every block comes back."""
    engine = start_engine(model_dir, num_blocks=16, max_num_seqs=16, max_num_batched_tokens=96)
    rng = random.Random(7)
    vocab = engine.runner.vocab_size
    pairs = []
    try:
        for i in range(1000):
            prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 60))]
            options = SamplingOptions(max_tokens=rng.randint(1, 16), temperature=rng.choice([0.0, 1.0]), seed=i)
            kind = i % 10
            kwargs = {"priority": rng.randint(1, 5)}
            if kind == 7:
                kwargs["deadline"] = time.monotonic() - 1
            sequence, result = make_sequence(engine, tokenizer, prompt, options, **kwargs)
            if kind == 8:  # the consumer breaks: this sequence fails, the others go on
                sequence.emit = _failing_emit(result)
            engine.submit(sequence)
            if kind == 9:
                sequence.request_cancel()
            pairs.append((kind, sequence, result))
            if i % 50 == 49:
                for _, _, r in pairs[-50:]:
                    assert r.done.wait(WAIT_S)
        for _, _, result in pairs:
            assert result.done.wait(WAIT_S)
        assert_no_leaks(engine)
    finally:
        engine.stop()
    finishes = {kind: {r.finish for k, _, r in pairs if k == kind} for kind in range(10)}
    assert finishes[7] == {Finish.CANCELLED}
    assert finishes[8] == {Finish.ERROR}
    assert finishes[9] <= {Finish.CANCELLED, Finish.LENGTH, Finish.STOP}
    assert all(finishes[kind] <= {Finish.LENGTH, Finish.STOP} for kind in range(7))
    assert engine.scheduler.preemptions > 0
    load = engine.load()
    assert load.sequences_finished + load.sequences_cancelled == 1000
    assert load.free_kv_blocks == load.total_kv_blocks


def _failing_emit(result: Result):
    def emit(output: SequenceOutput) -> None:
        if output.token_ids:
            raise RuntimeError("consumer went away")
        result.outputs.append(output)
        result.done.set()

    return emit


def test_chunked_prefill_keeps_decoding_others(model_dir, tokenizer):
    """While a long prompt is prefilled in chunks, a running sequence still gets a token every step."""
    engine = Engine(ModelRunner(model_dir, num_blocks=128), tokenizer, max_num_seqs=4, max_num_batched_tokens=32)
    running, running_result = make_sequence(engine, tokenizer, [5, 6, 7], SamplingOptions(max_tokens=40, temperature=0))
    engine.scheduler.add(running)  # the loop is not started: steps are driven here
    engine.step()
    long, _ = make_sequence(engine, tokenizer, list(range(3, 303)), SamplingOptions(max_tokens=2, temperature=0))
    engine.scheduler.add(long)
    for _ in range(9):
        before = len(running_result.tokens)
        engine.step()
        assert len(running_result.tokens) == before + 1
    assert long.num_computed_tokens == 9 * 31
    engine.stop()


def test_expired_and_cancelled_sequences_leave_at_the_next_step(model_dir, tokenizer):
    engine = start_engine(model_dir)
    try:
        sequence, result = make_sequence(
            engine, tokenizer, [5, 6], SamplingOptions(max_tokens=1000, temperature=0, ignore_eos=True)
        )
        engine.submit(sequence)
        wait_for(lambda: len(result.tokens) >= 3, "the first three tokens", WAIT_S)
        sequence.request_cancel()
        assert result.done.wait(10)
        assert result.finish == Finish.CANCELLED
        assert len(result.tokens) < 1000
        timed, timed_result = make_sequence(
            engine,
            tokenizer,
            [5, 6],
            SamplingOptions(max_tokens=1000, temperature=0, ignore_eos=True),
            deadline=time.monotonic() + 0.2,
        )
        engine.submit(timed)
        assert timed_result.done.wait(10)
        assert timed_result.finish == Finish.CANCELLED
        assert_no_leaks(engine)
    finally:
        engine.stop()


def test_logprobs_are_the_raw_distribution(model_dir, tokenizer):
    prompt = tokenizer.encode("Tell me a story")
    options = SamplingOptions(max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=3, repetition_penalty=1.5)
    engine = start_engine(model_dir)
    try:
        [result] = run_all(engine, tokenizer, [(prompt, options)])
    finally:
        engine.stop()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    logprobs = [lp for output in result.outputs for lp in output.logprobs]
    assert [lp.token_id for lp in logprobs] == result.tokens
    with torch.no_grad():
        logits = model(torch.tensor([prompt + result.tokens])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits, dim=-1)
    for step, lp in enumerate(logprobs):
        assert lp.logprob == pytest.approx(float(expected[step, lp.token_id]), abs=1e-4)
        top = torch.topk(expected[step], 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_gpt2_family_runs_on_the_same_engine(tmp_path, tokenizer):
    """Learned positions, no GQA, fused qkv: the engine only needs the attention interface."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=256, bos_token_id=1, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    engine = start_engine(tmp_path, num_blocks=64, tokenizer=tokenizer)
    requests = mixed_requests(8, seed=3, vocab=300, longest=120)
    try:
        alone = run_alone(engine, tokenizer, requests)
        together = [r.tokens for r in run_all(engine, tokenizer, requests)]
        assert_no_leaks(engine)
    finally:
        engine.stop()
    assert together == alone
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt, options = requests[0]
    expected = model.generate(
        torch.tensor([prompt]), max_new_tokens=options.max_tokens, do_sample=False, min_new_tokens=options.max_tokens
    )
    assert alone[0] == expected[0, len(prompt) :].tolist()


def test_a_sequence_that_breaks_the_model_step_fails_alone(model_dir, tokenizer, reference, path):
    """An id past the embedding table (as if validation were bypassed) fails its sequence, not the batch."""
    requests, expected = reference
    engine = start_engine(model_dir, path=path)
    try:
        good = [make_sequence(engine, tokenizer, p, o) for p, o in requests[:6]]
        bad, bad_result = make_sequence(
            engine, tokenizer, [5, engine.runner.vocab_size + 5, 6], SamplingOptions(max_tokens=4, temperature=0)
        )
        bad.detokenizer = tokenizer.detokenizer([5])
        for sequence, _ in [*good[:3], (bad, bad_result), *good[3:]]:
            engine.submit(sequence)
        for _, result in [*good, (bad, bad_result)]:
            assert result.done.wait(WAIT_S)
        assert_no_leaks(engine)
    finally:
        engine.stop()
    assert bad_result.finish == Finish.ERROR and "IndexError" in bad_result.outputs[-1].error
    assert [r.tokens for _, r in good] == expected[:6]


def test_a_sequence_larger_than_the_pool_fails_instead_of_waiting_forever(model_dir, tokenizer):
    engine = start_engine(model_dir, num_blocks=4)
    try:
        [result] = run_all(engine, tokenizer, [(list(range(5, 105)), SamplingOptions(max_tokens=2))])
        [fits] = run_all(engine, tokenizer, [(list(range(5, 40)), SamplingOptions(max_tokens=2))])
    finally:
        engine.stop()
    assert result.finish == Finish.ERROR and "the pool has 4" in result.outputs[-1].error
    assert fits.finish in (Finish.LENGTH, Finish.STOP)


def test_constrained_and_free_sequences_share_steps_on_every_path(model_dir, tokenizer, path):
    """A grammar masks only its own row: batched with free sequences (and under a small pool that preempts),
    each constrained output is valid and the same as run alone; the free ones are untouched."""
    import json

    import jsonschema

    from meshserve.common.structured import grammar_of
    from meshserve.v1 import common_pb2

    schema = {
        "type": "object",
        "properties": {"id": {"type": "integer", "maximum": 999}, "tag": {"enum": ["a", "b"]}},
        "required": ["id", "tag"],
        "additionalProperties": False,
    }
    grammar = grammar_of(common_pb2.StructuredOutput(json_schema=json.dumps(schema)))
    requests = mixed_requests(12, seed=4, vocab=256, longest=120)
    for i in range(0, len(requests), 2):
        prompt, options = requests[i]
        requests[i] = (prompt, dataclasses.replace(options, max_tokens=60, grammar=grammar))
    engine = start_engine(model_dir, path=path, num_blocks=40, max_num_batched_tokens=96)
    try:
        alone = run_alone(engine, tokenizer, requests)
        batched = run_all(engine, tokenizer, requests)
        assert_no_leaks(engine)
    finally:
        engine.stop()
    assert [r.tokens for r in batched] == alone
    for i in range(0, len(requests), 2):
        result = batched[i]
        assert result.finish == Finish.STOP, tokenizer.decode(result.tokens)
        jsonschema.validate(json.loads(tokenizer.decode(result.tokens)), schema)
