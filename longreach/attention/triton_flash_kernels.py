"""The Triton kernels of `triton_flash`: FlashAttention-2 forward and backward over packed sequences.

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

A block-sparse layout (`masks.BlockSparseLayout`, indexed by positions within each sequence and ANDed
with the band) arrives as `Cells`, a (num_q_blocks, num_k_blocks) int32 table: EMPTY, FULL, or the
index of the partial block's (LAYOUT_BLOCK, LAYOUT_BLOCK) int8 token tile in `Tiles`. Kernel tiles
divide layout blocks, so each lies in one cell: a tile in an EMPTY cell is skipped (nothing loaded,
nothing computed), one in a partial cell is masked with its slice of the cell's tile. LAYOUT_BLOCK = 0
(no layout) compiles none of this.

Head dims up to 256 are padded to the next power of two (BLOCK_D) with masked loads. fp32 uses
`input_precision="ieee"` so no TF32 rounding creeps in.
"""

from __future__ import annotations

import triton
import triton.language as tl

NO_SPECIALIZE = ["window_left", "window_right", "group", "total_q", "stride_cells"]
EMPTY = tl.constexpr(-2)  # layout cells: no visible pair
FULL = tl.constexpr(-1)  # every pair visible; a cell >= 0 indexes its tile


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
    return (offs_n[None, :] <= offs_m[:, None] + diag + right) & (
        offs_n[None, :] >= offs_m[:, None] + diag - left
    )


# ----------------------------------------------------------------------------- block-sparse layout


@triton.jit
def _tile_mask(Tiles, cell, rows, cols, LAYOUT_BLOCK: tl.constexpr):
    # bool, shaped as rows and cols broadcast (query and key positions in the sequence): the cell's tile there
    offs = (rows % LAYOUT_BLOCK) * LAYOUT_BLOCK + cols % LAYOUT_BLOCK
    return tl.load(Tiles + cell.to(tl.int64) * (LAYOUT_BLOCK * LAYOUT_BLOCK) + offs) != 0


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    stride_kt,
    stride_vt,
    m0,
    offs_m,
    offs_d,
    first,
    end,
    seq_k,
    diag,
    left,
    right,
    qk_scale,
    Cells,
    Tiles,
    stride_cells,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr,
):
    k_ptrs += (first * BLOCK_N).to(tl.int64) * stride_kt
    v_ptrs += (first * BLOCK_N).to(tl.int64) * stride_vt
    for block in range(first, end):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        cell = FULL  # without a layout, `cell != EMPTY` below is a compile-time True
        if LAYOUT_BLOCK > 0:
            cell = tl.load(Cells + (m0 // LAYOUT_BLOCK) * stride_cells + block * BLOCK_N // LAYOUT_BLOCK)
        if cell != EMPTY:  # tiles of empty layout cells are skipped
            if MASKED:
                kv_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
                k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
                v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            elif EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
            if MASKED:
                visible = _visible(offs_m, offs_n, diag, left, right) & (offs_n[None, :] < seq_k)
                s = tl.where(visible, s, float("-inf"))
            if LAYOUT_BLOCK > 0:
                if cell >= 0:  # a partial layout cell
                    tile = _tile_mask(Tiles, cell, offs_m[:, None], offs_n[None, :], LAYOUT_BLOCK)
                    s = tl.where(tile, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED or LAYOUT_BLOCK > 0:
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # row still empty: p = 0, max stays -inf
            else:
                m_ref = m_new
            alpha = tl.math.exp2(m_i - m_ref)
            p = tl.math.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    cu_seqlens_q,
    cu_seqlens_k,
    Cells,
    Tiles,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lh,
    stride_cells,
    qk_scale,
    window_left,
    window_right,
    group,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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
    q_rows = q_start.to(tl.int64) + offs_m[:, None]  # int64: long documents
    q_ptrs = Q + q_rows * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_M, BLOCK_D)
    k_ptrs = (
        K
        + k_start.to(tl.int64) * stride_kt
        + kv_head * stride_kh
        + tl.arange(0, BLOCK_N)[:, None] * stride_kt
        + offs_d[None, :]
    )
    v_ptrs = (
        V
        + k_start.to(tl.int64) * stride_vt
        + kv_head * stride_vh
        + tl.arange(0, BLOCK_N)[:, None] * stride_vt
        + offs_d[None, :]
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first, first_full, end_full, end = _key_blocks(m0, seq_q, seq_k, diag, left, right, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        m0,
        offs_m,
        offs_d,
        first,
        first_full,
        seq_k,
        diag,
        left,
        right,
        qk_scale,
        Cells,
        Tiles,
        stride_cells,
        True,
        EVEN_D,
        HEAD_DIM,
        BLOCK_N,
        PRECISION,
        LAYOUT_BLOCK,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        m0,
        offs_m,
        offs_d,
        first_full,
        end_full,
        seq_k,
        diag,
        left,
        right,
        qk_scale,
        Cells,
        Tiles,
        stride_cells,
        False,
        EVEN_D,
        HEAD_DIM,
        BLOCK_N,
        PRECISION,
        LAYOUT_BLOCK,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        m0,
        offs_m,
        offs_d,
        end_full,
        end,
        seq_k,
        diag,
        left,
        right,
        qk_scale,
        Cells,
        Tiles,
        stride_cells,
        True,
        EVEN_D,
        HEAD_DIM,
        BLOCK_N,
        PRECISION,
        LAYOUT_BLOCK,
    )

    is_empty = l_i == 0.0
    l_safe = tl.where(is_empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(is_empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    o_ptrs = Out + q_rows * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + head.to(tl.int64) * stride_lh + q_start + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def bwd_preprocess(
    Out,
    dOut,
    Delta,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_dh,
    total_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    head = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < total_q) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(Out + head * stride_oh + rows * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dOut + head * stride_doh + rows * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(Delta + head.to(tl.int64) * stride_dh + offs_m, delta, mask=offs_m < total_q)


@triton.jit
def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    lse_ptr,
    delta_ptr,
    stride_qt,
    stride_dot,
    n0,
    offs_n,
    offs_d,
    first,
    end,
    seq_q,
    diag,
    left,
    right,
    qk_scale,
    Cells,
    Tiles,
    stride_cells,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr,
):
    q_ptrs += (first * BLOCK_M).to(tl.int64) * stride_qt
    do_ptrs += (first * BLOCK_M).to(tl.int64) * stride_dot
    for block in range(first, end):
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        cell = FULL
        if LAYOUT_BLOCK > 0:
            cell = tl.load(Cells + (block * BLOCK_M // LAYOUT_BLOCK) * stride_cells + n0 // LAYOUT_BLOCK)
        if cell != EMPTY:  # as in _fwd_inner
            if MASKED:  # rows past seq_q load lse = +inf, so p = 0 and they add nothing
                row_ok = offs_m < seq_q
                mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
                q = tl.load(q_ptrs, mask=mask, other=0.0)  # (BLOCK_M, BLOCK_D)
                do = tl.load(do_ptrs, mask=mask, other=0.0)
                lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=float("inf"))
                delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
            else:  # wholly visible blocks lie inside the sequence
                if EVEN_D:
                    q = tl.load(q_ptrs)
                    do = tl.load(do_ptrs)
                else:
                    q = tl.load(q_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                    do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                lse = tl.load(lse_ptr + offs_m)
                delta = tl.load(delta_ptr + offs_m)
            lse = lse * 1.4426950408889634
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            p_t = tl.math.exp2(s_t - lse[None, :])
            if MASKED:
                visible_t = (offs_n[:, None] <= offs_m[None, :] + diag + right) & (
                    offs_n[:, None] >= offs_m[None, :] + diag - left
                )
                p_t = tl.where(visible_t, p_t, 0.0)
            if LAYOUT_BLOCK > 0:
                if cell >= 0:  # a partial layout cell, read transposed
                    p_t = tl.where(
                        _tile_mask(Tiles, cell, offs_m[None, :], offs_n[:, None], LAYOUT_BLOCK), p_t, 0.0
                    )
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def bwd_dkdv_kernel(
    Q,
    K,
    V,
    dOut,
    Lse,
    Delta,
    dK,
    dV,
    cu_seqlens_q,
    cu_seqlens_k,
    Cells,
    Tiles,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_lh,
    stride_cells,
    qk_scale,
    sm_scale,
    window_left,
    window_right,
    group,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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
        q_ptrs = (
            Q
            + q_start.to(tl.int64) * stride_qt
            + head * stride_qh
            + tl.arange(0, BLOCK_M)[:, None] * stride_qt
            + offs_d[None, :]
        )
        do_ptrs = (
            dOut
            + q_start.to(tl.int64) * stride_dot
            + head * stride_doh
            + tl.arange(0, BLOCK_M)[:, None] * stride_dot
            + offs_d[None, :]
        )
        lse_ptr = Lse + head.to(tl.int64) * stride_lh + q_start
        delta_ptr = Delta + head.to(tl.int64) * stride_lh + q_start
        dk, dv = _bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_ptrs,
            do_ptrs,
            lse_ptr,
            delta_ptr,
            stride_qt,
            stride_dot,
            n0,
            offs_n,
            offs_d,
            first,
            first_full,
            seq_q,
            diag,
            left,
            right,
            qk_scale,
            Cells,
            Tiles,
            stride_cells,
            True,
            EVEN_D,
            HEAD_DIM,
            BLOCK_M,
            PRECISION,
            LAYOUT_BLOCK,
        )
        dk, dv = _bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_ptrs,
            do_ptrs,
            lse_ptr,
            delta_ptr,
            stride_qt,
            stride_dot,
            n0,
            offs_n,
            offs_d,
            first_full,
            end_full,
            seq_q,
            diag,
            left,
            right,
            qk_scale,
            Cells,
            Tiles,
            stride_cells,
            False,
            EVEN_D,
            HEAD_DIM,
            BLOCK_M,
            PRECISION,
            LAYOUT_BLOCK,
        )
        dk, dv = _bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_ptrs,
            do_ptrs,
            lse_ptr,
            delta_ptr,
            stride_qt,
            stride_dot,
            n0,
            offs_n,
            offs_d,
            end_full,
            end,
            seq_q,
            diag,
            left,
            right,
            qk_scale,
            Cells,
            Tiles,
            stride_cells,
            True,
            EVEN_D,
            HEAD_DIM,
            BLOCK_M,
            PRECISION,
            LAYOUT_BLOCK,
        )
    dk = dk * sm_scale
    tl.store(
        dK + k_rows * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
        dk.to(dK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        dV + k_rows * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
        dv.to(dV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_ptrs,
    v_ptrs,
    stride_kt,
    stride_vt,
    m0,
    offs_m,
    offs_d,
    first,
    end,
    seq_k,
    diag,
    left,
    right,
    qk_scale,
    Cells,
    Tiles,
    stride_cells,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr,
):
    k_ptrs += (first * BLOCK_N).to(tl.int64) * stride_kt
    v_ptrs += (first * BLOCK_N).to(tl.int64) * stride_vt
    for block in range(first, end):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        cell = FULL
        if LAYOUT_BLOCK > 0:
            cell = tl.load(Cells + (m0 // LAYOUT_BLOCK) * stride_cells + block * BLOCK_N // LAYOUT_BLOCK)
        if cell != EMPTY:  # as in _fwd_inner
            if MASKED:
                kv_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
                k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
                v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            elif EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.math.exp2(s - lse[:, None])
            if MASKED:
                visible = _visible(offs_m, offs_n, diag, left, right) & (offs_n[None, :] < seq_k)
                p = tl.where(visible, p, 0.0)
            if LAYOUT_BLOCK > 0:
                if cell >= 0:  # a partial layout cell
                    p = tl.where(
                        _tile_mask(Tiles, cell, offs_m[:, None], offs_n[None, :], LAYOUT_BLOCK), p, 0.0
                    )
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def bwd_dq_kernel(
    Q,
    K,
    V,
    dOut,
    Lse,
    Delta,
    dQ,
    cu_seqlens_q,
    cu_seqlens_k,
    Cells,
    Tiles,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_lh,
    stride_cells,
    qk_scale,
    sm_scale,
    window_left,
    window_right,
    group,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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
    k_ptrs = (
        K
        + k_start.to(tl.int64) * stride_kt
        + kv_head * stride_kh
        + tl.arange(0, BLOCK_N)[:, None] * stride_kt
        + offs_d[None, :]
    )
    v_ptrs = (
        V
        + k_start.to(tl.int64) * stride_vt
        + kv_head * stride_vh
        + tl.arange(0, BLOCK_N)[:, None] * stride_vt
        + offs_d[None, :]
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first, first_full, end_full, end = _key_blocks(m0, seq_q, seq_k, diag, left, right, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        m0,
        offs_m,
        offs_d,
        first,
        first_full,
        seq_k,
        diag,
        left,
        right,
        qk_scale,
        Cells,
        Tiles,
        stride_cells,
        True,
        EVEN_D,
        HEAD_DIM,
        BLOCK_N,
        PRECISION,
        LAYOUT_BLOCK,
    )
    dq = _bwd_dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        m0,
        offs_m,
        offs_d,
        first_full,
        end_full,
        seq_k,
        diag,
        left,
        right,
        qk_scale,
        Cells,
        Tiles,
        stride_cells,
        False,
        EVEN_D,
        HEAD_DIM,
        BLOCK_N,
        PRECISION,
        LAYOUT_BLOCK,
    )
    dq = _bwd_dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        m0,
        offs_m,
        offs_d,
        end_full,
        end,
        seq_k,
        diag,
        left,
        right,
        qk_scale,
        Cells,
        Tiles,
        stride_cells,
        True,
        EVEN_D,
        HEAD_DIM,
        BLOCK_N,
        PRECISION,
        LAYOUT_BLOCK,
    )
    dq = dq * sm_scale
    tl.store(
        dQ + q_rows * stride_dqt + head * stride_dqh + offs_d[None, :], dq.to(dQ.dtype.element_ty), mask=mask
    )
