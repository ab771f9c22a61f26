"""Triton paged KV write: scatter new tokens' K and V into the paged caches through a slot mapping.

Layout and conventions are those of `paged.py` (`write_kv_torch`, the PyTorch version with the same
signature, which also bounds-checks the slots): caches [num_blocks, block_size, Hkv, D], slot =
block_id * block_size + offset, slot < 0 skips the token. Re-exported by `triton_decode.py`.
"""

from __future__ import annotations

from contextlib import nullcontext as _nullcontext

import torch
import triton
import triton.language as tl

from longreach.attention.paged_checks import check_write_inputs
from longreach.attention.triton_launch import require_device


@triton.jit
def _write_kv_kernel(
    K,
    V,
    KCache,
    VCache,
    SlotMapping,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SlotMapping + token)
    if slot < 0:
        return
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(
        KCache + block * stride_kcb + offset * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :],
        k.to(KCache.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        VCache + block * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :],
        v.to(VCache.dtype.element_ty),
        mask=mask,
    )


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """Scatter k, v (T, Hkv, D) into [num_blocks, block_size, Hkv, D] caches at slot_mapping (T,) int64
    (slot = block_id * block_size + offset; slot < 0 skips the token). In place; no bounds check
    on the device (the PyTorch version checks)."""
    num_tokens, num_kv_heads, head_dim, block_size = check_write_inputs(k, v, k_cache, v_cache, slot_mapping)
    require_device(k)
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"{name} must be contiguous in its last dim (stride(-1) == 1), got strides {t.stride()}"
            )
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 8192 // block_d))
    with torch.cuda.device(k.device) if k.is_cuda else _nullcontext():
        _write_kv_kernel[(num_tokens, triton.cdiv(num_kv_heads, block_h))](
            k,
            v,
            k_cache,
            v_cache,
            slot_mapping,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            num_kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_H=block_h,
            PAGE_SIZE=block_size,
            num_warps=4,
        )


__all__ = ["write_kv"]
