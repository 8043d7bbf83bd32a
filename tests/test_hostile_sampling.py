"""The real engine on the built-in model: a request with numerically hostile sampling values, batched beside
ordinary greedy and seeded streams, neither fails nor changes them (the gRPC and HTTP layers may reject some of these
values first; the engine must not depend on that)."""

from __future__ import annotations

import math

from engine_support import assert_no_leaks, run_all, run_alone, start_engine
from meshserve.worker.sequence import Finish, SamplingOptions

HOSTILE = {
    "temperature 1e-44": SamplingOptions(max_tokens=10, temperature=1e-44),
    "repetition_penalty 1e-30": SamplingOptions(max_tokens=10, temperature=1.0, repetition_penalty=1e-30),
    "repetition_penalty 1e30": SamplingOptions(max_tokens=10, temperature=1.0, repetition_penalty=1e30),
    "top_p 1e-45": SamplingOptions(max_tokens=10, temperature=1.0, top_p=1e-45, logprobs=True, top_logprobs=2),
    # Repeated tokens get +2e38, then +3e38, then +inf: the row's logits overflow after a few steps.
    "penalties to +inf": SamplingOptions(
        max_tokens=10, temperature=1.0, presence_penalty=-1e38, frequency_penalty=-1e38, seed=1
    ),
    "frequency_penalty inf": SamplingOptions(max_tokens=10, temperature=0.7, frequency_penalty=1e39, seed=2),
    "min_p 2": SamplingOptions(max_tokens=10, temperature=1.0, min_p=2.0),
    "top_k over vocab, seed over 64 bits": SamplingOptions(max_tokens=10, temperature=1.0, top_k=10**9, seed=2**80),
    "temperature nan": SamplingOptions(max_tokens=10, temperature=math.nan),
}


def test_hostile_sampling_values_fail_neither_their_stream_nor_the_others(model_dir, tokenizer):
    prompts = [tokenizer.encode(text) for text in ("The router picks", "Once upon a time", "KV blocks are")]
    normal = [(prompt, SamplingOptions(max_tokens=16, temperature=0.0)) for prompt in prompts[:2]]
    normal.append((prompts[2], SamplingOptions(max_tokens=16, temperature=0.8, top_p=0.9, top_k=40, seed=7)))
    hostile = [(prompts[i % len(prompts)], options) for i, options in enumerate(HOSTILE.values())]
    engine = start_engine(model_dir)
    try:
        reference = run_alone(engine, tokenizer, normal)
        # Interleaved, so every step samples the hostile rows beside the normal ones.
        requests = [item for pair in zip(normal * 3, hostile, strict=True) for item in pair]
        results = run_all(engine, tokenizer, requests)
        assert_no_leaks(engine)
    finally:
        engine.stop()
    vocab = engine.runner.vocab_size
    for i, result in enumerate(results[0::2]):
        assert result.tokens == reference[i % len(normal)], "a hostile request beside it changed a normal stream"
        assert result.finish in (Finish.STOP, Finish.LENGTH), result.outputs[-1].error
    for name, result in zip(HOSTILE, results[1::2], strict=True):
        assert result.finish in (Finish.STOP, Finish.LENGTH), f"{name}: {result.finish} {result.outputs[-1].error}"
        assert result.tokens and all(0 <= t < vocab for t in result.tokens), f"{name}: {result.tokens}"
        for logprob in (lp for output in result.outputs for lp in output.logprobs):
            assert math.isfinite(logprob.logprob), f"{name}: {logprob}"
