"""`--dtype auto` on CPU for the fast path: bfloat16 or float32, whichever computes this model's matmuls faster
on this machine, measured at start.

Neither wins everywhere: on an AMD EPYC with avx512_bf16 a bf16 step ran about twice as fast as fp32 (DESIGN.md),
while on an Intel Xeon whose hypervisor hides AMX, oneDNN's bf16 matmuls at these shapes took 1.5-2.8x as long
as fp32's. A CPU's flags do not tell the two apart, so the worker times the model's own shapes (the fused gate|up
and the down projection, at a decode batch and at a prefill chunk) in both, alternating, and keeps float32
unless bfloat16 is clearly faster: float32 is also the exact one.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BF16_MARGIN = 0.85  # bfloat16 is chosen only when it takes at most this share of float32's time
MAX_ROWS = 2048  # output rows timed per weight: the rate per FLOP, not a big model's whole matrix
PREFILL_TOKENS = 256
ROUNDS = 5
BUDGET_S = 2.0  # stops early on a slow machine or a big model; what was measured by then decides


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    float32_ms: float  # one round of the timed shapes
    bfloat16_ms: float

    def describe(self) -> str:
        return (
            f"{self.dtype} (this machine's matmuls at the model's shapes: float32 {self.float32_ms:.2f} ms, "
            f"bfloat16 {self.bfloat16_ms:.2f} ms)"
        )


def fastest_cpu_dtype(hidden: int, intermediate: int, decode_batch: int) -> DtypeChoice:
    """Times x @ W.T for W the model's gate|up [2 * intermediate, hidden] and down [hidden, intermediate]
    (output rows capped at MAX_ROWS), at `decode_batch` rows and at a prefill chunk, in both dtypes."""
    shapes = [
        (rows, inner, min(outer, MAX_ROWS))
        for rows in (max(1, decode_batch), PREFILL_TOKENS)
        for inner, outer in ((hidden, 2 * intermediate), (intermediate, hidden))
    ]
    generator = torch.Generator().manual_seed(0)
    operands = {
        dtype: [
            (torch.randn(m, k, generator=generator).to(dtype), torch.randn(n, k, generator=generator).to(dtype))
            for m, k, n in shapes
        ]
        for dtype in (torch.float32, torch.bfloat16)
    }
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in operands}
    deadline = time.monotonic() + BUDGET_S
    for round_ in range(ROUNDS + 1):  # the first round warms oneDNN's kernels up and is not counted
        for dtype, pairs in operands.items():
            start = time.perf_counter()
            for x, weight in pairs:
                F.linear(x, weight)
            if round_:
                times[dtype].append(time.perf_counter() - start)
        if round_ and time.monotonic() > deadline:
            break
    fp32, bf16 = (statistics.median(times[dtype]) * 1e3 for dtype in (torch.float32, torch.bfloat16))
    return DtypeChoice(chosen(fp32, bf16), fp32, bf16)


def chosen(float32_ms: float, bfloat16_ms: float) -> str:
    return "bfloat16" if bfloat16_ms <= BF16_MARGIN * float32_ms else "float32"
