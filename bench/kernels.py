"""Each kernel's time and achieved memory bandwidth; paged decode attention against PyTorch SDPA.

    python bench/kernels.py [--batch 32] [--context 1024] [--dtype bf16]

On CUDA: the Triton kernels, timed with triton.testing.do_bench, their bandwidth against the
device's peak (spec sheet when the device is known, and the bandwidth of a large copy measured
here), and decode attention against SDPA over the same keys laid out contiguously.
Without CUDA it says so and times the PyTorch references on CPU instead.
Shapes: a Llama-8B-like layer (32 query heads, 8 KV heads, head dim 128, hidden 4096), blocks of 16.
"""

from __future__ import annotations

import argparse
import time

import torch

from meshserve.worker.kernels import reference

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, BLOCK_SIZE = 32, 8, 128, 4096, 16
SPEC_PEAK_GBPS = {"H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "H200": 4800, "A100": 2039, "L40S": 864}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timed(fn, cuda: bool) -> float:
    """Seconds per call."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn) / 1000
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 200 and time.perf_counter() - start < 1.0:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype] if cuda else torch.float32
    if cuda:
        from meshserve.worker.kernels import triton_ops as ops

        name = torch.cuda.get_device_name()
        spec = next((v for k, v in SPEC_PEAK_GBPS.items() if k in name), None)
        big = torch.empty(1 << 28, dtype=torch.uint8, device=device)
        copy_gbps = 2 * big.numel() / timed(lambda: big.clone(), True) / 1e9
        print(f"{name}: spec peak {spec or '?'} GB/s, measured copy {copy_gbps:.0f} GB/s; {args.dtype}")
        peak = spec or copy_gbps
    else:
        ops = reference
        torch.set_num_threads(1)
        print("no CUDA device: timing the PyTorch references on CPU (float32, 1 thread); no Triton numbers")
        peak = None

    batch, context = args.batch, args.context
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    element = torch.tensor([], dtype=dtype).element_size()
    key_pool = torch.randn(KV_HEADS, num_blocks, BLOCK_SIZE, HEAD_DIM, device=device).to(dtype)
    value_pool = torch.randn_like(key_pool)
    tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, device=device)
    queries = torch.randn(batch, HEADS, HEAD_DIM, device=device).to(dtype)
    scale = HEAD_DIM**-0.5
    prefill_len = 512
    prefill_q = torch.randn(prefill_len, HEADS, HEAD_DIM, device=device).to(dtype)
    span = [torch.tensor([v], device=device) for v in (0, prefill_len, context - prefill_len)]
    x = torch.randn(batch * 16, HIDDEN, device=device).to(dtype)
    weight = torch.ones(HIDDEN, device=device).to(dtype)
    new_k = torch.randn(batch * 16, KV_HEADS, HEAD_DIM, device=device).to(dtype)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[: batch * 16]
    rot_q = torch.randn(batch * 16, HEADS, HEAD_DIM, device=device).to(dtype)
    rot_k = torch.randn(batch * 16, KV_HEADS, HEAD_DIM, device=device).to(dtype)
    cos = torch.randn(batch * 16, HEAD_DIM, device=device).to(dtype)

    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * element
    cases = [
        (
            f"decode attention (batch {batch}, context {context})",
            lambda: ops.decode_attention(queries, key_pool, value_pool, tables, lens, scale),
            kv_bytes,
        ),
        (
            f"prefill attention ({prefill_len} new after {context - prefill_len} cached)",
            lambda: ops.prefill_attention(
                prefill_q, key_pool, value_pool, span[0], span[1], span[2], tables[:1], scale
            ),
            2 * context * KV_HEADS * HEAD_DIM * element,
        ),
        (
            f"KV write ({batch * 16} tokens)",
            lambda: ops.write_kv(new_k, new_k, key_pool, value_pool, slots),
            4 * new_k.numel() * element,
        ),
        (
            f"RMSNorm + residual ({batch * 16} x {HIDDEN})",
            lambda: ops.rms_norm(x, weight, 1e-6, x),
            4 * x.numel() * element,
        ),
        (
            f"rotary in place ({batch * 16} tokens)",
            lambda: ops.rotary(rot_q, rot_k, cos, cos),
            2 * (rot_q.numel() + rot_k.numel()) * element,
        ),
    ]
    print(f"\n{'kernel':58s} {'time':>10s} {'GB/s':>8s} {'of peak':>8s}")
    for label, fn, moved in cases:
        seconds = timed(fn, cuda)
        gbps = moved / seconds / 1e9
        share = f"{gbps / peak:.0%}" if peak else "-"
        print(f"{label:58s} {seconds * 1e6:8.1f}us {gbps:8.1f} {share:>8s}")

    # SDPA on the same keys, laid out contiguously (what a server without paging would read).
    keys = reference._gather(key_pool, tables).transpose(0, 1).contiguous()  # [batch, kv_heads, L, dim]
    values = reference._gather(value_pool, tables).transpose(0, 1).contiguous()
    q = queries.unsqueeze(2)  # [batch, heads, 1, dim]

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)

    paged = timed(cases[0][1], cuda)
    contiguous = timed(sdpa, cuda)
    which = "Triton paged" if cuda else "reference paged"
    print(f"\ndecode attention: {which} {paged * 1e6:.1f}us vs SDPA on contiguous KV {contiguous * 1e6:.1f}us")
    print(f"ratio (SDPA time / paged time): {contiguous / paged:.2f}")


if __name__ == "__main__":
    main()
