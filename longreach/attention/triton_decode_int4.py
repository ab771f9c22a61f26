"""Triton paged decode over an int4 (KIVI) KV cache, dequantized inside the kernel.

The storage is `kvcache.quant.Int4KV`'s: per block, keys and values as packed nibbles (two 4-bit codes per
uint8, element 2i in the low nibble) `[num_blocks, block_size, Hkv, D/2]`; keys quantized per channel over
groups of G consecutive tokens (`k_scale`, `k_min`: `[num_blocks, block_size/G, Hkv, D]`), values per token
over groups of G channels (`v_scale`, `v_min`: `[num_blocks, block_size, Hkv, D/G]`), x = code * scale + min.
A sequence's tokens [0, Q) are quantized in its blocks; its recent tokens [Q, L) are kept in full precision in
its window slot `[num_slots, R + G, Hkv, D]`, a ring indexed by position % (R + G).

The kernel is `triton_decode.py`'s Flash-Decoding split-K (same splits, same merge kernel): each K/V tile is
read where its tokens live, the codes unpacked and scaled in fp32 and cast to q's dtype before the products,
so only the nibbles, their scales and the short window cross memory (~4.5 bits a value instead of 16). The
PyTorch path it replaces dequantizes every key and value first (`Int4KV.read`), then attends.
"""

from __future__ import annotations

import math
from contextlib import nullcontext as _nullcontext

import torch
import triton
import triton.language as tl

from longreach.attention.triton_decode import _launch_merge, _plan_splits, _SplitPlan
from longreach.attention.triton_launch import LOG2E, UNBOUNDED
from longreach.attention.triton_launch import require_device as _require_device

INT4_STORE_KEYS = ("k", "v", "k_scale", "k_min", "v_scale", "v_min", "k_window", "v_window")


@triton.jit(do_not_specialize=["window_left", "split_len", "group", "ring"])
def _int4_split_kernel(
    Q,
    KC,
    VC,
    KS,
    KM,
    VS,
    VM,
    KW,
    VW,
    BlockTable,
    SeqLens,
    NumQuant,
    WinSlot,
    OutPart,
    LsePart,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_kgb,
    stride_kgs,
    stride_kgh,
    stride_vgb,
    stride_vgs,
    stride_vgh,
    stride_wb,
    stride_ws,
    stride_wh,
    stride_bt,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    qk_scale,
    window_left,
    split_len,
    group,
    ring,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    QGROUP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + seq)
    num_quant = tl.load(NumQuant + seq)
    win = tl.load(WinSlot + seq).to(tl.int64)
    start = tl.maximum(seq_len - 1 - window_left, 0)
    lo = start + split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_h
    h_ok = offs_h < group
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BLOCK_H, BLOCK_D)
    table = BlockTable + seq.to(tl.int64) * stride_bt
    byte_d = offs_d // 2
    shift = (offs_d % 2) * 4  # element 2i in the low nibble, 2i + 1 in the high one
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n in range(lo, hi, BLOCK_N):
        pos = n + tl.arange(0, BLOCK_N)
        ok = pos < hi
        quant = ok & (pos < num_quant)
        qmask = quant[:, None] & d_ok[None, :]
        wmask = (ok & (pos >= num_quant))[:, None] & d_ok[None, :]
        block = tl.load(table + pos // PAGE_SIZE, mask=quant, other=0).to(tl.int64)
        offset = pos % PAGE_SIZE
        codes = (
            block[:, None] * stride_cb + offset[:, None] * stride_cs + kv_head * stride_ch + byte_d[None, :]
        )
        k_code = (tl.load(KC + codes, mask=qmask, other=0) >> shift[None, :]) & 0xF  # (BLOCK_N, BLOCK_D)
        v_code = (tl.load(VC + codes, mask=qmask, other=0) >> shift[None, :]) & 0xF
        k_grp = (
            block[:, None] * stride_kgb
            + (offset // QGROUP)[:, None] * stride_kgs
            + kv_head * stride_kgh
            + offs_d[None, :]
        )  # keys: per channel, one (scale, min) per G tokens
        v_grp = (
            block[:, None] * stride_vgb
            + offset[:, None] * stride_vgs
            + kv_head * stride_vgh
            + (offs_d // QGROUP)[None, :]
        )  # values: per token, one (scale, min) per G channels
        k_q = k_code.to(tl.float32) * tl.load(KS + k_grp, mask=qmask, other=0.0).to(tl.float32) + tl.load(
            KM + k_grp, mask=qmask, other=0.0
        ).to(tl.float32)
        v_q = v_code.to(tl.float32) * tl.load(VS + v_grp, mask=qmask, other=0.0).to(tl.float32) + tl.load(
            VM + v_grp, mask=qmask, other=0.0
        ).to(tl.float32)
        recent = win * stride_wb + (pos % ring).to(tl.int64)[:, None] * stride_ws + kv_head * stride_wh
        k_w = tl.load(KW + recent + offs_d[None, :], mask=wmask, other=0.0).to(tl.float32)
        v_w = tl.load(VW + recent + offs_d[None, :], mask=wmask, other=0.0).to(tl.float32)
        k = tl.where(quant[:, None], k_q, k_w).to(q.dtype)
        v = tl.where(quant[:, None], v_q, v_w).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_H, BLOCK_N), log2 units
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    is_empty = l_i == 0.0
    l_safe = tl.where(is_empty, 1.0, l_i)
    lse2 = tl.where(is_empty, float("-inf"), m_i + tl.math.log2(l_safe))
    row = seq.to(tl.int64) * stride_pb + heads[:, None] * stride_ph + split * stride_ps
    tl.store(OutPart + row + offs_d[None, :], acc / l_safe[:, None], mask=h_ok[:, None] & d_ok[None, :])
    tl.store(LsePart + seq.to(tl.int64) * stride_lb + heads * stride_lh + split, lse2, mask=h_ok)


def _check_int4_inputs(q, store, block_table, cache_seqlens, num_quantized, window_slots, group_size):
    """(batch, Hq, Hkv, D, block_size) after checking shapes, dtypes and the per-sequence state tensors."""
    missing = [name for name in INT4_STORE_KEYS if name not in store]
    if missing:
        raise ValueError(f"int4 store lacks {missing}; it needs {list(INT4_STORE_KEYS)} (Int4KV.allocate)")
    if q.dim() != 3:
        raise ValueError(f"q must be (B, Hq, D), got shape {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, half = store["k"].shape
    expected = {
        "k": (num_blocks, block_size, num_kv_heads, head_dim // 2),
        "v": (num_blocks, block_size, num_kv_heads, head_dim // 2),
        "k_scale": (num_blocks, block_size // group_size, num_kv_heads, head_dim),
        "k_min": (num_blocks, block_size // group_size, num_kv_heads, head_dim),
        "v_scale": (num_blocks, block_size, num_kv_heads, head_dim // group_size),
        "v_min": (num_blocks, block_size, num_kv_heads, head_dim // group_size),
    }
    for name, shape in expected.items():
        if tuple(store[name].shape) != shape or store[name].stride(-1) != 1:
            raise ValueError(f"int4 store[{name!r}] has shape {tuple(store[name].shape)}, expected {shape}")
    for a, b in (("k", "v"), ("k_scale", "k_min"), ("v_scale", "v_min"), ("k_window", "v_window")):
        if store[a].stride() != store[b].stride():  # each pair shares one set of strides in the kernel
            raise ValueError(f"int4 store[{a!r}] and [{b!r}] must have equal strides")
    if store["k"].dtype != torch.uint8 or store["v"].dtype != torch.uint8:
        raise ValueError(f"int4 codes must be uint8 (packed nibbles), got {store['k'].dtype}")
    if block_size % group_size or head_dim % group_size or num_heads % num_kv_heads:
        raise ValueError(
            f"block_size {block_size} and head_dim {head_dim} must be multiples of group_size {group_size}, "
            f"and Hq {num_heads} of Hkv {num_kv_heads}"
        )
    window = store["k_window"]
    if window.dim() != 4 or tuple(window.shape[2:]) != (num_kv_heads, head_dim) or window.stride(-1) != 1:
        raise ValueError(
            f"int4 window must be (slots, R + G, {num_kv_heads}, {head_dim}), got {tuple(window.shape)}"
        )
    for name, t in (
        ("cache_seqlens", cache_seqlens),
        ("num_quantized", num_quantized),
        ("window_slots", window_slots),
    ):
        if tuple(t.shape) != (batch,) or t.dtype != torch.int32:
            raise ValueError(f"{name} must be ({batch},) int32, got {tuple(t.shape)} {t.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be ({batch}, max_blocks) int32, got {tuple(block_table.shape)}")
    return batch, num_heads, num_kv_heads, head_dim, block_size


def paged_decode_attention_int4(
    q,
    store: dict,
    block_table,
    cache_seqlens,
    num_quantized,
    window_slots,
    group_size: int = 32,
    softmax_scale=None,
    window_size=(-1, -1),
    return_lse=False,
    num_splits=None,
    config=None,
):
    """Flash-Decoding over an int4 KV cache, dequantized in the kernel.

    q: (B, Hq, D); store: one layer's `Int4KV` tensors (see the module docstring); block_table: (B, max_blocks)
    int32; cache_seqlens: (B,) int32 keys per sequence; num_quantized: (B,) int32, how many of them are
    quantized in the blocks (the rest are in the window); window_slots: (B,) int32 each sequence's window slot.
    window_size: (left, right) as in `paged.paged_decode_attention_torch`. Returns out (B, Hq, D) in q's dtype
    and, with return_lse, lse (B, Hq) fp32 (natural log)."""
    batch, num_heads, num_kv_heads, head_dim, block_size = _check_int4_inputs(
        q, store, block_table, cache_seqlens, num_quantized, window_slots, group_size
    )
    _require_device(q)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    left = int(window_size[0])
    capacity = block_table.shape[1] * block_size
    span = capacity if left < 0 else min(capacity, left + 1)
    out = torch.empty_like(q)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device)
    if batch == 0 or span == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out
    plan = _plan_splits(q, num_kv_heads, span, num_splits, scale, left, config)
    out_part = torch.empty(batch, num_heads, plan.num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, num_heads, plan.num_splits, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        _launch_int4_split(
            q,
            store,
            block_table,
            (cache_seqlens, num_quantized, window_slots),
            out_part,
            lse_part,
            plan,
            group_size,
        )
        _launch_merge(out_part, lse_part, out, lse, plan)
    return (out, lse) if return_lse else out


def _launch_int4_split(q, store, block_table, per_seq, out_part, lse_part, plan: _SplitPlan, group_size: int):
    codes, k_grp, v_grp, window = store["k"], store["k_scale"], store["v_scale"], store["k_window"]
    num_kv_heads = codes.shape[2]
    group = q.shape[1] // num_kv_heads
    block_n = plan.config.kwargs["BLOCK_N"] if plan.config is not None else 32
    left = plan.window_left
    _int4_split_kernel[(q.shape[0], num_kv_heads, plan.num_splits)](
        q,
        codes,
        store["v"],
        k_grp,
        store["k_min"],
        v_grp,
        store["v_min"],
        window,
        store["v_window"],
        block_table,
        *per_seq,
        out_part,
        lse_part,
        q.stride(0),
        q.stride(1),
        *codes.stride()[:3],
        *k_grp.stride()[:3],
        *v_grp.stride()[:3],
        *window.stride()[:3],
        block_table.stride(0),
        *out_part.stride()[:3],
        *lse_part.stride()[:2],
        plan.softmax_scale * LOG2E,
        UNBOUNDED if left < 0 else min(left, UNBOUNDED),
        plan.split_len,
        group,
        window.shape[1],
        HEAD_DIM=q.shape[2],
        BLOCK_D=plan.block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        PAGE_SIZE=codes.shape[1],
        QGROUP=group_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_N=block_n,
        num_warps=4,
        num_stages=2,
    )


__all__ = ["INT4_STORE_KEYS", "paged_decode_attention_int4"]
