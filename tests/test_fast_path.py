"""The fast path against the transformers path, fp32 greedy, on tiny random Llama, Mistral and Qwen2 models.

Each model is built here with random weights and layers shaped so that each architecture's
difference matters: grouped-query attention everywhere, a sliding window shorter than the
prompts (Mistral; Qwen2 on its upper layers only) and q/k/v biases (Qwen2). 32 prompts of mixed
lengths run together, chunked and batched, on each path; every token must agree.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from engine_support import run_all, start_engine
from meshserve.worker.cpu_dtype import chosen, fastest_cpu_dtype
from meshserve.worker.llama_step import unsupported_reason
from meshserve.worker.model_runner import DTYPES, ModelRunner
from meshserve.worker.sequence import SamplingOptions

VOCAB = 512
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    eos_token_id=1,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE, rope_theta=10000.0),
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=24),
    "qwen2": lambda: Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=24, max_window_layers=1),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny_model(request, tmp_path_factory) -> str:
    config = CONFIGS[request.param]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config).eval()
        # Random-init biases are zero; make Qwen2's matter.
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return str(path)


def requests(count: int = 32, seed: int = 3) -> list[tuple[list[int], SamplingOptions]]:
    rng = random.Random(seed)
    shared = [rng.randrange(2, VOCAB) for _ in range(40)]
    out = []
    for i in range(count):
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.choice([1, 3, 17, 30, 64, 120]))]
        if i % 4 == 0:
            prompt = shared + prompt  # prefix-cache hits on some
        out.append((prompt, SamplingOptions(max_tokens=rng.randint(8, 40), temperature=0.0, ignore_eos=True)))
    return out


def greedy_tokens(model_dir: str, tokenizer, path: str) -> list[list[int]]:
    engine = start_engine(
        model_dir, num_blocks=256, max_num_seqs=16, tokenizer=tokenizer, path=path, max_num_batched_tokens=96
    )
    try:
        assert engine.runner.impl == ("transformers" if path == "transformers" else "fast")
        return [r.tokens for r in run_all(engine, tokenizer, requests())]
    finally:
        engine.stop()


def test_the_fast_path_gives_the_transformers_paths_tokens(tiny_model, tokenizer):
    expected = greedy_tokens(tiny_model, tokenizer, "transformers")
    assert sum(len(t) for t in expected) > 500
    for path in ("fast", "compiled"):
        got = greedy_tokens(tiny_model, tokenizer, path)
        differing = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
        assert not differing, f"{path}: requests {differing} differ from the transformers path"


def test_auto_takes_the_fast_path_only_where_it_is_supported(model_dir, tmp_path):
    runner = ModelRunner(model_dir, "auto", num_blocks=8, model_impl="auto", compile="off")
    # On CPU the fast path's dtype is the one this machine's matmuls ran faster in (cpu_dtype.py).
    assert runner.impl == "fast" and runner.dtype in ("float32", "bfloat16")
    assert {p.dtype for p in runner.model.parameters()} == {DTYPES[runner.dtype]}
    assert runner.pool.keys[0].dtype == DTYPES[runner.dtype]
    from transformers import GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert unsupported_reason(gpt2) is not None
    gpt2.save_pretrained(tmp_path)
    runner = ModelRunner(tmp_path, "auto", num_blocks=8, model_impl="auto")
    assert (runner.impl, runner.dtype, runner.decode) == ("transformers", "float32", None)
    with pytest.raises(ValueError, match="model_impl fast cannot run this model: GPT2LMHeadModel"):
        ModelRunner(tmp_path, num_blocks=8, model_impl="fast")


def test_auto_dtype_takes_bfloat16_only_when_it_is_clearly_faster():
    assert chosen(float32_ms=10.0, bfloat16_ms=5.0) == "bfloat16"
    assert chosen(float32_ms=10.0, bfloat16_ms=9.5) == "float32"  # within noise: float32 is the exact one
    assert chosen(float32_ms=10.0, bfloat16_ms=16.0) == "float32"
    measured = fastest_cpu_dtype(hidden=64, intermediate=128, decode_batch=4)
    assert measured.dtype == chosen(measured.float32_ms, measured.bfloat16_ms)
    assert measured.float32_ms > 0 and measured.bfloat16_ms > 0
