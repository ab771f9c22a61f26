"""Paged K/V storage and the model's `attend` over it (vLLM's PagedAttention layout).

Each layer owns one K and one V tensor `[num_blocks, block_size, Hkv, D]`; token t of a request lives in
slot `block_table[t // block_size] * block_size + t % block_size`. Every step the runner hands over a
`PagedBatch`: the slot of each new token (`slot_mapping`) and, per sequence, its block table and key length.
For each layer `attend` then (1) writes the step's K/V into their slots for the *whole* batch, and only
then (2) attends: the single-query sequences (decodes, placed first by the runner) through the paged
decode kernel; prefills starting at position 0 through `flash_attn_varlen_func` on the step's own K/V;
continued prefill chunks through `flash_attn_varlen_func` over keys gathered from their pages,
bottom-right causal as FlashAttention defines it.

The storage goes through a `KVQuantizer` (`kvcache.quant`): bf16/fp16/fp32 pages are plain tensors; int8 and
fp8 pages are written quantized (fp8's fresh prefills attend their K/V as stored, so chunking changes nothing).
The decode and the write are the attention package's (`attention.paged`: Triton on CUDA, batched PyTorch on
CPU), which read int8 / fp8 pages with their scales and dequantize where they read.
This module keeps storage: allocation, writes, slot reads, and the sizing of the cache.
int4 (KIVI) and eviction policies bring their own batch (`paged_gather.GatheredBatch`): keys read
(dequantized) per sequence, one varlen attention call. Either batch kind writes and attends for itself;
`BoundPagedKVCache` hands each layer's K/V to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from longreach.attention import AttentionMetadata, flash_attn_varlen_func
from longreach.attention.paged import gather_rows, paged_decode_attention, write_kv
from longreach.config import CacheConfig
from longreach.kvcache.quant import FULL_PRECISION, FullPrecisionKV, KVQuantizer, ScaledCodesKV


@dataclass(frozen=True)
class PagedBatch:
    """Cache addressing of one engine step in the paged layout (built by the runner's layout; all tensors on
    the cache's device).

    slot_mapping: (T,) int64, where each of the step's tokens is written. The batch holds three runs of
    sequences, in this order:
    - decodes, one query token each: decode_block_table (num_decodes, max_blocks) int32 and
      decode_seqlens (num_decodes,) int32, the keys each one sees;
    - fresh prefills, starting at position 0: their keys are exactly their tokens in this step, so
      nothing is gathered; fresh_meta (varlen, over these tokens) with num_fresh_tokens of them;
    - continued prefills (a chunk after earlier chunks or a prefix-cache hit): continued_meta (varlen,
      queries over these tokens, keys over their whole contexts) and continued_kv_slots (total_k,) int64,
      the slots of all those keys in order.
    """

    slot_mapping: torch.Tensor
    num_decodes: int
    decode_block_table: torch.Tensor | None
    decode_seqlens: torch.Tensor | None
    num_fresh_tokens: int
    fresh_meta: AttentionMetadata | None
    continued_meta: AttentionMetadata | None
    continued_kv_slots: torch.Tensor | None

    def write(
        self, cache: "PagedKVCache", store: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor
    ) -> None:
        cache.write_slots(store, k, v, self.slot_mapping)

    def attend(
        self,
        cache: "PagedKVCache",
        store: dict[str, torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window_size: tuple[int, int],
    ) -> torch.Tensor:
        """q (T, Hq, D), k/v (T, Hkv, D) of the step (already written) -> (T, Hq, D)."""
        num_decodes = self.num_decodes
        if num_decodes == q.shape[0]:
            return cache.decode(store, q, self.decode_block_table, self.decode_seqlens, window_size)
        out = torch.empty_like(q)
        if num_decodes:
            out[:num_decodes] = cache.decode(
                store, q[:num_decodes], self.decode_block_table, self.decode_seqlens, window_size
            )
        start, end = num_decodes, num_decodes + self.num_fresh_tokens
        if self.fresh_meta is not None:
            fresh_k, fresh_v = k[start:end], v[start:end]
            if cache.quantizer.attends_stored:  # fp8: attend the stored values, as every later read does
                fresh_k, fresh_v = cache.read_slots(store, self.slot_mapping[start:end], q.dtype)
            out[start:end] = attend_fresh(q[start:end], fresh_k, fresh_v, self.fresh_meta, window_size)
        if self.continued_meta is not None:
            keys, values = cache.read_slots(store, self.continued_kv_slots, q.dtype)  # (Tk, Hkv, D)
            m = self.continued_meta
            out[end:] = flash_attn_varlen_func(
                q[end:],
                keys,
                values,
                m.cu_seqlens_q,
                m.cu_seqlens_k,
                m.max_seqlen_q,
                m.max_seqlen_k,
                causal=True,
                window_size=window_size,
            )
        return out


def attend_fresh(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, window_size: tuple[int, int]
) -> torch.Tensor:
    """Prefills from position 0 attend their own K/V: equal query and key lengths, the fastest varlen path."""
    return flash_attn_varlen_func(
        q,
        k,
        v,
        meta.cu_seqlens_q,
        meta.cu_seqlens_k,
        meta.max_seqlen_q,
        meta.max_seqlen_k,
        causal=True,
        window_size=window_size,
    )


class PagedKVCache:
    """Per-layer pages in `stores[layer]`: the quantizer's named tensors, each `[num_blocks, *block shape]`
    (plain K/V: `k_caches[layer]`, `v_caches[layer]` are [num_blocks, block_size, Hkv, D]), plus int4's
    `num_window_slots` per-sequence window slots."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        quantizer: KVQuantizer | None = None,
        num_window_slots: int = 0,
    ):
        if quantizer is None:
            names = {d: n for n, d in FULL_PRECISION.items()}
            if dtype not in names:
                raise ValueError(f"KV cache dtype {dtype} must be one of {list(FULL_PRECISION.values())}")
            quantizer = FullPrecisionKV(names[dtype])
        self.quantizer = quantizer
        # zeros (allocate's), not empty: padded gathers multiply masked keys' values, and 0 * NaN is NaN
        self.stores = [
            quantizer.allocate(num_blocks, block_size, num_kv_heads, head_dim, num_window_slots, device)
            for _ in range(num_layers)
        ]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.is_plain = isinstance(quantizer, FullPrecisionKV)
        self.block_bytes = num_layers * quantizer.block_bytes(block_size, num_kv_heads, head_dim)
        self.window_slot_bytes = num_layers * quantizer.window_bytes(num_kv_heads, head_dim)
        self.workspace: dict[str, torch.Tensor] = {}  # reused gather buffers (CPU paths)

    @property
    def k_caches(self) -> list[torch.Tensor]:
        return [store["k"] for store in self.stores]

    @property
    def v_caches(self) -> list[torch.Tensor]:
        return [store["v"] for store in self.stores]

    def write_slots(
        self, store: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Store K/V (T, Hkv, D) at flat slots (T,) (token-local dtypes: plain, int8)."""
        if self.is_plain:
            write_kv(k, v, store["k"], store["v"], slot_mapping)
        else:
            self.quantizer.write_slots(store, k, v, slot_mapping)

    def read_slots(
        self, store: dict[str, torch.Tensor], slots: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (S, Hkv, D) in dtype at flat slots (S,) (token-local dtypes: plain, int8)."""
        if self.is_plain:
            keys = gather_rows(store["k"].flatten(0, 1), slots, self.workspace, "k")
            values = gather_rows(store["v"].flatten(0, 1), slots, self.workspace, "v")
            return keys.to(dtype), values.to(dtype)
        return self.quantizer.read_slots(store, slots, dtype)

    def decode(
        self,
        store: dict[str, torch.Tensor],
        q: torch.Tensor,
        block_table: torch.Tensor,
        seqlens: torch.Tensor,
        window_size: tuple[int, int],
    ) -> torch.Tensor:
        """One query per sequence over its pages: q (B, Hq, D) -> (B, Hq, D). Plain and int8 pages go to
        the paged decode as they are (int8 dequantized where it reads); pages stored in another dtype than
        the queries are converted first, only the blocks the tables reference, into a compact page set."""
        k_cache, v_cache = store["k"], store["v"]
        if isinstance(self.quantizer, ScaledCodesKV):  # int8 / fp8 codes with their scales
            return paged_decode_attention(
                q,
                k_cache,
                v_cache,
                block_table,
                seqlens,
                window_size=window_size,
                k_scale=store["k_scale"],
                v_scale=store["v_scale"],
                workspace=self.workspace,
            )
        if not self.is_plain or k_cache.dtype != q.dtype:
            used, compact = torch.unique(block_table, return_inverse=True)  # (U,), table's shape
            keys, values = self.quantizer.read_blocks(
                store, used[None, :], dtype=q.dtype
            )  # (1, U * bs, Hkv, D)
            k_cache = keys.view(used.numel(), self.block_size, *keys.shape[2:])
            v_cache = values.view(used.numel(), self.block_size, *values.shape[2:])
            block_table = compact.to(torch.int32)
        return paged_decode_attention(
            q, k_cache, v_cache, block_table, seqlens, window_size=window_size, workspace=self.workspace
        )

    def bind(self, batch) -> "BoundPagedKVCache":
        """The object the model receives as `kv_cache` for one step (batch: a PagedBatch or GatheredBatch)."""
        return BoundPagedKVCache(self, batch)


class BoundPagedKVCache:
    """The model's view of the cache for one step: each layer's K/V go to the batch, which writes them into
    that layer's pages for the *whole* batch and only then attends."""

    def __init__(self, cache: PagedKVCache, batch):
        self.cache, self.batch = cache, batch

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        window_size: tuple[int, int],
    ) -> torch.Tensor:
        """q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D). `meta` describes the unpaged batch and is not needed:
        the paged addressing is in `self.batch`."""
        store = self.cache.stores[layer_idx]
        self.batch.write(self.cache, store, k, v)
        return self.batch.attend(self.cache, store, q, k, v, tuple(window_size))


def available_memory(device: torch.device) -> int:
    """Bytes free on the device now: CUDA's free memory, or the OS's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def num_blocks_for(
    cfg: CacheConfig, bytes_per_block: int, device: torch.device, max_useful_blocks: int | None = None
) -> int:
    """How many blocks to allocate: `cfg.num_blocks`, else `cfg.kv_cache_memory` bytes, else
    `cfg.memory_fraction` of the free memory (capped at `max_useful_blocks`: enough for every sequence
    at full length, since more could never be used)."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    if cfg.kv_cache_memory is not None:
        num_blocks = cfg.kv_cache_memory // bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={cfg.kv_cache_memory} bytes is less than one KV block "
                f"({bytes_per_block} bytes)"
            )
        return num_blocks
    fraction = cfg.memory_fraction or (0.9 if device.type == "cuda" else 0.5)
    free = available_memory(device)
    num_blocks = int(free * fraction) // bytes_per_block
    if max_useful_blocks is not None:
        num_blocks = min(num_blocks, max_useful_blocks)
    if num_blocks < 1:
        raise ValueError(
            f"{fraction:.0%} of the {free / 2**30:.2f} GiB free on {device} holds no KV block "
            f"({bytes_per_block} bytes); pass kv_cache_memory= or num_blocks="
        )
    return num_blocks
