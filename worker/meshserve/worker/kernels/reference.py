"""Plain PyTorch versions of every kernel: the CPU path, and the reference the Triton kernels are tested against.

Shapes (the engine's paged layout):
  key_pool, value_pool  [kv_heads, num_blocks, block_size, head_dim]
  decode queries        [batch, heads, head_dim], one token per sequence
  prefill queries       [tokens, heads, head_dim], several sequences' chunks packed; span i is rows
                        rows[i] .. rows[i] + lens[i], positions starts[i] .. starts[i] + lens[i]
Heads map to KV heads in groups: head h reads KV head h // (heads // kv_heads).
sliding_window 0 means none; otherwise a query at position p sees keys at positions > p - window.
"""

from __future__ import annotations

import torch


def write_kv(
    key: torch.Tensor, value: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, slots: torch.Tensor
) -> None:
    """key, value: [tokens, kv_heads, head_dim]; slots: [tokens] = block * block_size + offset."""
    kv_heads, head_dim = key_pool.shape[0], key_pool.shape[3]
    key_pool.view(kv_heads, -1, head_dim).index_copy_(1, slots, key.transpose(0, 1).to(key_pool.dtype))
    value_pool.view(kv_heads, -1, head_dim).index_copy_(1, slots, value.transpose(0, 1).to(value_pool.dtype))


def _gather(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[batch, blocks] -> [kv_heads, batch, blocks * block_size, head_dim]."""
    batch, blocks = block_tables.shape
    kv_heads, _, block_size, head_dim = pool.shape
    return pool.index_select(1, block_tables.reshape(-1)).view(kv_heads, batch, blocks * block_size, head_dim)


def decode_attention(
    queries: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """queries [batch, heads, head_dim]; block_tables [batch, max blocks]; context_lens [batch] -> like queries."""
    batch, heads, head_dim = queries.shape
    kv_heads = key_pool.shape[0]
    keys, values = _gather(key_pool, block_tables), _gather(value_pool, block_tables)  # [kv_heads, batch, L, dim]
    # Grouped-query attention without repeating keys: queries as [kv_heads, batch, group, head_dim].
    q = queries.view(batch, kv_heads, heads // kv_heads, head_dim).transpose(0, 1).to(keys.dtype)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale  # [kv_heads, batch, group, L]
    positions = torch.arange(keys.shape[2], device=keys.device)
    visible = positions[None, :] < context_lens[:, None]
    if sliding_window:
        visible &= positions[None, :] >= (context_lens[:, None] - sliding_window)
    scores.masked_fill_(~visible[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values)  # [kv_heads, batch, group, head_dim]
    return out.transpose(0, 1).reshape(batch, heads, head_dim).to(queries.dtype)


def prefill_attention(
    queries: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    rows: torch.Tensor,
    lens: torch.Tensor,
    starts: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Causal attention of each span's queries to its cached prefix and itself. Returns [spans' rows, heads, dim]
    in span order (the rows the spans cover, concatenated)."""
    outputs = []
    for row, length, start, table in zip(rows.tolist(), lens.tolist(), starts.tolist(), block_tables, strict=True):
        outputs.append(
            _span_attention(queries[row : row + length], key_pool, value_pool, start, table, scale, sliding_window)
        )
    return torch.cat(outputs) if outputs else queries[:0]


def _span_attention(
    queries: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    start: int,
    table: torch.Tensor,
    scale: float,
    sliding_window: int,
) -> torch.Tensor:
    length, heads, head_dim = queries.shape
    kv_heads, block_size = key_pool.shape[0], key_pool.shape[2]
    context = start + length
    tables = table[: -(-context // block_size)].unsqueeze(0)
    keys = _gather(key_pool, tables)[:, 0, :context]  # [kv_heads, context, head_dim]
    values = _gather(value_pool, tables)[:, 0, :context]
    group = heads // kv_heads
    q = queries.transpose(0, 1).reshape(kv_heads, group * length, head_dim).to(keys.dtype)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale  # [kv_heads, group * length, context]
    scores = scores.view(kv_heads, group, length, context)
    query_positions = torch.arange(start, context, device=keys.device)[:, None]
    key_positions = torch.arange(context, device=keys.device)[None, :]
    visible = key_positions <= query_positions
    if sliding_window:
        visible &= key_positions > query_positions - sliding_window
    scores.masked_fill_(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype).view(kv_heads, group * length, context)
    out = torch.matmul(probs, values).view(heads, length, head_dim)
    return out.transpose(0, 1).to(queries.dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, hidden]. With a residual: h = x + residual, returns (norm(h), h); without: (norm(x), x).
    Computed in float32 and cast back before the weight, as transformers' Llama RMSNorm does."""
    hidden = x + residual if residual is not None else x
    h32 = hidden.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), hidden


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place. q [tokens, heads, dim], k [tokens, kv_heads, dim], cos/sin [tokens, dim] (halves repeated,
    the rotate-half convention of Llama and most Hugging Face models)."""
    for x in (q, k):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].clone(), x[..., half:].clone()
        c, s = cos[:, None, :half], sin[:, None, :half]
        x[..., :half] = (x1 * c - x2 * s).to(x.dtype)
        x[..., half:] = (x2 * c + x1 * s).to(x.dtype)
