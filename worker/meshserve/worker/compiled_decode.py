"""Decode-only steps of the fast path, compiled: `torch.compile` (inductor) on CPU, CUDA graphs on CUDA.

A step where every sequence decodes one token is the steady state of serving, so it gets the
compiled path; steps with prompt chunks run the same code eagerly. Batches are padded to a few
bucket sizes so shapes repeat: padding rows decode token 0 at position 0 into a scratch block the
block manager never hands out, and their logits are dropped. On CPU the block-table width is a
dynamic dimension (one graph serves every context length); inductor's compiled code lives in
$MESHSERVE_CACHE/inductor so a restart reuses it. On CUDA each bucket is captured once as a CUDA
graph over static buffers (tables as wide as the model's context), then replayed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from meshserve.common.config import cache_dir
from meshserve.worker.llama_step import LlamaStep, reduce_decode_attention
from meshserve.worker.paged_attention import KVPool

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")


def batch_buckets(max_batch: int, smallest: int = 1) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to max_batch (at least one bucket holds max_batch); none below
    `smallest`."""
    buckets = [b for b in (1, 2, 4, 8, *range(16, max_batch, 8)) if smallest <= b < max_batch]
    return sorted(set(buckets) | {max(max_batch, smallest)})


class CompiledDecode:
    """Runs padded decode batches through `step`; call `warm_up` once before serving."""

    def __init__(
        self, step: LlamaStep, pool: KVPool, scratch_block: int, max_batch: int, max_blocks: int, device: torch.device
    ) -> None:
        self.step = step
        self.pool = pool
        self.scratch_block = scratch_block
        self.block_size = pool.keys[0].shape[2]
        # On CPU one dynamic graph serves every batch of 2 or more, but a batch of 1 would be specialised
        # into a graph of its own whose kernels round differently: in bf16 a sequence's tokens would then
        # depend on whether it ran alone. Single sequences run as a batch of 2.
        self.buckets = batch_buckets(max_batch, smallest=2 if device.type == "cpu" else 1)
        self.max_blocks = max_blocks
        self.device = device
        self._graphs: dict[int, _Graph] = {}
        if device.type == "cpu":
            _use_our_inductor_cache()
            # Graphs compiled for another model in this process (tests build several) must not be reused:
            # dynamo's guards on the plain objects holding the weights do not tell such models apart.
            # A worker holds one model, so this costs it nothing; the on-disk cache keeps recompiling cheap.
            torch._dynamo.reset()
            # Only the batch and the table width vary (marked in run); the weights stay static, which keeps
            # tracing (symbolic shapes) short on every start.
            self._compiled = torch.compile(self._decode, fullgraph=True)

    def bucket(self, batch: int) -> int | None:
        """The smallest bucket holding `batch`, None when it exceeds the largest."""
        return next((b for b in self.buckets if b >= batch), None)

    def warm_up(self, progress: Callable[[str], None] = log.info) -> float:
        """Compiles (or captures) every bucket; returns the seconds it took."""
        start = time.monotonic()
        sizes = self.buckets[:1] if self.device.type == "cpu" else self.buckets
        for i, batch in enumerate(sizes):
            progress(f"compiling the decode step: batch {batch} ({i + 1} of {len(sizes)})")
            for width in (2, 3):
                self.run([0] * batch, [0] * batch, [[self.scratch_block] * width] * batch, [1] * batch)
        return time.monotonic() - start

    @torch.inference_mode()
    def run(
        self, input_ids: list[int], positions: list[int], tables: list[list[int]], context_lens: list[int]
    ) -> torch.Tensor:
        """One decode token per row; tables [rows][blocks]. Returns float32 logits [rows, vocab]."""
        rows = len(input_ids)
        batch = self.bucket(rows)
        if batch is None:
            raise ValueError(f"a decode batch of {rows} exceeds the largest bucket, {self.buckets[-1]}")
        pad = batch - rows
        scratch_slot = self.scratch_block * self.block_size
        slots = [
            table[p // self.block_size] * self.block_size + p % self.block_size
            for p, table in zip(positions, tables, strict=True)
        ]
        # At least 2 blocks wide: a dimension of size 1 would be specialised and compile another graph.
        width = max(2, max(len(t) for t in tables)) if self.device.type == "cpu" else self.max_blocks
        padded_tables = [t + [0] * (width - len(t)) for t in tables] + [[self.scratch_block] + [0] * (width - 1)] * pad
        inputs = (
            torch.tensor(input_ids + [0] * pad, dtype=torch.long),
            torch.tensor(positions + [0] * pad, dtype=torch.long),
            torch.tensor(slots + [scratch_slot] * pad, dtype=torch.long),
            torch.tensor(padded_tables, dtype=torch.long),
            torch.tensor(context_lens + [1] * pad, dtype=torch.long),
        )
        if self.device.type == "cpu":
            for tensor in inputs:
                torch._dynamo.mark_dynamic(tensor, 0)
            torch._dynamo.mark_dynamic(inputs[3], 1)
            return self._compiled(*inputs)[:rows]
        graph = self._graphs.get(batch)
        if graph is None:
            graph = self._graphs[batch] = _Graph(self._decode, [t.to(self.device) for t in inputs])
        return graph.replay(inputs)[:rows]

    def _decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        tables: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> torch.Tensor:
        """The decode step: attention as reductions inductor fuses with the gather on CPU; the device's own
        kernel (Triton) under CUDA graphs."""
        ops, pool = self.step.kernels, self.pool
        decode_attention = reduce_decode_attention if self.device.type == "cpu" else ops.decode_attention

        def attention(layer: int, q, k, v, scale: float, window: int) -> torch.Tensor:
            keys, values = pool.keys[layer], pool.values[layer]
            ops.write_kv(k, v, keys, values, slots)
            return decode_attention(q.contiguous(), keys, values, tables, context_lens, scale, window)

        return self.step.forward(input_ids, positions, None, attention)


def _use_our_inductor_cache() -> None:
    """Inductor's compiled code under $MESHSERVE_CACHE/inductor, unless the operator chose a directory.

    Importing torch's libraries already fills TORCHINDUCTOR_CACHE_DIR with torch's default (a per-user
    directory in /tmp, which does not survive a container restart), so that value counts as not chosen."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


class _Graph:
    """One CUDA graph of the decode step over static input buffers."""

    def __init__(self, step: Callable[..., torch.Tensor], buffers: list[torch.Tensor]) -> None:
        self.buffers = buffers
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up runs: Triton compiles and autotunes outside the capture
                step(*buffers)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step(*buffers)

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for buffer, values in zip(self.buffers, inputs, strict=True):
            buffer.copy_(values, non_blocking=True)
        self.graph.replay()
        return self.output
