"""The Triton kernels (CUDA on GPUs; the interpreter runs them on CPU tensors with TRITON_INTERPRET=1).

Each launcher has the signature of its reference in reference.py. Pools are contiguous
[kv_heads, num_blocks, block_size, head_dim]; block_size is a power of two of at least 16 (the
prefill kernel's tl.dot needs 16). Softmax and norms accumulate in float32 whatever the storage dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    key_ptr,
    value_ptr,
    key_pool_ptr,
    value_pool_ptr,
    slots_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    pool_head_stride,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    slot = tl.load(slots_ptr + token).to(tl.int64)
    target = head.to(tl.int64) * pool_head_stride + slot * HEAD_DIM + d
    k = tl.load(key_ptr + token * stride_kt + head * stride_kh + d, mask=d_mask).to(tl.float32)
    v = tl.load(value_ptr + token * stride_vt + head * stride_vh + d, mask=d_mask).to(tl.float32)
    tl.store(key_pool_ptr + target, k.to(key_pool_ptr.dtype.element_ty), mask=d_mask)
    tl.store(value_pool_ptr + target, v.to(value_pool_ptr.dtype.element_ty), mask=d_mask)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, slots: torch.Tensor
) -> None:
    tokens, kv_heads, head_dim = key.shape
    if tokens == 0:
        return
    write_kv_kernel[(tokens, kv_heads)](
        key,
        value,
        key_pool,
        value_pool,
        slots,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_pool.stride(0),
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
    )


@triton.jit
def decode_attention_kernel(
    q_ptr,
    key_pool_ptr,
    value_pool_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    scale,
    sliding_window,
    stride_qb,
    stride_qh,
    stride_tb,
    stride_ob,
    stride_oh,
    pool_head_stride,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """One program per (sequence, KV head): every query head of the group reads each key block once."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    n = tl.arange(0, BLOCK_SIZE)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    context = tl.load(lens_ptr + seq).to(tl.int32)
    first_visible = 0
    if sliding_window > 0:
        first_visible = tl.maximum(context - sliding_window, 0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    pool_head = kv_head.to(tl.int64) * pool_head_stride
    for j in range(first_visible // BLOCK_SIZE, tl.cdiv(context, BLOCK_SIZE)):
        block = tl.load(tables_ptr + seq * stride_tb + j).to(tl.int64)
        offsets = pool_head + (block * BLOCK_SIZE + n)[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(key_pool_ptr + offsets, mask=d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_SIZE, D]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_SIZE]
        positions = j * BLOCK_SIZE + n
        visible = (positions < context) & (positions >= first_visible)
        scores = tl.where(visible[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(value_pool_ptr + offsets, mask=d_mask[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_mask[:, None] & d_mask[None, :],
    )


def decode_attention(
    queries: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    batch, heads, head_dim = queries.shape
    kv_heads, _, block_size, _ = key_pool.shape
    out = torch.empty_like(queries)
    if batch == 0:
        return out
    group = heads // kv_heads
    decode_attention_kernel[(batch, kv_heads)](
        queries,
        key_pool,
        value_pool,
        block_tables,
        context_lens,
        out,
        scale,
        sliding_window,
        queries.stride(0),
        queries.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        key_pool.stride(0),
        GROUP=group,
        GROUP_PAD=max(triton.next_power_of_2(group), 2),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
    )
    return out


@triton.jit
def prefill_attention_kernel(
    q_ptr,
    key_pool_ptr,
    value_pool_ptr,
    out_ptr,
    rows_ptr,
    out_rows_ptr,
    lens_ptr,
    starts_ptr,
    tables_ptr,
    scale,
    sliding_window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_tb,
    pool_head_stride,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """One program per (span, tile of BLOCK_M queries, head): flash attention over the span's blocks, causal."""
    span = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    length = tl.load(lens_ptr + span).to(tl.int32)
    if tile * BLOCK_M < length:
        row = tl.load(rows_ptr + span).to(tl.int32)
        out_row = tl.load(out_rows_ptr + span).to(tl.int32)
        start = tl.load(starts_ptr + span).to(tl.int32)
        m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D_PAD)
        n = tl.arange(0, BLOCK_SIZE)
        m_mask = m < length
        d_mask = d < HEAD_DIM
        q = tl.load(
            q_ptr + (row + m)[:, None] * stride_qt + head * stride_qh + d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        query_positions = start + m
        last = tl.minimum(start + (tile + 1) * BLOCK_M, start + length)  # one past the last key any row sees
        first_visible = 0
        if sliding_window > 0:
            first_visible = tl.maximum(start + tile * BLOCK_M - sliding_window + 1, 0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        pool_head = (head // GROUP).to(tl.int64) * pool_head_stride
        for j in range(first_visible // BLOCK_SIZE, tl.cdiv(last, BLOCK_SIZE)):
            block = tl.load(tables_ptr + span * stride_tb + j).to(tl.int64)
            offsets = pool_head + (block * BLOCK_SIZE + n)[:, None] * HEAD_DIM + d[None, :]
            k = tl.load(key_pool_ptr + offsets, mask=d_mask[None, :], other=0.0).to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_M, BLOCK_SIZE]
            key_positions = j * BLOCK_SIZE + n
            visible = key_positions[None, :] <= query_positions[:, None]
            if sliding_window > 0:
                visible = visible & (key_positions[None, :] > query_positions[:, None] - sliding_window)
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            # Rows past the span's end may see no key at all: keep them finite (they are never stored).
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(value_pool_ptr + offsets, mask=d_mask[None, :], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + (out_row + m)[:, None] * stride_ot + head * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


PREFILL_BLOCK_M = 32


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
    _, heads, head_dim = queries.shape
    kv_heads, _, block_size, _ = key_pool.shape
    lengths = lens.tolist()
    out = queries.new_empty(sum(lengths), heads, head_dim)
    if not lengths:
        return out
    out_rows = torch.tensor([0, *lengths[:-1]], device=lens.device).cumsum(0)
    grid = (len(lengths), triton.cdiv(max(lengths), PREFILL_BLOCK_M), heads)
    prefill_attention_kernel[grid](
        queries,
        key_pool,
        value_pool,
        out,
        rows,
        out_rows,
        lens,
        starts,
        block_tables,
        scale,
        sliding_window,
        queries.stride(0),
        queries.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        key_pool.stride(0),
        GROUP=heads // kv_heads,
        BLOCK_M=PREFILL_BLOCK_M,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
    )
    return out


@triton.jit
def rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    hidden_out_ptr,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_h,
    HIDDEN: tl.constexpr,
    H_PAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, H_PAD)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Rounded to the input dtype first, as the unfused residual add would be.
        x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(hidden_out_ptr + row * stride_h + cols, x.to(hidden_out_ptr.dtype.element_ty), mask=mask)
    normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / HIDDEN + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = weight * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    hidden_out = torch.empty_like(x) if residual is not None else x
    if rows:
        rms_norm_kernel[(rows,)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            hidden_out,
            eps,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            out.stride(0),
            hidden_out.stride(0),
            HIDDEN=hidden,
            H_PAD=triton.next_power_of_2(hidden),
            HAS_RESIDUAL=residual is not None,
        )
    return out, hidden_out


@triton.jit
def rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    stride_xt,
    stride_xh,
    stride_ct,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    i = tl.arange(0, HALF_PAD)
    mask = i < HALF
    base = x_ptr + token * stride_xt + head * stride_xh
    x1 = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + token * stride_ct + i, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + token * stride_ct + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(base + i, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF + i, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    tokens, _, dim = q.shape
    if tokens == 0:
        return
    for x in (q, k):
        rotary_kernel[(tokens, x.shape[1])](
            x,
            cos,
            sin,
            x.stride(0),
            x.stride(1),
            cos.stride(0),
            HALF=dim // 2,
            HALF_PAD=triton.next_power_of_2(dim // 2),
        )
