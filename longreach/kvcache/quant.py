"""Quantized KV cache: int8 and fp8 (per token, per head) and int4 (KIVI), stored in paged blocks with scales.

Storage is paged like every other KV cache here: per layer, each named tensor is `[num_blocks, *block_shape]`
where a block holds `block_size` consecutive tokens of one sequence; a sequence's block table maps its logical
block i (tokens [i * block_size, (i + 1) * block_size)) to a physical block.

- `bf16` / `fp16` / `fp32`: the keys and values as they are.
- `int8`: symmetric, one scale per (token, KV head) over head_dim: scale = absmax / 127, code = round(x / scale).
  Token-local, so a write is a scatter through a slot mapping (vLLM's `reshape_and_cache`).
- `fp8` (alias `fp8_e4m3`): e4m3 codes (`torch.float8_e4m3fn`, vLLM's `fp8` KV storage) with int8's layout: one
  scale per (token, KV head), scale = absmax / 448, code = fp8(x / scale). vLLM scales per tensor (1.0 unless
  calibrated); a per-token scale is computed on write, so nothing is calibrated, nothing saturates, and a
  token's codes depend on its own K/V alone (prefix blocks stay shareable, results stay schedule-independent).
  Every attention over an fp8 cache reads the stored values, fresh prefills included (as vLLM's attention
  reads its cache), so how a prompt is chunked or batched does not change what its queries see.
- `int4` (KIVI, Liu et al. 2024, arXiv 2402.02750): asymmetric 4-bit codes (x ~ code * scale + min), two codes
  per uint8. Keys are quantized per channel (each channel's values over a group of G = 32 consecutive tokens
  share scale/min: key outliers live in fixed channels), values per token (groups of G channels along
  head_dim). The most recent tokens stay in full precision in a per-sequence window buffer (KIVI's residual,
  R = 128 by default). The rule: with `num_tokens` L stored, tokens [0, Q) are quantized in the blocks and
  tokens [Q, L) live in the window, where Q = G * floor(max(L - R, 0) / G). Keys are therefore quantized once
  a whole group of G tokens has left the R-token window, and the window holds between R and R + G - 1 tokens.
  Groups never straddle blocks (block_size must be a multiple of G), so every block is self-contained and
  its codes depend only on its own tokens (identical prefixes give identical blocks).

Scales (and int4 minimums) are fp16, matching `longreach.kvcache.spec`: int8 and fp8 add 2 bytes per (token,
head) for K and for V; int4 adds 4 bytes (scale + min) per 32 values; the int4 window is a per-sequence cost,
not per token.
The codes themselves (and the error bound |x - dequant(x)| <= scale / 2) are `longreach.kvcache.codecs`.

Engine API (`make_kv_quantizer(kv_cache_dtype, ...)` returns one of the `KVQuantizer` subclasses, whose protocol
is `kvcache.quant_base`):
`block_layout` / `window_layout` describe the tensors, `allocate` makes them, `write` stores a sequence's new
tokens and returns its new `num_quantized`, `read` returns dequantized (L, Hkv, D) keys and values.
"""

from __future__ import annotations

import torch

from longreach.kvcache.codecs import (
    FP8_DTYPE,
    INT4_GROUP_SIZE,
    SCALE_DTYPE,
    dequantize_fp8,
    dequantize_int4_per_channel,
    dequantize_int4_per_token,
    dequantize_int8,
    quantize_fp8,
    quantize_int4_per_channel,
    quantize_int4_per_token,
    quantize_int8,
)
from longreach.kvcache.quant_base import KVQuantizer, TensorSpec, TokenLocalKV, sequence_slots

__all__ = [
    "FULL_PRECISION",
    "KV_CACHE_DTYPES",
    "Fp8KV",
    "FullPrecisionKV",
    "Int4KV",
    "Int8KV",
    "KVQuantizer",
    "ScaledCodesKV",
    "TensorSpec",
    "check_kv_cache_dtype",
    "kv_window_bytes_per_sequence",
    "make_kv_quantizer",
    "resolve_kv_cache_dtype",
]

KV_CACHE_DTYPES = ("auto", "bf16", "fp16", "fp32", "int8", "fp8", "fp8_e4m3", "int4")
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}  # vLLM's two names for e4m3 storage
FULL_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_INT4_WINDOW = 128  # KIVI's full-precision residual of recent tokens


def check_kv_cache_dtype(kv_cache_dtype: str) -> str:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose one of {list(KV_CACHE_DTYPES)}")
    return kv_cache_dtype


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype = torch.bfloat16) -> str:
    """'auto' -> the model's dtype ('bf16' / 'fp16' / 'fp32'); an alias -> its name ('fp8_e4m3' -> 'fp8');
    any other valid name unchanged."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype != "auto":
        return KV_CACHE_DTYPE_ALIASES.get(kv_cache_dtype, kv_cache_dtype)
    for name, dtype in FULL_PRECISION.items():
        if dtype == model_dtype:
            return name
    raise ValueError(f"kv_cache_dtype 'auto' needs a bf16/fp16/fp32 model, got model dtype {model_dtype}")


class FullPrecisionKV(TokenLocalKV):
    """bf16 / fp16 / fp32: keys and values stored as they are."""

    def __init__(self, name: str = "bf16"):
        if name not in FULL_PRECISION:
            raise ValueError(f"full-precision KV dtype {name!r} must be one of {list(FULL_PRECISION)}")
        self.name, self.dtype = name, FULL_PRECISION[name]

    def block_layout(self, block_size, num_kv_heads, head_dim):
        spec = TensorSpec((block_size, num_kv_heads, head_dim), self.dtype)
        return {"k": spec, "v": spec}

    def write_slots(self, store, k, v, slot_mapping):
        self._check_kv(k, v)
        for name, x in (("k", k), ("v", v)):
            store[name].flatten(0, 1)[slot_mapping] = x.to(self.dtype)

    def read_slots(self, store, slots, dtype=torch.float32):
        return tuple(store[name].flatten(0, 1)[slots].to(dtype) for name in ("k", "v"))


def _as_bytes(codes: torch.Tensor) -> torch.Tensor:
    """fp8 codes as uint8 (same bits): scatters and gathers then need no fp8 kernels (CPU torch has few)."""
    return codes.view(torch.uint8) if codes.dtype == FP8_DTYPE else codes


class ScaledCodesKV(TokenLocalKV):
    """One-byte codes (block_size, Hkv, D) + an fp16 scale per (token, head) (block_size, Hkv), for K and for V:
    `code_dtype` codes from `quantize` (x -> codes, scale over head_dim), read back as code * scale. The paged
    decode (`attention.paged`) takes such pages with their scales and dequantizes where it reads."""

    code_dtype: torch.dtype
    quantize: staticmethod  # x (..., D) -> codes (..., D), scale (...,)
    dequantize: staticmethod  # codes, scale, dtype -> (..., D)

    def block_layout(self, block_size, num_kv_heads, head_dim):
        data = TensorSpec((block_size, num_kv_heads, head_dim), self.code_dtype)
        scale = TensorSpec((block_size, num_kv_heads), SCALE_DTYPE)
        return {"k": data, "k_scale": scale, "v": data, "v_scale": scale}

    def write_slots(self, store, k, v, slot_mapping):
        self._check_kv(k, v)
        for name, x in (("k", k), ("v", v)):
            codes, scale = self.quantize(x)  # (T, Hkv, D), (T, Hkv)
            _as_bytes(store[name]).flatten(0, 1)[slot_mapping] = _as_bytes(codes)
            store[f"{name}_scale"].flatten(0, 1)[slot_mapping] = scale

    def read_slots(self, store, slots, dtype=torch.float32):
        return tuple(
            self.dequantize(
                _as_bytes(store[name]).flatten(0, 1)[slots].view(self.code_dtype),
                store[f"{name}_scale"].flatten(0, 1)[slots],
                dtype,
            )
            for name in ("k", "v")
        )


class Int8KV(ScaledCodesKV):
    """int8 codes + fp16 scale per (token, head): scale = absmax / 127, code = round(x / scale)."""

    name = "int8"
    code_dtype = torch.int8
    quantize = staticmethod(quantize_int8)
    dequantize = staticmethod(dequantize_int8)


class Fp8KV(ScaledCodesKV):
    """fp8 e4m3 codes + fp16 scale per (token, head): scale = absmax / 448, code = fp8(x / scale). Every attention
    reads the stored values back (`attends_stored`), so a prompt's chunking does not change its tokens."""

    name = "fp8"
    code_dtype = FP8_DTYPE
    quantize = staticmethod(quantize_fp8)
    dequantize = staticmethod(dequantize_fp8)
    attends_stored = True


class Int4KV(KVQuantizer):
    """KIVI int4: per-channel keys, per-token values, group G, full-precision window of R recent tokens.

    Per block: k, v packed uint8 (block_size, Hkv, D/2); k_scale, k_min (block_size/G, Hkv, D);
    v_scale, v_min (block_size, Hkv, D/G). Per window slot: k_window, v_window (R + G, Hkv, D) in
    `window_dtype`, a ring indexed by position % (R + G).
    """

    name = "int4"
    needs_window = True

    def __init__(
        self,
        group_size: int = INT4_GROUP_SIZE,
        window: int = DEFAULT_INT4_WINDOW,
        window_dtype: torch.dtype = torch.bfloat16,
    ):
        if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise ValueError(f"int4 group_size={group_size!r} must be an even integer >= 2")
        if not isinstance(window, int) or window < 0:
            raise ValueError(
                f"int4 window={window!r} must be an integer >= 0 (recent tokens kept unquantized)"
            )
        self.group_size, self.window, self.window_dtype = group_size, window, window_dtype

    @property
    def window_capacity(self) -> int:
        """Ring slots per sequence: the window holds at most R + G - 1 tokens between writes."""
        return self.window + self.group_size

    def num_quantized_for(self, num_tokens: int) -> int:
        """KIVI's rule: tokens [0, Q) are quantized, Q = G * floor(max(L - R, 0) / G)."""
        return max(num_tokens - self.window, 0) // self.group_size * self.group_size

    def _check_shapes(self, block_size: int, head_dim: int) -> None:
        if block_size % self.group_size:
            raise ValueError(
                f"int4 KV needs block_size ({block_size}) to be a multiple of group_size "
                f"({self.group_size}): key groups of G tokens must not straddle blocks"
            )
        if head_dim % self.group_size:
            raise ValueError(
                f"int4 KV needs head_dim ({head_dim}) to be a multiple of group_size "
                f"({self.group_size}): value groups run along head_dim"
            )

    def block_layout(self, block_size, num_kv_heads, head_dim):
        self._check_shapes(block_size, head_dim)
        data = TensorSpec((block_size, num_kv_heads, head_dim // 2), torch.uint8)
        key_scale = TensorSpec((block_size // self.group_size, num_kv_heads, head_dim), SCALE_DTYPE)
        value_scale = TensorSpec((block_size, num_kv_heads, head_dim // self.group_size), SCALE_DTYPE)
        return {
            "k": data,
            "k_scale": key_scale,
            "k_min": key_scale,
            "v": data,
            "v_scale": value_scale,
            "v_min": value_scale,
        }

    def window_layout(self, num_kv_heads, head_dim):
        spec = TensorSpec((self.window_capacity, num_kv_heads, head_dim), self.window_dtype)
        return {"k_window": spec, "v_window": spec}

    def _check_state(self, store, start: int, num_quantized: int | None, window_slot: int | None) -> int:
        if window_slot is None or not 0 <= window_slot < store["k_window"].shape[0]:
            raise ValueError(
                f"int4 KV needs a window_slot in [0, {store['k_window'].shape[0]}), got {window_slot!r}"
            )
        num_quantized = self.num_quantized_for(start) if num_quantized is None else num_quantized
        if not 0 <= num_quantized <= start or num_quantized % self.group_size:
            raise ValueError(
                f"num_quantized={num_quantized} must be a multiple of group_size ({self.group_size}) "
                f"in [0, {start}]"
            )
        if start - num_quantized >= self.window_capacity:
            raise ValueError(
                f"num_quantized={num_quantized} leaves {start - num_quantized} tokens unquantized, more "
                f"than the window holds ({self.window_capacity - 1})"
            )
        return num_quantized

    def write(self, store, k, v, block_table, start, num_quantized=None, window_slot=None) -> int:
        """Quantize whatever left the window, then put the new tokens that stay recent into the ring."""
        self._check_kv(k, v)
        old_q = self._check_state(store, start, num_quantized, window_slot)
        end = start + k.shape[0]
        new_q = max(old_q, self.num_quantized_for(end))
        cap, group, block_size = self.window_capacity, self.group_size, store["k"].shape[1]
        k_ring, v_ring = store["k_window"][window_slot], store["v_window"][window_slot]  # (cap, Hkv, D)
        if new_q > old_q:
            # full-precision copies of tokens [old_q, new_q): from the ring if already stored, else from k/v
            stored = torch.arange(old_q, min(new_q, start), device=k.device) % cap
            fresh = slice(0, max(new_q - start, 0))
            k_fp = torch.cat([k_ring[stored].to(k.dtype), k[fresh]])  # (new_q - old_q, Hkv, D)
            v_fp = torch.cat([v_ring[stored].to(v.dtype), v[fresh]])
            slots = sequence_slots(block_table, block_size, old_q, new_q, k.device)  # (N,)
            k_codes, k_scale, k_min = quantize_int4_per_channel(k_fp, group)  # scale (N/G, Hkv, D)
            v_codes, v_scale, v_min = quantize_int4_per_token(v_fp, group)  # scale (N, Hkv, D/G)
            group_slots = slots[::group] // group  # (N/G,) flat group index
            store["k"].flatten(0, 1)[slots] = k_codes
            store["v"].flatten(0, 1)[slots] = v_codes
            store["k_scale"].flatten(0, 1)[group_slots] = k_scale
            store["k_min"].flatten(0, 1)[group_slots] = k_min
            store["v_scale"].flatten(0, 1)[slots] = v_scale
            store["v_min"].flatten(0, 1)[slots] = v_min
        keep_from = max(start, new_q)  # new tokens still recent go to the ring
        ring = torch.arange(keep_from, end, device=k.device) % cap
        k_ring[ring] = k[keep_from - start :].to(self.window_dtype)
        v_ring[ring] = v[keep_from - start :].to(self.window_dtype)
        return new_q

    def read(self, store, block_table, length, num_quantized=None, window_slot=None, dtype=torch.float32):
        num_quantized = self._check_state(store, length, num_quantized, window_slot)
        group, block_size = self.group_size, store["k"].shape[1]
        slots = sequence_slots(block_table, block_size, 0, num_quantized, store["k"].device)  # (Q,)
        group_slots = slots[::group] // group  # (Q/G,)
        k_old = dequantize_int4_per_channel(
            store["k"].flatten(0, 1)[slots],
            store["k_scale"].flatten(0, 1)[group_slots],
            store["k_min"].flatten(0, 1)[group_slots],
            group,
            dtype,
        )
        v_old = dequantize_int4_per_token(
            store["v"].flatten(0, 1)[slots],
            store["v_scale"].flatten(0, 1)[slots],
            store["v_min"].flatten(0, 1)[slots],
            group,
            dtype,
        )
        ring = torch.arange(num_quantized, length, device=slots.device) % self.window_capacity
        k_new = store["k_window"][window_slot][ring].to(dtype)  # (L - Q, Hkv, D)
        v_new = store["v_window"][window_slot][ring].to(dtype)
        return torch.cat([k_old, k_new]), torch.cat([v_old, v_new])


def make_kv_quantizer(
    kv_cache_dtype: str,
    model_dtype: torch.dtype = torch.bfloat16,
    group_size: int = INT4_GROUP_SIZE,
    window: int = DEFAULT_INT4_WINDOW,
) -> KVQuantizer:
    """The storage scheme for a `--kv-cache-dtype` value; 'auto' follows the model's dtype.

    group_size / window apply to int4 only; its window is kept in the model's dtype.
    """
    name = resolve_kv_cache_dtype(kv_cache_dtype, model_dtype)
    if name == "int8":
        return Int8KV()
    if name == "fp8":
        return Fp8KV()
    if name == "int4":
        return Int4KV(group_size, window, window_dtype=model_dtype)
    return FullPrecisionKV(name)


def kv_window_bytes_per_sequence(
    kv_cache_dtype: str,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    model_dtype: torch.dtype = torch.bfloat16,
    group_size: int = INT4_GROUP_SIZE,
    window: int = DEFAULT_INT4_WINDOW,
) -> int:
    """Bytes of one sequence's full-precision window slots across all layers (int4 only; else 0).

    The per-sequence cost that `longreach.kvcache.spec` (bytes per token, the one KV-size calculator) leaves out;
    read from the quantizer's own window layout, so it is what the engine allocates."""
    quantizer = make_kv_quantizer(kv_cache_dtype, model_dtype, group_size, window)
    return num_layers * quantizer.window_bytes(num_kv_heads, head_dim)
