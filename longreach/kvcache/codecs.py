"""Codes for tensors: int8 (symmetric, one scale per row), fp8 e4m3 (one scale per row) and int4 (asymmetric,
scale + min per group, two codes per byte). The numerics shared by the quantized KV cache
(`longreach.kvcache.quant`) and int8/int4 weights (`longreach.model.quant`); no storage layout here.

Scales (and int4 minimums) are stored in fp16 by default. A stored scale is rounded up when fp16 rounding would
make it too small, so every element's error is at most half its own stored scale: |x - dequant(x)| <= scale / 2.

fp8 codes are `torch.float8_e4m3fn` (4 exponent bits, 3 mantissa bits, max 448, no infinities: OCP's E4M3, what
vLLM's `fp8` / `fp8_e4m3` KV cache stores). The row's scale is absmax / 448 (rounded up as above, so x / scale
never exceeds 448 and no code saturates), code = round-to-nearest-even(x / scale). With 3 mantissa bits the
step between neighbouring codes is 2^-3 of the binade, so a code in e4m3's normal range (|x / scale| >= 2^-6)
is off by at most 2^-4 of itself, and a subnormal one by at most half the subnormal step 2^-9:
|x - dequant(x)| <= max(2^-4 * |x|, 2^-10 * scale). Only casts to and from fp8 are used (no fp8 arithmetic).
A row whose absmax exceeds 448 x fp16's largest value (about 2.9e7) saturates at that bound instead of
overflowing its scale to inf (vLLM's fp8 cache saturates at its scale x 448 too).
"""

from __future__ import annotations

import math

import torch

INT4_GROUP_SIZE = 32  # KIVI's group size: the int4 KV cache's default and spec.py's accounting
INT8_MAX, INT4_MAX = 127, 15
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_DTYPE = torch.float16


def _round_up(scale: torch.Tensor, needed: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """`scale` in scale_dtype, nudged up one ulp where rounding made it smaller than `needed` (fp32)."""
    stored = scale.to(scale_dtype)
    too_small = stored.float() < needed
    return torch.where(too_small, torch.nextafter(stored, torch.full_like(stored, math.inf)), stored)


def quantize_int8(
    x: torch.Tensor, scale_dtype: torch.dtype = SCALE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim. x: (..., D) -> codes int8 (..., D), scale (...,) in scale_dtype."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)  # (...,)
    scale = _round_up(absmax / INT8_MAX, absmax / INT8_MAX, scale_dtype)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.round(xf / safe[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize_int8(
    codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """codes int8 (..., D), scale (...,) -> (..., D) in dtype."""
    return (codes.float() * scale.float()[..., None]).to(dtype)


def quantize_fp8(
    x: torch.Tensor, scale_dtype: torch.dtype = SCALE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes over the last dim. x: (..., D) -> codes float8_e4m3fn (..., D), scale (...,) in scale_dtype."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)  # (...,)
    scale = _round_up(absmax / FP8_MAX, absmax / FP8_MAX, scale_dtype)
    scale = scale.clamp(max=torch.finfo(scale_dtype).max)  # rows past 448 x the largest scale saturate
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    # the clamp catches fp32 rounding of x / scale and saturated rows (older torch casts past 448 to NaN)
    codes = (xf / safe[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def fp8_to(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8_e4m3fn codes -> their values in dtype, exactly (fp16 holds every e4m3 value).

    On CPU torch converts fp8 one element at a time (16x slower than int8 -> fp32 here); moving e4m3's bits
    into fp16's is vectorized: s eeee mmm -> s 0eeee mmm0000000 is the value x 2^-8 (the exponent biases, 7
    and 15, differ by 8; subnormals map onto fp16 normals the same way). The NaN codes, never written by
    `quantize_fp8`, would read as +-480. Other devices cast in hardware."""
    if codes.device.type != "cpu":
        return codes.to(dtype)
    bits = codes.view(torch.uint8).to(torch.int16)
    half = (((bits & 0x7F) << 7) | ((bits & 0x80) << 8)).view(torch.float16)  # (bits & 0x80) << 8 wraps
    return half.mul_(256.0).to(dtype)


def dequantize_fp8(
    codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """codes float8_e4m3fn (..., D), scale (...,) -> (..., D) in dtype."""
    return (fp8_to(codes, torch.float32) * scale.float()[..., None]).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] (..., N) with N even -> uint8 (..., N // 2); element 2i in the low nibble, 2i+1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., N // 2) -> codes uint8 (..., N), the inverse of `pack_int4`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize_int4(
    x: torch.Tensor, group_size: int, dim: int = -1, scale_dtype: torch.dtype = SCALE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit over groups of `group_size` consecutive elements along `dim` (unpacked codes).

    x: (..., N, ...) with N = x.shape[dim] a multiple of group_size -> codes uint8 of x's shape in [0, 15],
    scale and min of x's shape with N replaced by N // group_size. x ~ code * scale + min.
    """
    size = x.shape[dim]
    if group_size < 1 or size % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the quantized dimension ({size})")
    xm = x.float().movedim(dim, -1)  # (..., N)
    xg = xm.unflatten(-1, (size // group_size, group_size))  # (..., N/G, G)
    lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)  # (..., N/G)
    minimum = lo.to(scale_dtype)
    # the stored min must not exceed the true min, or the lowest element would fall below code 0
    minimum = torch.where(
        minimum.float() > lo, torch.nextafter(minimum, torch.full_like(minimum, -math.inf)), minimum
    )
    span = hi - minimum.float()
    scale = _round_up(span / INT4_MAX, span / INT4_MAX, scale_dtype)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = (
        torch.round((xg - minimum.float()[..., None]) / safe[..., None]).clamp_(0, INT4_MAX).to(torch.uint8)
    )
    codes = codes.flatten(-2).movedim(-1, dim)
    return codes, scale.movedim(-1, dim), minimum.movedim(-1, dim)


def dequantize_int4(
    codes: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    group_size: int,
    dim: int = -1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize_int4` (unpacked codes): scale/min are repeated over their group along `dim`."""
    scale = scale.float().repeat_interleave(group_size, dim=dim)
    minimum = minimum.float().repeat_interleave(group_size, dim=dim)
    return (codes.float() * scale + minimum).to(dtype)


def quantize_int4_per_token(
    x: torch.Tensor, group_size: int = INT4_GROUP_SIZE, scale_dtype: torch.dtype = SCALE_DTYPE
) -> tuple[torch.Tensor, ...]:
    """KIVI values: x (T, Hkv, D) -> packed uint8 (T, Hkv, D/2), scale and min (T, Hkv, D/G)."""
    codes, scale, minimum = quantize_int4(x, group_size, dim=-1, scale_dtype=scale_dtype)
    return pack_int4(codes), scale, minimum


def dequantize_int4_per_token(
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    group_size: int = INT4_GROUP_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """packed (T, Hkv, D/2), scale/min (T, Hkv, D/G) -> (T, Hkv, D)."""
    return dequantize_int4(unpack_int4(packed), scale, minimum, group_size, dim=-1, dtype=dtype)


def quantize_int4_per_channel(
    x: torch.Tensor, group_size: int = INT4_GROUP_SIZE, scale_dtype: torch.dtype = SCALE_DTYPE
) -> tuple[torch.Tensor, ...]:
    """KIVI keys: x (T, Hkv, D), T a multiple of G -> packed uint8 (T, Hkv, D/2), scale and min (T/G, Hkv, D).

    Groups run along the token axis (dim -3); packing pairs neighbouring channels, independent of grouping.
    """
    codes, scale, minimum = quantize_int4(x, group_size, dim=-3, scale_dtype=scale_dtype)
    return pack_int4(codes), scale, minimum


def dequantize_int4_per_channel(
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    group_size: int = INT4_GROUP_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """packed (T, Hkv, D/2), scale/min (T/G, Hkv, D) -> (T, Hkv, D)."""
    return dequantize_int4(unpack_int4(packed), scale, minimum, group_size, dim=-3, dtype=dtype)
