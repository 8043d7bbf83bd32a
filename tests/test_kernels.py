"""Every Triton kernel against its PyTorch reference, under the Triton interpreter on CPU."""

from __future__ import annotations

import random

import pytest
import torch

from meshserve.worker.kernels import reference, triton_ops

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def make_pool(kv_heads: int, num_blocks: int, block_size: int, head_dim: int, dtype) -> tuple[torch.Tensor, ...]:
    shape = (kv_heads, num_blocks, block_size, head_dim)
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)


def random_tables(context_lens: list[int], block_size: int, num_blocks: int, rng: random.Random) -> torch.Tensor:
    """Distinct, shuffled blocks per sequence (as the block manager would give), padded with block 0."""
    needed = [-(-n // block_size) for n in context_lens]
    ids = rng.sample(range(num_blocks), sum(needed))
    widest = max(needed)
    rows, at = [], 0
    for count in needed:
        rows.append(ids[at : at + count] + [0] * (widest - count))
        at += count
    return torch.tensor(rows, dtype=torch.long)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# Contexts of one token, exactly one block, a block boundary +-1, many blocks; mixed in one batch.
DECODE_CONTEXTS = [[1], [16], [15, 17], [16, 1, 33, 200], [130, 5]]


def shapes() -> list:
    """GQA ratios 1, 4, 8 and head dims 64, 128 in float32; half precisions on one GQA shape."""
    full = [(h, kv, d, torch.float32) for h, kv in ((4, 4), (8, 2), (8, 1)) for d in (64, 128)]
    return [*full, (8, 2, 64, torch.float16), (8, 2, 128, torch.bfloat16)]


def shape_id(shape) -> str:
    heads, kv_heads, head_dim, dtype = shape
    return f"gqa{heads // kv_heads}-d{head_dim}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("contexts", DECODE_CONTEXTS, ids=lambda c: "ctx" + "-".join(map(str, c)))
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "dtype"), shapes(), ids=map(shape_id, shapes()))
def test_decode_attention(contexts, heads, kv_heads, head_dim, dtype):
    rng = random.Random(len(contexts) * 1000 + heads)
    torch.manual_seed(rng.randrange(1 << 30))
    block_size, num_blocks = 16, 40
    key_pool, value_pool = make_pool(kv_heads, num_blocks, block_size, head_dim, dtype)
    tables = random_tables(contexts, block_size, num_blocks, rng)
    lens = torch.tensor(contexts, dtype=torch.long)
    queries = torch.randn(len(contexts), heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    expected = reference.decode_attention(queries, key_pool, value_pool, tables, lens, scale)
    close(triton_ops.decode_attention(queries, key_pool, value_pool, tables, lens, scale), expected, dtype)


def test_decode_attention_sliding_window():
    torch.manual_seed(0)
    key_pool, value_pool = make_pool(2, 30, 16, 64, torch.float32)
    contexts = [100, 7, 48]
    tables = random_tables(contexts, 16, 30, random.Random(1))
    lens, queries = torch.tensor(contexts), torch.randn(3, 4, 64)
    expected = reference.decode_attention(queries, key_pool, value_pool, tables, lens, 0.125, sliding_window=20)
    actual = triton_ops.decode_attention(queries, key_pool, value_pool, tables, lens, 0.125, sliding_window=20)
    close(actual, expected, torch.float32)


# (start, length) spans packed together: fresh prompts, cached prefixes, chunks crossing block boundaries.
PREFILL_SPANS = [[(0, 1)], [(0, 16)], [(0, 17), (15, 2)], [(32, 40), (0, 5), (1, 31)], [(100, 70)]]


@pytest.mark.parametrize("spans", PREFILL_SPANS, ids=lambda s: "spans" + "-".join(f"{a}+{b}" for a, b in s))
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "dtype"), shapes(), ids=map(shape_id, shapes()))
def test_prefill_attention(spans, heads, kv_heads, head_dim, dtype):
    rng = random.Random(len(spans) * 1000 + heads + head_dim)
    torch.manual_seed(rng.randrange(1 << 30))
    block_size, num_blocks = 16, 64
    key_pool, value_pool = make_pool(kv_heads, num_blocks, block_size, head_dim, dtype)
    tables = random_tables([start + length for start, length in spans], block_size, num_blocks, rng)
    lens = torch.tensor([length for _, length in spans])
    starts = torch.tensor([start for start, _ in spans])
    # Spans sit in the packed batch after 3 rows of other (decode) tokens.
    rows = torch.tensor([0, *lens.tolist()[:-1]]).cumsum(0) + 3
    queries = torch.randn(3 + int(lens.sum()), heads, head_dim).to(dtype)
    args = (queries, key_pool, value_pool, rows, lens, starts, tables, head_dim**-0.5)
    close(triton_ops.prefill_attention(*args), reference.prefill_attention(*args), dtype)


def test_prefill_attention_sliding_window():
    torch.manual_seed(3)
    key_pool, value_pool = make_pool(2, 30, 16, 64, torch.float32)
    spans = [(40, 50), (0, 33)]
    tables = random_tables([a + b for a, b in spans], 16, 30, random.Random(2))
    lens, starts = torch.tensor([50, 33]), torch.tensor([40, 0])
    rows = torch.tensor([0, 50])
    queries = torch.randn(83, 4, 64)
    args = (queries, key_pool, value_pool, rows, lens, starts, tables, 0.125)
    close(
        triton_ops.prefill_attention(*args, sliding_window=24),
        reference.prefill_attention(*args, sliding_window=24),
        torch.float32,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_write_kv(dtype, head_dim):
    torch.manual_seed(1)
    first = make_pool(2, 8, 16, head_dim, dtype)
    pools = [first, tuple(p.clone() for p in first)]
    slots = torch.tensor([0, 15, 16, 17, 127, 40])
    key, value = torch.randn(6, 2, head_dim), torch.randn(6, 2, head_dim)
    reference.write_kv(key, value, *pools[0], slots)
    triton_ops.write_kv(key, value, *pools[1], slots)
    # The interpreter rounds float32 -> bfloat16 its own way (truncating); the engine stores keys in the pool's dtype.
    check = close if dtype == torch.bfloat16 else lambda a, b, _: torch.testing.assert_close(a, b, atol=0, rtol=0)
    check(pools[1][0], pools[0][0], dtype)
    check(pools[1][1], pools[0][1], dtype)
    check(pools[1][0][1, 7, 15], key[4, 1].to(dtype), dtype)  # slot 127 = block 7, offset 15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [256, 300])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, hidden, with_residual):
    torch.manual_seed(2)
    x = torch.randn(5, hidden).to(dtype)
    residual = torch.randn(5, hidden).to(dtype) if with_residual else None
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    expected_out, expected_hidden = reference.rms_norm(x, weight, 1e-6, residual)
    out, hidden_sum = triton_ops.rms_norm(x, weight, 1e-6, residual)
    close(out, expected_out, dtype)
    close(hidden_sum, expected_hidden, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_in_place(dtype, head_dim):
    torch.manual_seed(4)
    q, k = torch.randn(7, 8, head_dim).to(dtype), torch.randn(7, 2, head_dim).to(dtype)
    angles = torch.rand(7, head_dim // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    q_ref, k_ref = q.clone(), k.clone()
    reference.rotary(q_ref, k_ref, cos, sin)
    triton_ops.rotary(q, k, cos, sin)
    close(q, q_ref, dtype)
    close(k, k_ref, dtype)


def test_every_kernel_compiles_for_sm80_and_sm90():
    """Triton's real compiler (no GPU needed), in a process without the interpreter."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "meshserve.worker.kernels.aot", "--capabilities", "80,90", "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = [line for line in result.stdout.splitlines() if "bytes of cubin" in line]
    kernels = {"decode_attention_kernel", "prefill_attention_kernel", "write_kv_kernel", "rms_norm_kernel"}
    kernels.add("rotary_kernel")
    for capability in ("sm_80", "sm_90"):
        for kernel in kernels:
            for dtype in ("fp32", "fp16", "bf16"):
                assert any(line.startswith(f"{capability} {kernel}[{dtype}") for line in compiled), (kernel, dtype)


def test_engine_on_the_triton_path_gives_the_reference_tokens(model_dir):
    """The whole engine with Triton attention, KV writes and RMSNorm (interpreted) against the PyTorch path."""
    from meshserve.common.tokenizer import ModelTokenizer
    from meshserve.worker.engine import Engine
    from meshserve.worker.model_runner import KernelRMSNorm, ModelRunner
    from meshserve.worker.sequence import SamplingOptions

    tokenizer = ModelTokenizer.from_dir(model_dir)
    prompts = [tokenizer.encode(text) for text in ("Hello world", "The router picks a worker for each request", "A")]
    options = SamplingOptions(max_tokens=6, temperature=0.0, ignore_eos=True)
    results = {}
    for kernels in ("torch", "triton"):
        runner = ModelRunner(model_dir, num_blocks=32, kernels=kernels)
        assert any(isinstance(m, KernelRMSNorm) for m in runner.model.modules()) == (kernels == "triton")
        engine = Engine(runner, tokenizer, max_num_seqs=4)
        sequences = [engine.new_sequence(str(i), p, options, lambda output: None) for i, p in enumerate(prompts)]
        for sequence in sequences:
            engine.scheduler.add(sequence)
        for _ in range(20):  # bounded: 1 prefill step + 5 decode steps are enough
            if not engine.scheduler.has_work():
                break
            engine.step()
        results[kernels] = [s.output_ids for s in sequences]
    assert all(len(tokens) == 6 for tokens in results["torch"])
    assert results["triton"] == results["torch"]
