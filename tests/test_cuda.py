"""On an NVIDIA GPU: the Triton kernels compiled for it at a Llama-8B-like shape, the sampler at a real vocabulary,
and the engine end to end. Every test skips without CUDA; `pytest -m cuda` selects them (scripts/gpu_check.sh).

tests/conftest.py sets TRITON_INTERPRET=1 for the interpreted CPU kernel tests, and @triton.jit picks interpreter
or compiler when a module is imported, so the kernels here come from a second copy of triton_ops loaded with the
variable unset (which also stays unset while each test runs: kernels compile at their first launch).

Not repeated here: tests/test_kernels.py covers the kernels' edge cases (block boundaries, GQA ratios 1/4/8, head
dims, sliding windows) under the interpreter; tests/test_sampler.py and tests/test_min_tokens_masking.py run
their sampler tests on CUDA too (their `cuda` parameters), at a small vocabulary.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

import meshserve.worker.kernels as kernels_package
from engine_support import run_all
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.worker.engine import Engine
from meshserve.worker.kernels import reference
from meshserve.worker.model_runner import ModelRunner
from meshserve.worker.sampler import sample
from meshserve.worker.sequence import SamplingOptions
from test_kernels import close, random_tables
from test_sampler import sequence

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"
    ),
]

# A Llama-8B-like attention layer: 32 query heads over 8 KV heads of 128, hidden 4096, KV blocks of 16 tokens.
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, BLOCK_SIZE = 32, 8, 128, 4096, 16
MAX_CONTEXT = 2048
DTYPES = [torch.float32, torch.bfloat16]
TRITON_OPS = "meshserve.worker.kernels.triton_ops"


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(scope="module")
def compiled_ops() -> ModuleType:
    """triton_ops with real @triton.jit kernels, whatever TRITON_INTERPRET said when triton_ops was first imported.

    Its name ends in triton_ops, as ModelRunner expects of the Triton kernels."""
    spec = importlib.util.spec_from_file_location(f"{TRITON_OPS}_compiled", importlib.util.find_spec(TRITON_OPS).origin)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous
    assert type(module.decode_attention_kernel).__name__ == "JITFunction", "the kernels were loaded interpreted"
    return module


@pytest.fixture(autouse=True)
def compiler_not_interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # The references run as true float32 matmuls (TF32 would be the larger error of the two).
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def pools(num_blocks: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shape = (KV_HEADS, num_blocks, BLOCK_SIZE, HEAD_DIM)
    return tuple(torch.randn(shape, generator=generator, device="cuda").to(dtype) for _ in range(2))


def upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The same values in float32: the kernels keep scores, softmax and norms in float32 whatever the storage
    dtype, so the reference that matches them is the float32 one on the stored (rounded) inputs."""
    return [t.float() for t in tensors]


# ---- Triton kernels against kernels/reference.py at real shapes ----

_rng = random.Random(64)
DECODE_CONTEXTS = {
    "batch1-ctx1": [1],
    "batch1-ctx2048": [MAX_CONTEXT],
    "batch8-block-edges": [1, 15, 16, 17, 255, 1000, 2047, 2048],
    "batch64-random": [1, MAX_CONTEXT, *(_rng.randint(1, MAX_CONTEXT) for _ in range(62))],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DECODE_CONTEXTS)
def test_decode_attention_matches_the_reference(compiled_ops, case, dtype):
    contexts = DECODE_CONTEXTS[case]
    rng = random.Random(case)
    num_blocks = sum(-(-n // BLOCK_SIZE) for n in contexts) + 4
    key_pool, value_pool = pools(num_blocks, dtype, seed=len(contexts))
    tables = random_tables(contexts, BLOCK_SIZE, num_blocks, rng).cuda()
    lens = torch.tensor(contexts, device="cuda")
    queries = torch.randn(len(contexts), HEADS, HEAD_DIM, device="cuda").to(dtype)
    scale = HEAD_DIM**-0.5
    actual = compiled_ops.decode_attention(queries, key_pool, value_pool, tables, lens, scale)
    expected = reference.decode_attention(*upcast(queries, key_pool, value_pool), tables, lens, scale)
    assert actual.dtype == dtype
    close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_decode_attention_with_a_sliding_window(compiled_ops, dtype):
    contexts, window = [2048, 1500, 1025, 700, 1], 1024
    num_blocks = sum(-(-n // BLOCK_SIZE) for n in contexts)
    key_pool, value_pool = pools(num_blocks, dtype, seed=5)
    tables = random_tables(contexts, BLOCK_SIZE, num_blocks, random.Random(5)).cuda()
    lens, queries = torch.tensor(contexts, device="cuda"), torch.randn(5, HEADS, HEAD_DIM, device="cuda").to(dtype)
    actual = compiled_ops.decode_attention(queries, key_pool, value_pool, tables, lens, 0.1, sliding_window=window)
    expected = reference.decode_attention(*upcast(queries, key_pool, value_pool), tables, lens, 0.1, window)
    close(actual, expected, dtype)


# (start, length) spans packed into one batch: a whole 2048-token prompt, a chunk after a cached prefix, a mix.
PREFILL_SPANS = {
    "prompt-2048": [(0, MAX_CONTEXT)],
    "chunk-512-after-1536-cached": [(1536, 512)],
    "mixed": [(0, 1), (0, 17), (100, 412), (2000, 48), (2047, 1)],
    "batch16-chunks": [(16 * i, 33 + 7 * i) for i in range(16)],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PREFILL_SPANS)
def test_prefill_attention_matches_the_reference(compiled_ops, case, dtype):
    spans = PREFILL_SPANS[case]
    contexts = [start + length for start, length in spans]
    num_blocks = sum(-(-n // BLOCK_SIZE) for n in contexts) + 4
    key_pool, value_pool = pools(num_blocks, dtype, seed=len(spans))
    tables = random_tables(contexts, BLOCK_SIZE, num_blocks, random.Random(case)).cuda()
    lens = torch.tensor([length for _, length in spans], device="cuda")
    starts = torch.tensor([start for start, _ in spans], device="cuda")
    # The spans sit in the packed batch after 3 rows of decode tokens, as the engine packs a mixed step.
    rows = torch.tensor([0, *lens.tolist()[:-1]], device="cuda").cumsum(0) + 3
    queries = torch.randn(3 + int(lens.sum()), HEADS, HEAD_DIM, device="cuda").to(dtype)
    rest = (rows, lens, starts, tables, HEAD_DIM**-0.5)
    actual = compiled_ops.prefill_attention(queries, key_pool, value_pool, *rest)
    close(actual, reference.prefill_attention(*upcast(queries, key_pool, value_pool), *rest), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_write_kv_writes_exactly_the_reference_slots(compiled_ops, tokens, dtype):
    num_blocks = 4096
    key_pool, value_pool = pools(num_blocks, dtype, seed=tokens)
    expected_pools = (key_pool.clone(), value_pool.clone())
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:tokens]
    key = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda").to(dtype)
    value = torch.randn_like(key)
    reference.write_kv(key, value, *expected_pools, slots)
    compiled_ops.write_kv(key, value, key_pool, value_pool, slots)
    # A copy in the pool's own dtype: bit for bit, and every other slot untouched.
    assert torch.equal(key_pool, expected_pools[0])
    assert torch.equal(value_pool, expected_pools[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows", [1, 64, 2048])
def test_rms_norm_matches_the_reference(compiled_ops, rows, with_residual, dtype):
    x = torch.randn(rows, HIDDEN, device="cuda").to(dtype)
    residual = torch.randn(rows, HIDDEN, device="cuda").to(dtype) if with_residual else None
    weight = (torch.rand(HIDDEN, device="cuda") + 0.5).to(dtype)
    out, hidden = compiled_ops.rms_norm(x, weight, 1e-5, residual)
    expected_out, expected_hidden = reference.rms_norm(
        *upcast(x, weight), 1e-5, residual.float() if residual is not None else None
    )
    close(out, expected_out, dtype)
    close(hidden, expected_hidden, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_rotary_matches_the_reference(compiled_ops, tokens, dtype):
    q = torch.randn(tokens, HEADS, HEAD_DIM, device="cuda").to(dtype)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda").to(dtype)
    angles = torch.arange(tokens, device="cuda")[:, None] * (10000.0 ** -torch.linspace(0, 1, HEAD_DIM // 2)).cuda()
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    q_expected, k_expected, cos32, sin32 = upcast(q, k, cos, sin)
    reference.rotary(q_expected, k_expected, cos32, sin32)
    compiled_ops.rotary(q, k, cos, sin)
    close(q, q_expected, dtype)
    close(k, k_expected, dtype)


# ---- The sampler on CUDA at a real vocabulary and batch (test_sampler.py has the behaviours at vocab 50) ----

VOCAB = 128256  # Llama 3's


def test_sampler_at_a_real_vocabulary_keeps_each_row_to_its_options():
    steps, batch_size = 8, 64
    seeded = {"temperature": 0.8, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.2, "seed": 3}
    alone = sequence(**seeded)
    step_rows = [torch.randn(VOCAB, generator=torch.Generator().manual_seed(s)).cuda() * 3 for s in range(steps)]
    for row in step_rows:
        alone.output_ids += sample(row[None].clone(), [alone])[0]
    batched = sequence(**seeded)
    for step, row in enumerate(step_rows):
        logits = torch.randn(batch_size, VOCAB, device="cuda") * 3
        at = step * 7 % batch_size  # the seeded sequence moves through the batch
        logits[at] = row
        best = logits.argmax(-1).tolist()
        # Around it, rows of four kinds: greedy, unseeded, top_k=5, and greedy with its best token penalised away.
        kinds = [{}, {"temperature": 1.0}, {"temperature": 1.0, "top_k": 5}, {"presence_penalty": 1e4}]
        batch = [sequence(output=(best[i],), **kinds[i % 4]) if i != at else batched for i in range(batch_size)]
        tokens, _ = sample(logits, batch)
        batched.output_ids.append(tokens[at])
        runner_up = logits.clone().scatter_(1, torch.tensor(best, device="cuda")[:, None], float("-inf")).argmax(-1)
        for i, token in enumerate(tokens):
            assert 0 <= token < VOCAB
            if i == at:
                continue
            if i % 4 == 0:
                assert token == best[i], "a greedy row is not the argmax"
            elif i % 4 == 2:
                assert token in logits[i].topk(5).indices.tolist(), "top_k=5 drew outside the top 5"
            elif i % 4 == 3:
                assert token == int(runner_up[i]), "the presence penalty did not take the best token away"
    assert batched.output_ids == alone.output_ids, "a batch of 64 changed a seeded sequence's tokens on CUDA"
    assert batched.generator.device.type == "cuda"


# ---- The engine end to end on CUDA, the built-in model ----

PROMPTS = ["Hello world", "The router picks a worker for each request", "A", "Once upon a time, in a city by the sea"]
# Greedy tokens are compared over the first 8 only. The built-in model has random weights, so its logits are
# nearly flat and two tokens can be within float32 rounding of each other; CUDA and CPU sum in different orders,
# so after such a near-tie (one flipped argmax) the two continuations rightly part. Over the first 8 tokens of
# these prompts the closest top-2 logit gap (CPU, float32, transformers) is 6e-4, against float32 differences of
# about 1e-6 between devices: a divergence there is a real difference in the computation.
COMPARED_TOKENS = 8


def greedy_tokens(
    model_dir, device: str, kernels: str, dtype: str = "float32", model_impl: str = "transformers", compile="off"
) -> list[list[int]]:
    tokenizer = ModelTokenizer.from_dir(model_dir)
    runner = ModelRunner(
        model_dir,
        dtype=dtype,
        num_blocks=256,
        device=device,
        kernels=kernels,
        model_impl=model_impl,
        compile=compile,
        max_batch=8,
    )
    runner.warm_up()
    expected_kernels = "triton_ops" if kernels == "triton" else "reference"
    assert runner.device.type == device and runner.kernels.__name__.endswith(expected_kernels)
    engine = Engine(runner, tokenizer, max_num_seqs=8)
    engine.start()
    try:
        options = SamplingOptions(max_tokens=COMPARED_TOKENS, temperature=0.0, ignore_eos=True)
        results = run_all(engine, tokenizer, [(tokenizer.encode(prompt), options) for prompt in PROMPTS])
    finally:
        engine.stop()
    return [result.tokens for result in results]


@pytest.fixture
def engine_uses_compiled_kernels(compiled_ops, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_kernels imports triton_ops: hand it the compiled copy, not one an interpreted test imported first."""
    monkeypatch.setitem(sys.modules, TRITON_OPS, compiled_ops)
    monkeypatch.setattr(kernels_package, "triton_ops", compiled_ops, raising=False)


@pytest.fixture(scope="module")
def cpu_tokens(model_dir) -> list[list[int]]:
    return greedy_tokens(model_dir, "cpu", "torch")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_engine_greedy_tokens_on_cuda_equal_cpu_in_float32(
    model_dir, cpu_tokens, engine_uses_compiled_kernels, kernels
):
    assert all(len(tokens) == COMPARED_TOKENS for tokens in cpu_tokens)
    assert greedy_tokens(model_dir, "cuda", kernels) == cpu_tokens


def test_engine_runs_in_bfloat16_on_the_triton_kernels(model_dir, engine_uses_compiled_kernels):
    # bfloat16 rounds differently from the float32 CPU run: only that it runs and answers in the vocabulary.
    outputs = greedy_tokens(model_dir, "cuda", "triton", dtype="bfloat16")
    vocab = ModelTokenizer.from_dir(model_dir).vocab_size
    assert all(len(tokens) == COMPARED_TOKENS and all(0 <= t < vocab for t in tokens) for tokens in outputs)


# ---- The fast path on CUDA: our Llama step over the Triton kernels, decode replayed from CUDA graphs ----


@pytest.mark.parametrize("compile", ["off", "on"], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_the_fast_path_on_cuda_gives_the_transformers_paths_tokens(
    model_dir, cpu_tokens, engine_uses_compiled_kernels, kernels, compile
):
    assert greedy_tokens(model_dir, "cuda", kernels, model_impl="fast", compile=compile) == cpu_tokens


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_replayed_cuda_graph_equals_the_eager_step(model_dir, engine_uses_compiled_kernels, dtype):
    runner = ModelRunner(
        model_dir, dtype, num_blocks=64, device="cuda", kernels="triton", model_impl="fast", compile="on", max_batch=8
    )
    runner.warm_up()
    decode = runner.decode
    rng = random.Random(0)
    for batch in (1, 3, 8):
        tables = [rng.sample(range(64), 4) for _ in range(batch)]
        positions = [rng.randrange(1, 64) for _ in range(batch)]
        ids = [rng.randrange(3, runner.vocab_size) for _ in range(batch)]
        replayed = decode.run(ids, positions, tables, [p + 1 for p in positions]).clone()
        padded = [t + [0] * (decode.max_blocks - len(t)) for t in tables]
        slots = [t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for t, p in zip(tables, positions, strict=True)]
        as_tensors = [torch.tensor(v, device="cuda") for v in (ids, positions, slots, padded)]
        with torch.inference_mode():
            eager = decode._decode(*as_tensors, torch.tensor([p + 1 for p in positions], device="cuda"))
        torch.testing.assert_close(replayed, eager.float(), rtol=0, atol=1e-5 if dtype == "float32" else 1e-2)
