"""Input checks of paged decode and the paged KV write, shared by the PyTorch path (`paged.py`) and the Triton
kernels (`triton_decode.py`), so each call path validates once with the same messages (and neither module
imports the other for them)."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# quantized caches' code dtypes (read as code * scale): int8 and fp8 e4m3 (`kvcache.quant.Int8KV` / `Fp8KV`)
CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)
MAX_HEAD_DIM = 256


def check_decode_inputs(
    q, k_cache, v_cache, block_table, cache_seqlens, window_size=(-1, -1), k_scale=None, v_scale=None
):
    """Validate decode inputs (int8 / fp8 caches with both scales); returns (batch, Hq, Hkv, D, block_size)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, heads, head_dim), got shape {tuple(q.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4:
            raise ValueError(
                f"{name} must be [num_blocks, block_size, kv_heads, head_dim], got {tuple(cache.shape)}"
            )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    quantized = _check_scales(q, k_cache, v_cache, k_scale, v_scale)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in SUPPORTED_DTYPES and not (quantized and name != "q"):
            raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
        if t.stride(-1) != 1:
            raise ValueError(
                f"{name} must be contiguous in its last dim (stride(-1) == 1), got strides {t.stride()}"
            )
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
        raise ValueError(
            f"block_table must be (batch={batch}, max_blocks) int32, got {tuple(block_table.shape)} "
            f"{block_table.dtype}"
        )
    if cache_seqlens.shape != (batch,) or cache_seqlens.dtype != torch.int32:
        raise ValueError(
            f"cache_seqlens must be (batch={batch},) int32, got {tuple(cache_seqlens.shape)} "
            f"{cache_seqlens.dtype}"
        )
    for name, t in (("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(
            f"window_size must be (left, right) with each >= -1 (-1 = unbounded), got {window_size}"
        )
    return batch, num_heads, num_kv_heads, head_dim, block_size


def _check_scales(q, k_cache, v_cache, k_scale, v_scale) -> bool:
    """Validate quantized (int8 / fp8) caches' scales (both or neither, and only with quantized caches, both
    of one code dtype); True when quantized."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale, or neither")
    int8 = (k_cache.dtype in CODE_DTYPES, v_cache.dtype in CODE_DTYPES)
    if k_scale is None:
        if any(int8):
            raise ValueError(
                f"int8 caches need k_scale and v_scale, fp8 caches too (got k_cache {k_cache.dtype}, "
                f"v_cache {v_cache.dtype} without scales)"
            )
        return False
    if not all(int8) or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"k_scale and v_scale go with int8 caches or fp8 ones (both of one dtype), got k_cache "
            f"{k_cache.dtype}, v_cache {v_cache.dtype}"
        )
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t.shape != k_cache.shape[:3]:
            raise ValueError(
                f"{name} must be [num_blocks, block_size, kv_heads] = {tuple(k_cache.shape[:3])}, "
                f"got {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    return True


def check_write_inputs(k, v, k_cache, v_cache, slot_mapping):
    """Validate write_kv inputs; returns (num_tokens, Hkv, D, block_size)."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be (tokens, kv_heads, head_dim), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"caches must both be [num_blocks, block_size, kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"k's (kv_heads, head_dim) {tuple(k.shape[1:])} != cache's {tuple(k_cache.shape[2:])}"
        )
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(
            f"slot_mapping must be ({k.shape[0]},) int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}")
    return k.shape[0], k.shape[1], k.shape[2], k_cache.shape[1]
