"""Quantized KV cache: int8 (per token, per head) and int4 (KIVI), stored in paged blocks with their scales.

Storage is paged like every other KV cache here: per layer, each named tensor is `[num_blocks, *block_shape]`
where a block holds `block_size` consecutive tokens of one sequence; a sequence's block table maps its logical
block i (tokens [i * block_size, (i + 1) * block_size)) to a physical block.

- `bf16` / `fp16` / `fp32`: the keys and values as they are.
- `int8`: symmetric, one scale per (token, KV head) over head_dim: scale = absmax / 127, code = round(x / scale).
  Token-local, so a write is a scatter through a slot mapping (vLLM's `reshape_and_cache`).
- `int4` (KIVI, Liu et al. 2024, arXiv 2402.02750): asymmetric 4-bit codes (x ~ code * scale + min), two codes
  per uint8. Keys are quantized per channel (each channel's values over a group of G = 32 consecutive tokens
  share scale/min: key outliers live in fixed channels), values per token (groups of G channels along
  head_dim). The most recent tokens stay in full precision in a per-sequence window buffer (KIVI's residual,
  R = 128 by default). The rule: with `num_tokens` L stored, tokens [0, Q) are quantized in the blocks and
  tokens [Q, L) live in the window, where Q = G * floor(max(L - R, 0) / G). Keys are therefore quantized once
  a whole group of G tokens has left the R-token window, and the window holds between R and R + G - 1 tokens.
  Groups never straddle blocks (block_size must be a multiple of G), so every block is self-contained and
  its codes depend only on its own tokens (identical prefixes give identical blocks).

Scales (and int4 minimums) are fp16, matching `longreach.kvcache.spec`: int8 adds 2 bytes per (token, head) for
K and for V; int4 adds 4 bytes (scale + min) per 32 values; the int4 window is a per-sequence cost, not per token.
The codes themselves (and the error bound |x - dequant(x)| <= scale / 2) are `longreach.kvcache.codecs`.

Engine API (`make_kv_quantizer(kv_cache_dtype, ...)` returns one of the `KVQuantizer` subclasses):
`block_layout` / `window_layout` describe the tensors, `allocate` makes them, `write` stores a sequence's new
tokens and returns its new `num_quantized`, `read` returns dequantized (L, Hkv, D) keys and values.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from longreach.kvcache.codecs import (
    INT4_GROUP_SIZE,
    SCALE_DTYPE,
    dequantize_int4_per_channel,
    dequantize_int4_per_token,
    dequantize_int8,
    quantize_int4_per_channel,
    quantize_int4_per_token,
    quantize_int8,
)

KV_CACHE_DTYPES = ("auto", "bf16", "fp16", "fp32", "int8", "int4")
FULL_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_INT4_WINDOW = 128  # KIVI's full-precision residual of recent tokens


def check_kv_cache_dtype(kv_cache_dtype: str) -> str:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose one of {list(KV_CACHE_DTYPES)}")
    return kv_cache_dtype


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype = torch.bfloat16) -> str:
    """'auto' -> the model's dtype ('bf16' / 'fp16' / 'fp32'); any other valid name unchanged."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype != "auto":
        return kv_cache_dtype
    for name, dtype in FULL_PRECISION.items():
        if dtype == model_dtype:
            return name
    raise ValueError(f"kv_cache_dtype 'auto' needs a bf16/fp16/fp32 model, got model dtype {model_dtype}")


# ---------------------------------------------------------------------------------------------------------------
# Paged storage
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor, per block (or per window slot); allocate with a leading count."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _slots(
    block_table: Sequence[int] | torch.Tensor, block_size: int, start: int, end: int, device: torch.device
) -> torch.Tensor:
    """Flat slot index (block * block_size + offset) of tokens [start, end) of one sequence: (end - start,) int64."""
    table = torch.as_tensor(block_table, dtype=torch.long, device=device)
    needed = -(-end // block_size)
    if table.numel() < needed:
        raise ValueError(
            f"block table has {table.numel()} blocks but tokens up to {end} need {needed} "
            f"(block_size={block_size})"
        )
    positions = torch.arange(start, end, device=device)
    return table[positions // block_size] * block_size + positions % block_size


class KVQuantizer(abc.ABC):
    """One KV cache dtype's storage scheme for one layer's K and V (stateless; the engine owns the tensors).

    `store` is the dict returned by `allocate`. Per sequence the engine keeps its block table, its length and
    `num_quantized` (returned by `write`; only int4 needs it, others return the new length).
    """

    name: str = ""
    needs_window = False

    @abc.abstractmethod
    def block_layout(self, block_size: int, num_kv_heads: int, head_dim: int) -> dict[str, TensorSpec]:
        """name -> shape and dtype of one block's tensors (data and scales, K and V)."""

    def window_layout(self, num_kv_heads: int, head_dim: int) -> dict[str, TensorSpec]:
        """Per-sequence full-precision tensors (int4's recent-token window); empty for the other dtypes."""
        return {}

    def block_bytes(self, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes of one block of one layer, K and V with their scales."""
        return sum(s.num_bytes for s in self.block_layout(block_size, num_kv_heads, head_dim).values())

    def window_bytes(self, num_kv_heads: int, head_dim: int) -> int:
        """Bytes of one sequence's window slot in one layer (0 unless int4)."""
        return sum(s.num_bytes for s in self.window_layout(num_kv_heads, head_dim).values())

    def allocate(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        num_window_slots: int = 0,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Zeroed tensors of one layer: `[num_blocks, *block shape]` and `[num_window_slots, *window shape]`."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        if self.needs_window and num_window_slots < 1:
            raise ValueError(
                f"kv_cache_dtype {self.name!r} keeps recent tokens in per-sequence window slots; "
                f"num_window_slots={num_window_slots} must be >= 1 (one per running sequence)"
            )
        store = {
            name: torch.zeros((num_blocks, *spec.shape), dtype=spec.dtype, device=device)
            for name, spec in self.block_layout(block_size, num_kv_heads, head_dim).items()
        }
        store.update(
            {
                name: torch.zeros((num_window_slots, *spec.shape), dtype=spec.dtype, device=device)
                for name, spec in self.window_layout(num_kv_heads, head_dim).items()
            }
        )
        return store

    @abc.abstractmethod
    def write(
        self,
        store: dict[str, torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
        block_table: Sequence[int] | torch.Tensor,
        start: int,
        num_quantized: int | None = None,
        window_slot: int | None = None,
    ) -> int:
        """Store one sequence's new tokens k, v (n, Hkv, D) at positions [start, start + n); returns num_quantized."""

    @abc.abstractmethod
    def read(
        self,
        store: dict[str, torch.Tensor],
        block_table: Sequence[int] | torch.Tensor,
        length: int,
        num_quantized: int | None = None,
        window_slot: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's tokens [0, length) as full-precision keys and values, each (length, Hkv, D) in dtype."""

    @staticmethod
    def _check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
        if k.dim() != 3 or k.shape != v.shape:
            raise ValueError(f"k and v must both be (n, Hkv, D); got {tuple(k.shape)} and {tuple(v.shape)}")


class _TokenLocalKV(KVQuantizer):
    """Dtypes whose tokens are stored independently (full precision, int8): writes are slot scatters."""

    @abc.abstractmethod
    def write_slots(
        self, store: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Batched write of any tokens: k, v (T, Hkv, D); slot_mapping (T,) int64 = block * block_size + offset."""

    @abc.abstractmethod
    def read_slots(
        self, store: dict[str, torch.Tensor], slots: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens at flat slots (S,) -> keys, values (S, Hkv, D) in dtype."""

    def read_blocks(
        self, store: dict[str, torch.Tensor], block_table: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole blocks of a batch: block_table (B, num_blocks_per_seq) -> keys, values (B, nb * block_size, Hkv, D)
        (padded decode; mask keys at or past each sequence's length)."""
        block_size = store["k"].shape[1]
        offsets = torch.arange(block_size, device=block_table.device)
        slots = (block_table.long()[:, :, None] * block_size + offsets).flatten(1)  # (B, nb * bs)
        k, v = self.read_slots(store, slots.flatten(), dtype)
        return k.unflatten(0, slots.shape), v.unflatten(0, slots.shape)

    def write(self, store, k, v, block_table, start, num_quantized=None, window_slot=None) -> int:
        self._check_kv(k, v)
        block_size = store["k"].shape[1]
        self.write_slots(store, k, v, _slots(block_table, block_size, start, start + k.shape[0], k.device))
        return start + k.shape[0]

    def read(self, store, block_table, length, num_quantized=None, window_slot=None, dtype=torch.float32):
        return self.read_slots(
            store, _slots(block_table, store["k"].shape[1], 0, length, store["k"].device), dtype
        )


class FullPrecisionKV(_TokenLocalKV):
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


class Int8KV(_TokenLocalKV):
    """int8 codes (block_size, Hkv, D) + fp16 scale per (token, head) (block_size, Hkv), for K and for V."""

    name = "int8"

    def block_layout(self, block_size, num_kv_heads, head_dim):
        data = TensorSpec((block_size, num_kv_heads, head_dim), torch.int8)
        scale = TensorSpec((block_size, num_kv_heads), SCALE_DTYPE)
        return {"k": data, "k_scale": scale, "v": data, "v_scale": scale}

    def write_slots(self, store, k, v, slot_mapping):
        self._check_kv(k, v)
        for name, x in (("k", k), ("v", v)):
            codes, scale = quantize_int8(x)  # (T, Hkv, D), (T, Hkv)
            store[name].flatten(0, 1)[slot_mapping] = codes
            store[f"{name}_scale"].flatten(0, 1)[slot_mapping] = scale

    def read_slots(self, store, slots, dtype=torch.float32):
        return tuple(
            dequantize_int8(
                store[name].flatten(0, 1)[slots], store[f"{name}_scale"].flatten(0, 1)[slots], dtype
            )
            for name in ("k", "v")
        )


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
            slots = _slots(block_table, block_size, old_q, new_q, k.device)  # (N,)
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
        slots = _slots(block_table, block_size, 0, num_quantized, store["k"].device)  # (Q,)
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
