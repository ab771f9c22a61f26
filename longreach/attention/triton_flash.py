"""Triton FlashAttention-2 forward and backward over packed (varlen) sequences.

Follows FlashAttention-2 (Dao, 2023) and Triton's fused-attention tutorial, in the THD layout of
`flash_attn_varlen_func`: q (total_q, Hq, D), k/v (total_k, Hkv, D), sequence b owning rows
cu_seqlens[b]:cu_seqlens[b+1]. Masks follow FlashAttention: causal is bottom-right aligned, the
window (left, right) lets query i see keys [i + Sk - Sq - left, i + Sk - Sq + right], a row with
nothing to attend to outputs 0 (its log-sum-exp is -inf, as in `reference.py`).

Forward: one program per (query block, query head, sequence); online softmax in the exp2 domain
(the softmax scale is folded into log2(e)), the accumulator rescaled by exp2(m_old - m_new) and
normalised once at the end. The key loop is split into blocks wholly inside the causal/window band
(no mask arithmetic) and the masked blocks at its edges; blocks wholly outside the band are never
visited. Backward (atomic-free): delta = rowsum(dO * O); one kernel owns a key block and loops over
the query blocks of every query head in its GQA group (so dK/dV are summed in registers); another
owns a query block and loops over key blocks for dQ.

Head dims up to 256 are padded to the next power of two with masked loads. fp32 uses
`input_precision="ieee"` so no TF32 rounding creeps in. On a GPU the configs are autotuned per
(head dim, causal, dtype) over a small Hopper set (LONGREACH_TRITON_AUTOTUNE=0 takes the first
config that fits instead); under TRITON_INTERPRET=1 one small fixed config keeps CPU tests fast.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime import errors as _triton_errors

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
AUTOTUNE = not INTERPRET and os.environ.get("LONGREACH_TRITON_AUTOTUNE", "1") != "0"
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
UNBOUNDED = 1 << 30  # a window side of -1 becomes this; keeps every index sum inside int32
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NO_SPECIALIZE = ["window_left", "window_right", "group", "total_q"]
# errors a too-large config raises when compiled or loaded (PTXASError exists from triton 3.2 on)
_CONFIG_ERRORS = tuple(getattr(_triton_errors, name) for name in ("OutOfResources", "PTXASError")
                       if hasattr(_triton_errors, name)) + (RuntimeError,)


# ----------------------------------------------------------------------------- band arithmetic
# Row i of a sequence sees key j iff  i + diag - left <= j <= i + diag + right  and  j < seq_k,
# with diag = seq_k - seq_q (bottom-right alignment). Each helper returns block indices
# (first, first_full, end_full, end): [first, first_full) and [end_full, end) need masks,
# [first_full, end_full) is wholly visible. Every division sees non-negative operands
# (Triton divides toward zero, the interpreter toward -inf).

@triton.jit
def _key_blocks(m0, seq_q, seq_k, diag, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    last_row = tl.minimum(m0 + BLOCK_M, seq_q) - 1
    lo = tl.maximum(m0 + diag - left, 0)
    hi = tl.maximum(tl.minimum(last_row + diag + right + 1, seq_k), 0)
    full_lo = tl.maximum(last_row + diag - left, 0)
    full_hi = tl.maximum(tl.minimum(m0 + diag + right + 1, seq_k), 0)
    first = lo // BLOCK_N
    end = tl.maximum((hi + BLOCK_N - 1) // BLOCK_N, first)
    first_full = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N, first), end)
    end_full = tl.minimum(tl.maximum(full_hi // BLOCK_N, first_full), end)
    return first, first_full, end_full, end


@triton.jit
def _query_blocks(n0, seq_q, seq_k, diag, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    last_col = tl.minimum(n0 + BLOCK_N, seq_k) - 1
    lo = tl.maximum(n0 - diag - right, 0)
    hi = tl.maximum(tl.minimum(last_col - diag + left + 1, seq_q), 0)
    full_lo = tl.maximum(last_col - diag - right, 0)
    full_hi = tl.maximum(tl.minimum(n0 - diag + left + 1, seq_q), 0)
    first = lo // BLOCK_M
    end = tl.maximum((hi + BLOCK_M - 1) // BLOCK_M, first)
    first_full = tl.minimum(tl.maximum((full_lo + BLOCK_M - 1) // BLOCK_M, first), end)
    end_full = tl.minimum(tl.maximum(full_hi // BLOCK_M, first_full), end)
    return first, first_full, end_full, end


@triton.jit
def _visible(offs_m, offs_n, diag, left, right):
    # (BLOCK_M, BLOCK_N) bool for rows offs_m and keys offs_n of one sequence
    return (offs_n[None, :] <= offs_m[:, None] + diag + right) & (offs_n[None, :] >= offs_m[:, None] + diag - left)


# ----------------------------------------------------------------------------- forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_d,
               first, end, seq_k, diag, left, right, qk_scale,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    k_ptrs += (first * BLOCK_N).to(tl.int64) * stride_kt
    v_ptrs += (first * BLOCK_N).to(tl.int64) * stride_vt
    for block in range(first, end):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)                      # (BLOCK_N, BLOCK_D)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale      # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = _visible(offs_m, offs_n, diag, left, right) & (offs_n[None, :] < seq_k)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)              # row still empty: p = 0, max stays -inf
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
                qk_scale, window_left, window_right, group,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    seq_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= seq_q:
        return
    k_start = tl.load(cu_seqlens_k + seq)
    seq_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    diag = seq_k - seq_q
    left = window_left
    if IS_CAUSAL:
        right = 0
    else:
        right = window_right
    kv_head = head // group

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    q_rows = q_start.to(tl.int64) + offs_m[:, None]                                    # int64: long documents
    q_ptrs = Q + q_rows * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)   # (BLOCK_M, BLOCK_D)
    k_ptrs = (K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
              + tl.arange(0, BLOCK_N)[:, None] * stride_kt + offs_d[None, :])
    v_ptrs = (V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
              + tl.arange(0, BLOCK_N)[:, None] * stride_vt + offs_d[None, :])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first, first_full, end_full, end = _key_blocks(m0, seq_q, seq_k, diag, left, right, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_d,
                               first, first_full, seq_k, diag, left, right, qk_scale,
                               True, EVEN_D, HEAD_DIM, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_d,
                               first_full, end_full, seq_k, diag, left, right, qk_scale,
                               False, EVEN_D, HEAD_DIM, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_d,
                               end_full, end, seq_k, diag, left, right, qk_scale,
                               True, EVEN_D, HEAD_DIM, BLOCK_N, PRECISION)

    is_empty = l_i == 0.0
    l_safe = tl.where(is_empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(is_empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    o_ptrs = Out + q_rows * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + head.to(tl.int64) * stride_lh + q_start + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward

@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_preprocess(Out, dOut, Delta, stride_ot, stride_oh, stride_dot, stride_doh, stride_dh, total_q,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    head = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < total_q) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(Out + head * stride_oh + rows * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dOut + head * stride_doh + rows * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                   # (BLOCK_M,)
    tl.store(Delta + head.to(tl.int64) * stride_dh + offs_m, delta, mask=offs_m < total_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot, offs_n, offs_d,
                    first, end, seq_q, diag, left, right, qk_scale,
                    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    PRECISION: tl.constexpr):
    q_ptrs += (first * BLOCK_M).to(tl.int64) * stride_qt
    do_ptrs += (first * BLOCK_M).to(tl.int64) * stride_dot
    for block in range(first, end):
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        if MASKED:  # rows past seq_q load lse = +inf, so p = 0 and they add nothing
            row_ok = offs_m < seq_q
            mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(q_ptrs, mask=mask, other=0.0)                             # (BLOCK_M, BLOCK_D)
            do = tl.load(do_ptrs, mask=mask, other=0.0)
            lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        else:       # wholly visible blocks lie inside the sequence
            if EVEN_D:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            lse = tl.load(lse_ptr + offs_m)
            delta = tl.load(delta_ptr + offs_m)
        lse = lse * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), float("inf"), lse)                   # empty rows: p = 0
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale        # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            visible_t = (offs_n[:, None] <= offs_m[None, :] + diag + right) & (offs_n[:, None] >= offs_m[None, :] + diag - left)
            p_t = tl.where(visible_t, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)               # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkdv_kernel(Q, K, V, dOut, Lse, Delta, dK, dV, cu_seqlens_q, cu_seqlens_k,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                     qk_scale, sm_scale, window_left, window_right, group,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    k_start = tl.load(cu_seqlens_k + seq)
    seq_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    n0 = tl.program_id(0) * BLOCK_N
    if n0 >= seq_k:
        return
    q_start = tl.load(cu_seqlens_q + seq)
    seq_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    diag = seq_k - seq_q
    left = window_left
    if IS_CAUSAL:
        right = 0
    else:
        right = window_right

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
    k_rows = k_start.to(tl.int64) + offs_n[:, None]
    k = tl.load(K + k_rows * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + k_rows * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    first, first_full, end_full, end = _query_blocks(n0, seq_q, seq_k, diag, left, right, BLOCK_M, BLOCK_N)
    for g in range(0, group):  # every query head reading this KV head: GQA gradients summed in registers
        head = kv_head * group + g
        q_ptrs = (Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
                  + tl.arange(0, BLOCK_M)[:, None] * stride_qt + offs_d[None, :])
        do_ptrs = (dOut + q_start.to(tl.int64) * stride_dot + head * stride_doh
                   + tl.arange(0, BLOCK_M)[:, None] * stride_dot + offs_d[None, :])
        lse_ptr = Lse + head.to(tl.int64) * stride_lh + q_start
        delta_ptr = Delta + head.to(tl.int64) * stride_lh + q_start
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot,
                                 offs_n, offs_d, first, first_full, seq_q, diag, left, right, qk_scale,
                                 True, EVEN_D, HEAD_DIM, BLOCK_M, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot,
                                 offs_n, offs_d, first_full, end_full, seq_q, diag, left, right, qk_scale,
                                 False, EVEN_D, HEAD_DIM, BLOCK_M, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot,
                                 offs_n, offs_d, end_full, end, seq_q, diag, left, right, qk_scale,
                                 True, EVEN_D, HEAD_DIM, BLOCK_M, PRECISION)
    dk = dk * sm_scale
    tl.store(dK + k_rows * stride_dkt + kv_head * stride_dkh + offs_d[None, :], dk.to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(dV + k_rows * stride_dvt + kv_head * stride_dvh + offs_d[None, :], dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_d,
                  first, end, seq_k, diag, left, right, qk_scale,
                  MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    k_ptrs += (first * BLOCK_N).to(tl.int64) * stride_kt
    v_ptrs += (first * BLOCK_N).to(tl.int64) * stride_vt
    for block in range(first, end):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)                          # (BLOCK_N, BLOCK_D)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale          # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            visible = _visible(offs_m, offs_n, diag, left, right) & (offs_n[None, :] < seq_k)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq_kernel(Q, K, V, dOut, Lse, Delta, dQ, cu_seqlens_q, cu_seqlens_k,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh, stride_lh,
                   qk_scale, sm_scale, window_left, window_right, group,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    seq_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= seq_q:
        return
    k_start = tl.load(cu_seqlens_k + seq)
    seq_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    diag = seq_k - seq_q
    left = window_left
    if IS_CAUSAL:
        right = 0
    else:
        right = window_right
    kv_head = head // group

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_rows = q_start.to(tl.int64) + offs_m[:, None]
    q = tl.load(Q + q_rows * stride_qt + head * stride_qh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dOut + q_rows * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(Lse + head.to(tl.int64) * stride_lh + q_start + offs_m, mask=row_ok, other=float("inf"))
    lse = lse * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + head.to(tl.int64) * stride_lh + q_start + offs_m, mask=row_ok, other=0.0)
    k_ptrs = (K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
              + tl.arange(0, BLOCK_N)[:, None] * stride_kt + offs_d[None, :])
    v_ptrs = (V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
              + tl.arange(0, BLOCK_N)[:, None] * stride_vt + offs_d[None, :])
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first, first_full, end_full, end = _key_blocks(m0, seq_q, seq_k, diag, left, right, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_d,
                       first, first_full, seq_k, diag, left, right, qk_scale, True, EVEN_D, HEAD_DIM, BLOCK_N, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_d,
                       first_full, end_full, seq_k, diag, left, right, qk_scale, False, EVEN_D, HEAD_DIM, BLOCK_N,
                       PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_d,
                       end_full, end, seq_k, diag, left, right, qk_scale, True, EVEN_D, HEAD_DIM, BLOCK_N, PRECISION)
    dq = dq * sm_scale
    tl.store(dQ + q_rows * stride_dqt + head * stride_dqh + offs_d[None, :], dq.to(dQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- configs and launch

def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Hopper candidates in order of preference; _fits drops those whose tiles overflow shared memory or
# registers for the head dim and dtype. `regs` counts fp32 accumulator elements per thread.
_FWD_CONFIGS = [_config(128, 64, 8, 3), _config(128, 128, 8, 3), _config(64, 64, 4, 3), _config(64, 64, 8, 2),
                _config(64, 32, 4, 2), _config(32, 32, 4, 1)]
_DKDV_CONFIGS = [_config(32, 128, 8, 3), _config(64, 64, 8, 2), _config(32, 64, 4, 3), _config(32, 64, 8, 2),
                 _config(16, 32, 4, 1)]
_DQ_CONFIGS = [_config(128, 32, 8, 3), _config(64, 64, 4, 3), _config(64, 32, 8, 2), _config(32, 32, 4, 1)]
SMEM_BUDGET = 200 * 1024
_INTERPRET_META = {"fwd": {"BLOCK_M": 32, "BLOCK_N": 16}, "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32},
                   "dq": {"BLOCK_M": 32, "BLOCK_N": 16}}


def _fits(kind: str, config: triton.Config, block_d: int, elt: int) -> bool:
    bm, bn, warps, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages
    if kind == "fwd":    # q resident, k/v streamed; acc (BM, D)
        smem, regs = elt * (bm * block_d + stages * 2 * bn * block_d), bm * block_d
    elif kind == "dkdv":  # k/v resident, q/dO streamed; dk, dv (BN, D)
        smem, regs = elt * (2 * bn * block_d + stages * 2 * bm * block_d), 2 * bn * block_d
    else:                # q/dO resident, k/v streamed; dq (BM, D)
        smem, regs = elt * (2 * bm * block_d + stages * 2 * bn * block_d), bm * block_d
    return smem <= SMEM_BUDGET and regs <= 128 * 32 * warps


class Launcher:
    """One kernel launched with an autotuned, a first-fitting, or (interpreter) a fixed config.

    `fits(config, args)` drops configs whose tiles cannot fit; `key` names the arguments the
    autotuner (and the first-fit cache) keys on, besides the tensors' dtypes.
    """

    def __init__(self, fn, configs, key, fits, interpret_meta):
        self.fn, self.configs, self.key, self.fits, self.interpret_meta = fn, configs, key, fits, interpret_meta
        self.chosen: dict[tuple, triton.Config] = {}
        self.tuned = None
        if AUTOTUNE:
            self.tuned = triton.autotune(configs=configs, key=key,
                                         prune_configs_by={"early_config_prune": self._prune})(fn)

    def _prune(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return [c for c in configs if self.fits(c, args)] or [configs[-1]]

    def __call__(self, grid, **kwargs):
        if INTERPRET:
            self.fn[grid](**kwargs, **self.interpret_meta)
            return
        if self.tuned is not None:
            self.tuned[grid](**kwargs)
            return
        key = tuple(kwargs[k] for k in self.key) + tuple(
            str(v.dtype) for v in kwargs.values() if isinstance(v, torch.Tensor))
        if key in self.chosen:
            config = self.chosen[key]
            self.fn[grid](**kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            return
        first_error = None
        for config in self._prune(self.configs, {}, **kwargs):
            try:  # shared memory or registers the estimate missed fail at compile time: try the next config
                self.fn[grid](**kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            except _CONFIG_ERRORS as e:
                first_error = first_error or e
                continue
            self.chosen[key] = config
            return
        raise RuntimeError(f"no config of {getattr(self.fn, '__name__', 'kernel')} compiles for "
                           f"{dict(zip(self.key, key))}") from first_error


def _attention_launcher(kind, fn, configs):
    fits = lambda config, args: _fits(kind, config, args["BLOCK_D"], args["Q"].element_size())  # noqa: E731
    return Launcher(fn, configs, ["BLOCK_D", "IS_CAUSAL"], fits, _INTERPRET_META[kind])


_FWD = _attention_launcher("fwd", _fwd_kernel, _FWD_CONFIGS)
_DKDV = _attention_launcher("dkdv", _bwd_dkdv_kernel, _DKDV_CONFIGS)
_DQ = _attention_launcher("dq", _bwd_dq_kernel, _DQ_CONFIGS)


def _common(q, causal, window_left, window_right, group):
    head_dim = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    return dict(window_left=window_left, window_right=window_right, group=group, HEAD_DIM=head_dim,
                BLOCK_D=block_d, EVEN_D=head_dim == block_d, IS_CAUSAL=causal,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _forward(q, k, v, cu_q, cu_k, max_seqlen_q, softmax_scale, causal, window_left, window_right):
    total_q, num_heads, _ = q.shape
    batch = cu_q.numel() - 1
    out = torch.empty_like(q)                                                       # (total_q, Hq, D)
    lse = torch.empty(num_heads, total_q, dtype=torch.float32, device=q.device)     # (Hq, total_q)
    if total_q == 0 or max_seqlen_q == 0 or batch == 0:                             # nothing to launch
        return out.zero_(), lse.fill_(float("-inf"))
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), num_heads, batch)  # noqa: E731
    _FWD(grid, Q=q, K=k, V=v, Out=out, Lse=lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
         stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
         stride_vt=v.stride(0), stride_vh=v.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
         stride_lh=lse.stride(0), qk_scale=softmax_scale * LOG2E,
         **_common(q, causal, window_left, window_right, num_heads // k.shape[1]))
    return out, lse


def _backward(do, q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
              window_left, window_right):
    total_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    batch = cu_q.numel() - 1
    block_d = max(16, triton.next_power_of_2(head_dim))
    if total_q == 0 or max_seqlen_q == 0 or max_seqlen_k == 0 or batch == 0:     # no query sees a key
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = torch.empty_like(lse)                                                   # (Hq, total_q)
    _bwd_preprocess[(triton.cdiv(total_q, 64), num_heads)](
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0), total_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=64)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = _common(q, causal, window_left, window_right, num_heads // num_kv_heads)
    strides = dict(stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
                   stride_vt=v.stride(0), stride_vh=v.stride(1), stride_dot=do.stride(0), stride_doh=do.stride(1),
                   stride_lh=lse.stride(0), qk_scale=softmax_scale * LOG2E, sm_scale=softmax_scale)
    _DKDV(lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), num_kv_heads, batch),
          Q=q, K=k, V=v, dOut=do, Lse=lse, Delta=delta, dK=dk, dV=dv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
          stride_dkt=dk.stride(0), stride_dkh=dk.stride(1), stride_dvt=dv.stride(0), stride_dvh=dv.stride(1),
          **strides, **common)
    _DQ(lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), num_heads, batch),
        Q=q, K=k, V=v, dOut=do, Lse=lse, Delta=delta, dQ=dq, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        stride_dqt=dq.stride(0), stride_dqh=dq.stride(1), **strides, **common)
    return dq, dk, dv


class _FlashAttnVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
                window_right):
        with _on_device(q):
            out, lse = _forward(q, k, v, cu_q, cu_k, max_seqlen_q, softmax_scale, causal, window_left, window_right)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        with _on_device(q):
            dq, dk, dv = _backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None


class _on_device:
    """Launch on the tensor's GPU rather than the current one (no-op on CPU / interpreter)."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.cuda.device(t.device) if t.is_cuda else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the Triton backend takes float16, bfloat16 or float32")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride(-1) == 1), got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    head_dim = q.shape[2]
    if k.shape[2] != head_dim or v.shape[2] != head_dim:
        raise ValueError(f"head dims differ: q {head_dim}, k {k.shape[2]}, v {v.shape[2]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is unsupported: the Triton backend takes 1..{MAX_HEAD_DIM}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in tokens and heads")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
            raise ValueError(f"{name} must be a 1-D int32 tensor on {q.device}, got {cu.dtype} "
                             f"{tuple(cu.shape)} on {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 1:
        raise ValueError(f"cu_seqlens_q ({cu_seqlens_q.numel()}) and cu_seqlens_k ({cu_seqlens_k.numel()}) "
                         "must both have batch + 1 entries")
    if cu_seqlens_q.numel() - 1 > 65535:
        raise ValueError(f"batch {cu_seqlens_q.numel() - 1} exceeds the 65535 sequences one launch can take")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"window_size must be (left, right) with each >= -1 (-1 = unbounded), got {window_size}")
    if not (q.is_cuda or INTERPRET):
        raise ValueError(f"the Triton backend needs CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 "
                         "before importing triton to run it on CPU")


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                     causal=False, window_size=(-1, -1), return_lse=False):
    """FlashAttention-2 over packed sequences, differentiable in q, k and v.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D) with Hq % Hkv == 0 and D <= 256; cu_seqlens_q/_k:
    (B + 1,) int32; max_seqlen_q/_k: the longest query / key length (sizes the grid).
    Returns out (total_q, Hq, D) in q's dtype and, with return_lse, lse (Hq, total_q) fp32 (natural log).
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = (UNBOUNDED if w < 0 else min(int(w), UNBOUNDED) for w in window_size)
    if causal:
        right = 0
    out, lse = _FlashAttnVarlen.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                      scale, bool(causal), left, right)
    return (out, lse) if return_lse else out


__all__ = ["Launcher", "MAX_HEAD_DIM", "varlen_attention"]
