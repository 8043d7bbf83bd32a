"""Attention over the paged KV pool, plugged into transformers' attention interface.

The Hugging Face modules compute queries, keys and values (with their own rotary or
learned positions) for the tokens of one engine step, packed as a single row of T tokens
from many sequences. This function writes the new keys and values into the pool at their
slots, then attends each token to its own sequence's cached keys through its block table:
all one-token (decode) queries together in one batched product, each prompt chunk on its own.

The kernels themselves are in kernels/: Triton on CUDA, plain PyTorch on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from transformers import AttentionInterface

ATTENTION_NAME = "meshserve_paged"


@dataclass
class KVPool:
    """Keys and values of every layer: [kv_heads, num_blocks, block_size, head_dim] each, allocated once.

    Heads lead so that gathering a batch's blocks yields [kv_heads, batch, tokens, head_dim]
    ready for batched matmuls, with no copy to re-lay it out.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(
        cls, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, device
    ) -> KVPool:
        shape = (kv_heads, num_blocks, block_size, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


@dataclass
class PagedBatch:
    """Where one step's tokens live in the pool; passed to every layer through the model's kwargs."""

    pool: KVPool
    kernels: ModuleType  # kernels.reference or kernels.triton_ops
    slot_mapping: torch.Tensor  # [T] flat slot (block * block_size + offset) of each new token
    decode_rows: torch.Tensor  # [D] rows of one-token queries
    decode_block_tables: torch.Tensor  # [D, max blocks], padded with block 0
    decode_context_lens: torch.Tensor  # [D] tokens each decode query attends to (itself included)
    prompt_rows: torch.Tensor  # [S] first row of each prompt chunk
    prompt_lens: torch.Tensor  # [S] its length
    prompt_starts: torch.Tensor  # [S] position of its first token (tokens before it are cached)
    prompt_block_tables: torch.Tensor  # [S, max blocks], padded with block 0
    prompt_row_index: torch.Tensor  # every row of every prompt chunk, in order


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    paged: PagedBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query: [1, heads, T, head_dim]; key, value: [1, kv_heads, T, head_dim]. Returns [1, T, heads, head_dim]."""
    if paged is None:
        raise RuntimeError(f"the {ATTENTION_NAME} attention runs only inside the meshserve engine")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(
        paged,
        module.layer_idx,
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        scale,
        sliding_window or 0,
    )
    return out.unsqueeze(0), None


def attend(
    paged: PagedBatch,
    layer: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    """queries [T, heads, head_dim], keys/values [T, kv_heads, head_dim] of one step's tokens: writes the keys
    and values into the pool, then attends each token to its own sequence. Returns [T, heads, head_dim]."""
    ops = paged.kernels
    key_pool, value_pool = paged.pool.keys[layer], paged.pool.values[layer]
    ops.write_kv(keys, values, key_pool, value_pool, paged.slot_mapping)
    out = torch.empty_like(queries)
    if paged.decode_rows.numel():
        out[paged.decode_rows] = ops.decode_attention(
            queries[paged.decode_rows].contiguous(),
            key_pool,
            value_pool,
            paged.decode_block_tables,
            paged.decode_context_lens,
            scale,
            window,
        )
    if paged.prompt_rows.numel():
        out[paged.prompt_row_index] = ops.prefill_attention(
            queries,
            key_pool,
            value_pool,
            paged.prompt_rows,
            paged.prompt_lens,
            paged.prompt_starts,
            paged.prompt_block_tables,
            scale,
            window,
        )
    return out


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
