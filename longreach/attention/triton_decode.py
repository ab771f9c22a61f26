"""Triton paged decode attention (Flash-Decoding split-K); the paged KV write is in `triton_write.py`.

Flash-Decoding (Dao et al., 2023): with one query token per sequence there is too little work per
(sequence, head) to fill the GPU, so the context is split into chunks processed in parallel, each
writing a partial output and its log-sum-exp, and a second kernel merges them
(out = sum_s exp(lse_s - lse) * out_s). Query heads sharing a KV head are packed into one tile
(GQA packing, as in FlashInfer and vLLM's Triton decode), so each K/V token is read once per group.

Layout and conventions are those of `paged.py` (the PyTorch reference with the same signature):
caches [num_blocks, block_size, Hkv, D], block_table (B, max_blocks) int32, cache_seqlens (B,) int32.
int8 caches are dequantized in the kernel: each K/V tile is scaled by its tokens' scales
([num_blocks, block_size, Hkv], read through the same block table) in fp32 and cast to q's dtype
before the products, so only int8 codes and their scales cross memory. fp8 e4m3 caches
(torch.float8_e4m3fn, loaded as tl.float8e4nv) take the same KV_INT8 path: code -> fp32 -> times scale;
the dispatcher in `paged.py` sends them here on GPUs of compute capability 8.9+ only.
Tokens are gathered one by one through the block table, so any block_size >= 1 works (powers of
two make the index arithmetic shifts). No host synchronisation: splits are sized from the block
table's width, and splits past a sequence's end write an empty partial.
"""

from __future__ import annotations

import math
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from longreach.attention.paged_checks import check_decode_inputs
from longreach.attention.triton_launch import INTERPRET as INTERPRET
from longreach.attention.triton_launch import LOG2E, SMEM_BUDGET, UNBOUNDED, Launcher
from longreach.attention.triton_launch import require_device as _require_device
from longreach.attention.triton_write import write_kv

MAX_SPLITS = 64


@triton.jit(do_not_specialize=["window_left", "split_len", "group"])
def _decode_split_kernel(
    Q,
    K,
    V,
    KScale,
    VScale,
    BlockTable,
    SeqLens,
    OutPart,
    LsePart,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ksb,
    stride_kss,
    stride_ksh,
    stride_vsb,
    stride_vss,
    stride_vsh,
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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    KV_INT8: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + seq)
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
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n in range(lo, hi, BLOCK_N):
        pos = n + tl.arange(0, BLOCK_N)
        ok = pos < hi
        block = tl.load(table + pos // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
        offset = pos % PAGE_SIZE
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(
            K
            + block[:, None] * stride_kb
            + offset[:, None] * stride_ks
            + kv_head * stride_kh
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        v = tl.load(
            V
            + block[:, None] * stride_vb
            + offset[:, None] * stride_vs
            + kv_head * stride_vh
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if KV_INT8:  # code * per-token scale
            k_scale = tl.load(
                KScale + block * stride_ksb + offset * stride_kss + kv_head * stride_ksh, mask=ok, other=0.0
            )  # (BLOCK_N,)
            v_scale = tl.load(
                VScale + block * stride_vsb + offset * stride_vss + kv_head * stride_vsh, mask=ok, other=0.0
            )
            k = (k.to(tl.float32) * k_scale.to(tl.float32)[:, None]).to(q.dtype)
            v = (v.to(tl.float32) * v_scale.to(tl.float32)[:, None]).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_H, BLOCK_N), log2 units
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: pos n < hi is valid
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    is_empty = l_i == 0.0
    l_safe = tl.where(is_empty, 1.0, l_i)
    part = acc / l_safe[:, None]
    lse2 = tl.where(is_empty, float("-inf"), m_i + tl.math.log2(l_safe))  # log2 units
    row = seq.to(tl.int64) * stride_pb + heads[:, None] * stride_ph + split * stride_ps
    tl.store(OutPart + row + offs_d[None, :], part, mask=h_ok[:, None] & d_ok[None, :])
    tl.store(LsePart + seq.to(tl.int64) * stride_lb + heads * stride_lh + split, lse2, mask=h_ok)


@triton.jit
def _decode_merge_kernel(
    OutPart,
    LsePart,
    Out,
    Lse,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    stride_fb,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse = tl.load(
        LsePart + seq.to(tl.int64) * stride_lb + head * stride_lh + offs_s, mask=s_ok, other=float("-inf")
    )  # (BLOCK_S,) log2 units
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)  # empty splits weigh 0
    total = tl.sum(w, 0)
    parts = tl.load(
        OutPart
        + seq.to(tl.int64) * stride_pb
        + head * stride_ph
        + offs_s[:, None] * stride_ps
        + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    is_empty = total == 0.0
    total_safe = tl.where(is_empty, 1.0, total)
    out = tl.sum(parts * w[:, None], 0) / total_safe  # (BLOCK_D,)
    out_lse = tl.where(is_empty, float("-inf"), (m + tl.math.log2(total_safe)) / 1.4426950408889634)
    tl.store(
        Out + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
        out.to(Out.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )
    tl.store(Lse + seq.to(tl.int64) * stride_fb + head, out_lse)


# ----------------------------------------------------------------------------- launch


def _config(block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Hopper candidates, best first; decode is memory bound, so deep pipelines of gathered K/V loads.
_SPLIT_CONFIGS = [
    _config(64, 4, 3),
    _config(128, 4, 2),
    _config(64, 4, 4),
    _config(128, 8, 3),
    _config(32, 4, 2),
    _config(16, 4, 1),
]


def _split_fits(config, args):
    tile = 2 * config.kwargs["BLOCK_N"] * args["BLOCK_D"]  # a K and a V tile
    smem = args["K"].element_size() * config.num_stages * tile
    if args["KV_INT8"]:  # + the dequantized tiles
        smem += args["Q"].element_size() * tile
    return smem <= SMEM_BUDGET


_SPLIT = Launcher(
    _decode_split_kernel,
    _SPLIT_CONFIGS,
    ["BLOCK_D", "BLOCK_H", "PAGE_SIZE", "KV_INT8"],
    _split_fits,
    {"BLOCK_N": 16},
)
_SM_COUNT: dict[int, int] = {}


def _num_splits(batch, num_kv_heads, span, device):
    """Enough (sequence, KV head, split) programs for several waves, each split >= 256 tokens."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        sms = _SM_COUNT[index]
    else:
        sms = 4
    want = triton.cdiv(8 * sms, max(1, batch * num_kv_heads))
    return max(1, min(MAX_SPLITS, want, triton.cdiv(span, 256)))


def _check_config(config):
    """A pinned split-kernel config: a triton.Config of BLOCK_N alone, a power of two >= 16 (tl.dot's smallest)."""
    if not isinstance(config, triton.Config) or set(config.kwargs) != {"BLOCK_N"}:
        raise ValueError(f"config must be a triton.Config of BLOCK_N, got {config!r}")
    block_n = config.kwargs["BLOCK_N"]
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"config BLOCK_N={block_n} must be a power of two >= 16")


@dataclass(frozen=True)
class _SplitPlan:
    """What the split and merge kernels take besides tensors, fixed on the host at the call."""

    softmax_scale: float
    window_left: int  # window_size[0]; negative: unbounded
    split_len: int  # keys per split, a multiple of 16 (of 256 when the span is long enough)
    num_splits: int  # splits that cover the span (may be fewer than asked for once rounded to split_len)
    block_d: int  # the head dim padded to a power of two >= 16 (tl.dot's smallest)
    config: triton.Config | None  # a pinned split-kernel tile, else the autotuner's choice


def _check_kernel_inputs(q, block_table, cache_seqlens, config):
    """What the kernels need beyond the contract `check_decode_inputs` checks: a device to run on,
    unit-stride index tensors (read as raw pointers) and a well-formed pinned config."""
    _require_device(q)
    if block_table.stride(-1) != 1 or cache_seqlens.stride(-1) != 1:
        raise ValueError("block_table and cache_seqlens must be contiguous in their last dim")
    if config is not None:
        _check_config(config)


def _plan_splits(q, num_kv_heads, span, num_splits, softmax_scale, window_left, config) -> _SplitPlan:
    """Cut the `span` keys any one query can see into splits: `num_splits` if given (1..64), else enough
    for several waves of programs; split lengths are rounded up to whole granules of 16 or 256 tokens."""
    batch, _, head_dim = q.shape
    if num_splits is None:
        num_splits = _num_splits(batch, num_kv_heads, span, q.device)
    elif not 1 <= int(num_splits) <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits} is outside 1..{MAX_SPLITS}")
    granule = 256 if span >= 256 * num_splits else 16
    split_len = triton.cdiv(triton.cdiv(span, int(num_splits)), granule) * granule
    return _SplitPlan(
        softmax_scale=softmax_scale,
        window_left=window_left,
        split_len=split_len,
        num_splits=triton.cdiv(span, split_len),
        block_d=max(16, triton.next_power_of_2(head_dim)),
        config=config,
    )


def paged_decode_attention(
    q,
    k_cache,
    v_cache,
    block_table,
    cache_seqlens,
    softmax_scale=None,
    window_size=(-1, -1),
    return_lse=False,
    num_splits=None,
    k_scale=None,
    v_scale=None,
    config=None,
):
    """Flash-Decoding over a paged KV cache; same contract as `paged.paged_decode_attention_torch`.

    q: (B, Hq, D); k_cache, v_cache: [num_blocks, block_size, Hkv, D], int8 with k_scale, v_scale
    [num_blocks, block_size, Hkv] (dequantized in the kernel); block_table: (B, max_blocks) int32;
    cache_seqlens: (B,) int32. num_splits (1..64) overrides the split heuristic; config (a triton.Config
    of BLOCK_N) pins the split kernel's tile instead of the autotuner's choice (the tests run every one).
    Returns out (B, Hq, D) in q's dtype and, with return_lse, lse (B, Hq) fp32 (natural log).
    Every (sequence, head) of out and lse is written by the merge kernel, an empty sequence's with 0 and -inf.
    """
    batch, num_heads, num_kv_heads, head_dim, block_size = check_decode_inputs(
        q, k_cache, v_cache, block_table, cache_seqlens, window_size, k_scale, v_scale
    )
    _check_kernel_inputs(q, block_table, cache_seqlens, config)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    left = int(window_size[0])
    capacity = block_table.shape[1] * block_size
    span = capacity if left < 0 else min(capacity, left + 1)  # keys any one query can see
    out = torch.empty_like(q)  # (B, Hq, D)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device)  # (B, Hq)
    if batch == 0 or span == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out
    plan = _plan_splits(q, num_kv_heads, span, num_splits, scale, left, config)
    out_part = torch.empty(batch, num_heads, plan.num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, num_heads, plan.num_splits, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        _launch_split(
            q, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, out_part, lse_part, plan
        )
        _launch_merge(out_part, lse_part, out, lse, plan)
    return (out, lse) if return_lse else out


def _cache_strides(k_cache, v_cache, k_scale, v_scale) -> dict:
    """The split kernel's strides of the K/V caches and their scales (block, slot in block, KV head)."""
    return dict(
        stride_kb=k_cache.stride(0),
        stride_ks=k_cache.stride(1),
        stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0),
        stride_vs=v_cache.stride(1),
        stride_vh=v_cache.stride(2),
        stride_ksb=k_scale.stride(0),
        stride_kss=k_scale.stride(1),
        stride_ksh=k_scale.stride(2),
        stride_vsb=v_scale.stride(0),
        stride_vss=v_scale.stride(1),
        stride_vsh=v_scale.stride(2),
    )


def _launch_split(
    q, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, out_part, lse_part, plan: _SplitPlan
):
    """The split kernel over (sequence, KV head, split): partial outputs and log2-domain lse's of each split."""
    batch = q.shape[0]
    num_kv_heads = k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    quantized = k_scale is not None
    k_scale, v_scale = (k_scale, v_scale) if quantized else (k_cache, v_cache)  # unread without KV_INT8
    left = plan.window_left
    _SPLIT(
        (batch, num_kv_heads, plan.num_splits),
        config=plan.config,
        Q=q,
        K=k_cache,
        V=v_cache,
        KScale=k_scale,
        VScale=v_scale,
        BlockTable=block_table,
        SeqLens=cache_seqlens,
        OutPart=out_part,
        LsePart=lse_part,
        stride_qb=q.stride(0),
        stride_qh=q.stride(1),
        **_cache_strides(k_cache, v_cache, k_scale, v_scale),
        stride_bt=block_table.stride(0),
        stride_pb=out_part.stride(0),
        stride_ph=out_part.stride(1),
        stride_ps=out_part.stride(2),
        stride_lb=lse_part.stride(0),
        stride_lh=lse_part.stride(1),
        qk_scale=plan.softmax_scale * LOG2E,
        window_left=UNBOUNDED if left < 0 else min(left, UNBOUNDED),
        split_len=plan.split_len,
        group=group,
        HEAD_DIM=q.shape[2],
        BLOCK_D=plan.block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        PAGE_SIZE=k_cache.shape[1],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_INT8=quantized,
    )


def _launch_merge(out_part, lse_part, out, lse, plan: _SplitPlan):
    """The merge kernel over (sequence, query head): out = sum_s exp(lse_s - lse) * out_s, and lse itself."""
    batch, num_heads, _, head_dim = out_part.shape
    _decode_merge_kernel[(batch, num_heads)](
        out_part,
        lse_part,
        out,
        lse,
        out_part.stride(0),
        out_part.stride(1),
        out_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        plan.num_splits,
        HEAD_DIM=head_dim,
        BLOCK_D=plan.block_d,
        BLOCK_S=max(2, triton.next_power_of_2(plan.num_splits)),
    )


__all__ = ["MAX_SPLITS", "paged_decode_attention", "write_kv"]
