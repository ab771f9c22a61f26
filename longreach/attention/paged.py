"""Decode attention over a paged KV cache, and the write that fills it.

The cache layout is vLLM's PagedAttention / FlashAttention's `flash_attn_with_kvcache`: per layer
`k_cache, v_cache: [num_blocks, block_size, Hkv, D]`; token t of sequence b lives in block
`block_table[b, t // block_size]` at offset `t % block_size`; `cache_seqlens[b]` tokens are valid.
Decode has one query per sequence, the newest token, so the causal mask lets it see the whole
cache; a window (left, right) keeps the last left + 1 keys (right has nothing to cut). GQA: query
head h reads KV head h // (Hq // Hkv). int8 caches (`kvcache.quant.Int8KV`) come with `k_scale, v_scale:
[num_blocks, block_size, Hkv]`, one scale per (token, KV head): a key or value is `code * scale`,
dequantized where it is read (in the Triton kernel on CUDA).

`paged_decode_attention` / `write_kv` dispatch to the Triton kernels (Flash-Decoding split-K, see
`triton_decode.py`) for CUDA tensors when Triton imports, and to the PyTorch versions here
otherwise. The PyTorch versions take any block size and are the reference the kernels are tested
against.
"""
from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check_decode_inputs(q, k_cache, v_cache, block_table, cache_seqlens, window_size=(-1, -1),
                        k_scale=None, v_scale=None):
    """Validate decode inputs (int8 caches with both scales); returns (batch, Hq, Hkv, D, block_size)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, heads, head_dim), got shape {tuple(q.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, kv_heads, head_dim], got {tuple(cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    quantized = _check_scales(q, k_cache, v_cache, k_scale, v_scale)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in SUPPORTED_DTYPES and not (quantized and name != "q"):
            raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride(-1) == 1), got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not quantized and not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"q head dim {head_dim} != cache head dim {cache_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is unsupported: expected 1..{MAX_HEAD_DIM}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be (batch={batch}, max_blocks) int32, got {tuple(block_table.shape)} "
                         f"{block_table.dtype}")
    if cache_seqlens.shape != (batch,) or cache_seqlens.dtype != torch.int32:
        raise ValueError(f"cache_seqlens must be (batch={batch},) int32, got {tuple(cache_seqlens.shape)} "
                         f"{cache_seqlens.dtype}")
    for name, t in (("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"window_size must be (left, right) with each >= -1 (-1 = unbounded), got {window_size}")
    return batch, num_heads, num_kv_heads, head_dim, block_size


def _check_scales(q, k_cache, v_cache, k_scale, v_scale) -> bool:
    """Validate int8 caches' scales (both or neither, and only with int8 caches); True when quantized."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale, or neither")
    int8 = (k_cache.dtype == torch.int8, v_cache.dtype == torch.int8)
    if k_scale is None:
        if any(int8):
            raise ValueError(f"int8 caches need k_scale and v_scale (got k_cache {k_cache.dtype}, "
                             f"v_cache {v_cache.dtype} without scales)")
        return False
    if not all(int8):
        raise ValueError(f"k_scale and v_scale go with int8 caches, got k_cache {k_cache.dtype}, "
                         f"v_cache {v_cache.dtype}")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t.shape != k_cache.shape[:3]:
            raise ValueError(f"{name} must be [num_blocks, block_size, kv_heads] = {tuple(k_cache.shape[:3])}, "
                             f"got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    return True


def check_write_inputs(k, v, k_cache, v_cache, slot_mapping):
    """Validate write_kv inputs; returns (num_tokens, Hkv, D, block_size)."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be (tokens, kv_heads, head_dim), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"caches must both be [num_blocks, block_size, kv_heads, head_dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k's (kv_heads, head_dim) {tuple(k.shape[1:])} != cache's {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be ({k.shape[0]},) int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}")
    return k.shape[0], k.shape[1], k.shape[2], k_cache.shape[1]


def paged_decode_attention_torch(q, k_cache, v_cache, block_table, cache_seqlens, softmax_scale=None,
                                 window_size=(-1, -1), return_lse=False, k_scale=None, v_scale=None):
    """One query token per sequence against its paged K/V, in PyTorch (fp32 math).

    q: (B, Hq, D); k_cache, v_cache: [num_blocks, block_size, Hkv, D] (any block_size >= 1), int8 with
    k_scale, v_scale [num_blocks, block_size, Hkv]; block_table: (B, max_blocks) int32; cache_seqlens: (B,) int32.
    Returns out (B, Hq, D) in q's dtype and, with return_lse, lse (B, Hq) fp32 (natural log;
    -inf and a zero output for an empty sequence).
    """
    batch, num_heads, num_kv_heads, head_dim, block_size = check_decode_inputs(
        q, k_cache, v_cache, block_table, cache_seqlens, window_size, k_scale, v_scale)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    left = int(window_size[0])
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    lse = torch.full((batch, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    lengths = cache_seqlens.tolist()
    capacity = block_table.shape[1] * block_size
    for b, length in enumerate(lengths):
        if not 0 <= length <= capacity:
            raise ValueError(f"cache_seqlens[{b}] = {length} is outside 0..{capacity} (block_table width x block_size)")
        start = max(0, length - 1 - left) if left >= 0 else 0
        if length == 0:
            continue
        pos = torch.arange(start, length, device=q.device)
        blocks = block_table[b, pos // block_size].long()
        if int(blocks.min()) < 0 or int(blocks.max()) >= k_cache.shape[0]:
            raise ValueError(f"block_table[{b}] points outside the cache's {k_cache.shape[0]} blocks")
        k = k_cache[blocks, pos % block_size].float()                       # (n, Hkv, D)
        v = v_cache[blocks, pos % block_size].float()
        if k_scale is not None:
            k = k * k_scale[blocks, pos % block_size].float()[..., None]
            v = v * v_scale[blocks, pos % block_size].float()[..., None]
        qb = q[b].float().reshape(num_kv_heads, group, head_dim)             # (Hkv, G, D)
        scores = torch.einsum("hgd,nhd->hgn", qb, k) * scale                 # (Hkv, G, n)
        lse_b = torch.logsumexp(scores, dim=-1)                              # (Hkv, G)
        probs = torch.exp(scores - lse_b[..., None])
        out[b] = torch.einsum("hgn,nhd->hgd", probs, v).reshape(num_heads, head_dim).to(q.dtype)
        lse[b] = lse_b.reshape(num_heads)
    return (out, lse) if return_lse else out


def write_kv_torch(k, v, k_cache, v_cache, slot_mapping):
    """Scatter new K/V tokens into the paged caches in place.

    k, v: (T, Hkv, D); caches: [num_blocks, block_size, Hkv, D]; slot_mapping: (T,) int64 with
    slot = block_id * block_size + offset, and slot < 0 meaning "skip this token" (padding).
    """
    _, _, _, block_size = check_write_inputs(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    if slots.numel() == 0:
        return
    num_slots = k_cache.shape[0] * block_size
    if int(slots.max()) >= num_slots:
        raise ValueError(f"slot_mapping holds slot {int(slots.max())} but the cache has {num_slots} slots")
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


_triton_decode = None


def _triton_for(t: torch.Tensor):
    """The Triton module for CUDA tensors when Triton imports; None means use PyTorch."""
    global _triton_decode
    if not t.is_cuda:
        return None
    if _triton_decode is None:
        try:
            from longreach.attention import triton_decode
        except ImportError:
            triton_decode = False
        _triton_decode = triton_decode
    return _triton_decode or None


def paged_decode_attention(q, k_cache, v_cache, block_table, cache_seqlens, softmax_scale=None,
                           window_size=(-1, -1), return_lse=False, k_scale=None, v_scale=None):
    """Paged decode attention: Triton split-K on CUDA, PyTorch elsewhere. Shapes as in the torch version
    (int8 caches with their k_scale, v_scale)."""
    impl = _triton_for(q)
    fn = impl.paged_decode_attention if impl else paged_decode_attention_torch
    return fn(q, k_cache, v_cache, block_table, cache_seqlens, softmax_scale=softmax_scale,
              window_size=window_size, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale)


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write K/V tokens into the paged caches: Triton on CUDA, PyTorch elsewhere."""
    impl = _triton_for(k)
    (impl.write_kv if impl else write_kv_torch)(k, v, k_cache, v_cache, slot_mapping)


__all__ = ["paged_decode_attention", "paged_decode_attention_torch", "write_kv", "write_kv_torch"]
