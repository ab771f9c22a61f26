"""The batch-invariant mode's attention as one Triton kernel (the GPU side of `attention.batch_invariant`).

Same policy as the PyTorch version: one program per (query tile, KV head) owns QUERY_TILE positions x G query
heads, and loops over KV splits of KV_SPLIT keys from the first its window reaches to the one holding its last
position, in order, with an fp32 online softmax. Nothing about the launch changes what a program computes:
no split-KV across programs (Flash-Decoding's split count chosen from the batch, as `triton_decode` does, is
exactly what this mode must not do), BLOCK_N is KV_SPLIT, and the tile sizes are constants, not autotuned.
The grid's size only says how many programs run. Products are fp32 with `input_precision="ieee"` (no TF32).
Plain (unquantized) pages only; the caller dequantizes otherwise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longreach.attention.batch_invariant import KV_SPLIT, QUERY_TILE, TilePlan


@triton.jit
def _fixed_split_kernel(
    Q, K, V, Out, QueryRows, TileSeq, TileIndex, KeyLimit, KeySlots,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_slots,
    num_rows, window_left, scale,
    QT: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, S: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    idx = tl.arange(0, QT * GP)  # tile rows outer, group heads inner (padded to a power of two, GP)
    i, g = idx // GP, idx % GP
    rows = tl.load(QueryRows + tile * QT + i)  # (R,) rows of q; num_rows for padding
    is_row = (rows < num_rows) & (g < G)
    head = kv_head * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(
        Q + rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=is_row[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    t = tl.load(TileIndex + tile)
    seq = tl.load(TileSeq + tile)
    limit = tl.load(KeyLimit + tile)
    q_pos = t * QT + i
    last = (t * QT + QT - 1) // S
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(t * QT - window_left, 0) // S
    m = tl.full((QT * GP,), float("-inf"), tl.float32)
    l_sum = tl.zeros((QT * GP,), tl.float32)
    acc = tl.zeros((QT * GP, BLOCK_D), tl.float32)
    for c in range(first, last + 1):
        k_pos = c * S + tl.arange(0, S)
        slots = tl.load(KeySlots + seq * stride_slots + k_pos)
        kv_off = slots[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
        k = tl.load(K + kv_off, mask=d_ok[None, :], other=0.0).to(tl.float32)  # (S, BLOCK_D)
        v = tl.load(V + kv_off, mask=d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (R, S)
        hidden = (k_pos[None, :] > q_pos[:, None]) | (k_pos[None, :] >= limit)
        if HAS_WINDOW:
            hidden = hidden | (k_pos[None, :] < q_pos[:, None] - window_left)
        s = tl.where(hidden, float("-inf"), s)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m = m_new
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(
        Out + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out,
        mask=is_row[:, None] & d_ok[None, :],
    )


def fixed_split_attention_triton(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    plan: TilePlan,
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """q (T, Hq, D); k_pages / v_pages: the layer's plain pages [num_blocks, block_size, Hkv, D] (the step's
    K/V written) -> (T, Hq, D) in q's dtype, bitwise independent of what else is in the plan."""
    num_rows, num_heads, head_dim = q.shape
    if num_rows != plan.num_rows:
        raise ValueError(f"q has {num_rows} rows but the tile plan was built for {plan.num_rows}")
    k = k_pages.reshape(-1, *k_pages.shape[2:])  # (slots, Hkv, D)
    v = v_pages.reshape(-1, *v_pages.shape[2:])
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    dev = q.device
    out = torch.zeros(num_rows, num_heads, head_dim, dtype=torch.float32, device=dev)
    num_tiles = plan.query_rows.shape[0]
    tile_index, key_limit = plan.tile_index_and_key_limit()
    _fixed_split_kernel[(num_tiles, num_kv_heads)](
        q, k, v, out, plan.query_rows, plan.tile_seq, tile_index, key_limit,
        plan.key_slots, q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        plan.key_slots.stride(0), num_rows, max(window_size[0], 0), scale,
        QT=QUERY_TILE, G=group, GP=triton.next_power_of_2(group), D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), S=KV_SPLIT,
        HAS_WINDOW=window_size[0] >= 0,
    )  # fmt: skip
    return out.to(q.dtype)
