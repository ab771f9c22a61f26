"""The storage protocol of the KV cache's dtypes (`longreach.kvcache.quant` implements it for each one).

Per layer, each named tensor a dtype stores is `[num_blocks, *block_shape]` (plus int4's per-sequence window
slots); a `KVQuantizer` describes those tensors (`TensorSpec`), allocates them, writes a sequence's new tokens
and reads its tokens back in full precision. Token-local dtypes (each token stored on its own: full precision,
int8, fp8) also write and read any tokens by flat slot, which is what the paged decode and batched writes use.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor, per block (or per window slot); allocate with a leading count."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def sequence_slots(
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
    # every attention reads K/V back from the pages, fresh prefills included (else those attend the step's own)
    attends_stored = False

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


class TokenLocalKV(KVQuantizer):
    """Dtypes whose tokens are stored independently (full precision, int8, fp8): writes are slot scatters."""

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
        self.write_slots(
            store, k, v, sequence_slots(block_table, block_size, start, start + k.shape[0], k.device)
        )
        return start + k.shape[0]

    def read(self, store, block_table, length, num_quantized=None, window_slot=None, dtype=torch.float32):
        return self.read_slots(
            store, sequence_slots(block_table, store["k"].shape[1], 0, length, store["k"].device), dtype
        )
