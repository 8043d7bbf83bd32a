"""Attention over the paged KV pool, plugged into transformers' attention interface.

The Hugging Face modules compute queries, keys and values (with their own rotary or
learned positions) for the tokens of one engine step, packed as a single row of T tokens
from many sequences. This function writes the new keys and values into the pool at their
slots, then attends each token to its own sequence's cached keys through its block table:
all one-token (decode) queries together in one batched product, each prompt chunk on its own.

This is the plain PyTorch reference path; kernels/ holds the fused GPU versions.
"""

from __future__ import annotations

from dataclasses import dataclass

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
class PromptSpan:
    """Query rows [first_row, first_row + length) are tokens start.. of one sequence."""

    first_row: int
    length: int
    start: int
    block_table: torch.Tensor  # [blocks covering start + length tokens]


@dataclass
class PagedBatch:
    """Where one step's tokens live in the pool; passed to every layer through the model's kwargs."""

    pool: KVPool
    slot_mapping: torch.Tensor  # [T] flat slot (block * block_size + offset) of each new token
    decode_rows: torch.Tensor  # [D] rows of one-token queries
    decode_block_tables: torch.Tensor  # [D, max blocks], padded with block 0
    decode_context_lens: torch.Tensor  # [D] tokens each decode query attends to (itself included)
    prompts: list[PromptSpan]


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
    layer = module.layer_idx
    key_pool, value_pool = paged.pool.keys[layer], paged.pool.values[layer]
    kv_heads, head_dim = key_pool.shape[0], key_pool.shape[3]
    scale = scaling if scaling is not None else head_dim**-0.5

    key_pool.view(kv_heads, -1, head_dim).index_copy_(1, paged.slot_mapping, key[0].to(key_pool.dtype))
    value_pool.view(kv_heads, -1, head_dim).index_copy_(1, paged.slot_mapping, value[0].to(value_pool.dtype))

    queries = query[0].transpose(0, 1)  # [T, heads, head_dim]
    out = torch.empty_like(queries)
    if paged.decode_rows.numel():
        out[paged.decode_rows] = _decode_attention(
            queries[paged.decode_rows],
            key_pool,
            value_pool,
            paged.decode_block_tables,
            paged.decode_context_lens,
            scale,
            sliding_window,
        )
    for span in paged.prompts:
        rows = slice(span.first_row, span.first_row + span.length)
        out[rows] = _prompt_attention(queries[rows], key_pool, value_pool, span, scale, sliding_window)
    return out.unsqueeze(0), None


def _gather(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[batch, blocks] -> [kv_heads, batch, blocks * block_size, head_dim]."""
    batch, blocks = block_tables.shape
    kv_heads, _, block_size, head_dim = pool.shape
    return pool.index_select(1, block_tables.reshape(-1)).view(kv_heads, batch, blocks * block_size, head_dim)


def _decode_attention(
    queries: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    batch, heads, head_dim = queries.shape
    kv_heads = key_pool.shape[0]
    keys, values = _gather(key_pool, block_tables), _gather(value_pool, block_tables)  # [kv_heads, batch, L, dim]
    # Grouped-query attention without repeating keys: queries as [kv_heads, batch, group, head_dim].
    q = queries.view(batch, kv_heads, heads // kv_heads, head_dim).transpose(0, 1).to(keys.dtype)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale  # [kv_heads, batch, group, L]
    positions = torch.arange(keys.shape[2], device=keys.device)
    visible = positions[None, :] < context_lens[:, None]
    if sliding_window is not None:
        visible &= positions[None, :] >= (context_lens[:, None] - sliding_window)
    scores.masked_fill_(~visible[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values)  # [kv_heads, batch, group, head_dim]
    return out.transpose(0, 1).reshape(batch, heads, head_dim).to(queries.dtype)


def _prompt_attention(
    queries: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    span: PromptSpan,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    length, heads, head_dim = queries.shape
    kv_heads = key_pool.shape[0]
    context = span.start + span.length
    tables = span.block_table.unsqueeze(0)
    keys = _gather(key_pool, tables)[:, 0, :context]  # [kv_heads, context, head_dim]
    values = _gather(value_pool, tables)[:, 0, :context]
    q = queries.transpose(0, 1).reshape(kv_heads, heads // kv_heads * length, head_dim).to(keys.dtype)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale  # [kv_heads, group * length, context]
    scores = scores.view(kv_heads, heads // kv_heads, length, context)
    query_positions = torch.arange(span.start, context, device=keys.device)[:, None]
    key_positions = torch.arange(context, device=keys.device)[None, :]
    visible = key_positions <= query_positions
    if sliding_window is not None:
        visible &= key_positions > query_positions - sliding_window
    scores.masked_fill_(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype).view(kv_heads, heads // kv_heads * length, context)
    out = torch.matmul(probs, values).view(heads, length, head_dim)
    return out.transpose(0, 1).to(queries.dtype)


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
