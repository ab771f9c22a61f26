"""Attention over keys gathered per sequence from the pages: int4 KV and eviction policies.

Two storage cases cannot use the paged decode kernel directly:
- int4 (KIVI) keeps each sequence's recent tokens in a per-sequence window slot, and its blocks are quantized
  group-wise over tokens, so a sequence is written and read as a whole (`KVQuantizer.write` / `read`);
- an eviction policy (`kvcache.policies`) leaves a sequence holding a subset of its positions (sinks + window,
  heavy hitters + recent), so its keys are the kept positions' slots, gathered.

Either way every such sequence's keys (dequantized, in the query dtype) are concatenated and attended with
one `flash_attn_varlen_func` call, causal bottom-right aligned: a sequence's new tokens are the last of its
keys, and every kept key precedes them. For H2O the attention mass each key receives is accumulated here,
from `key_attention_mass` (the fused attention kernels do not return probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longreach.attention import AttentionMetadata, flash_attn_varlen_func
from longreach.kvcache.paged_cache import PagedKVCache, attend_fresh
from longreach.kvcache.policies import key_attention_mass

# H2O's mass materializes (Hq, queries, keys) fp32 probabilities: chunk the queries to stay under this many
MASS_CHUNK_ELEMENTS = 2**26
# int4 runs of decodes only go through the Triton kernel that dequantizes inside (attention/triton_decode_int4.py)
# instead of reading every key dequantized: None means on CUDA tensors; True forces it (tests, interpreter)
INT4_DECODE_KERNEL: bool | None = None


@dataclass
class SeqWrite:
    """One sequence's int4 write: rows [row_start, row_end) of the step go to positions from `start`.
    block_table: (num_blocks,) int64 on the cache's device. `new_num_quantized` is set by the write."""

    row_start: int
    row_end: int
    start: int
    block_table: torch.Tensor
    num_quantized: int
    window_slot: int
    new_num_quantized: int | None = None


@dataclass
class GatheredRun:
    """The sequences attended over gathered keys; their queries are the step's last rows, in order.

    meta: varlen metadata, queries = each sequence's new tokens, keys = what it attends (kept + new).
    kv_slots: (total_k,) int64 flat slots of those keys (token-local dtypes), or None for int4, whose keys
    are read per sequence: `reads` holds (index into the batch's seq_writes, number of keys) per sequence.
    For H2O, query_positions / key_positions are each sequence's (n,) / (K,) positions and `mass` its
    (K,) fp32 attention mass, summed over the step's layers (filled in here)."""

    meta: AttentionMetadata
    kv_slots: torch.Tensor | None = None
    reads: tuple[tuple[int, int], ...] | None = None
    query_positions: tuple[torch.Tensor, ...] | None = None
    key_positions: tuple[torch.Tensor, ...] | None = None
    mass: list[torch.Tensor | None] | None = None


@dataclass(frozen=True)
class GatheredBatch:
    """Cache addressing of one engine step in a gathered layout (int4, eviction policies).

    slot_mapping: (T,) int64 slots of the step's tokens (token-local storage writes there). Fresh prefills
    that attend their own K/V come first (int4 only: num_fresh_tokens under fresh_meta), then the `gathered`
    run. seq_writes: int4's per-sequence writes (None: write by slot); window_left: an eviction window that
    narrows every layer's attention window."""

    slot_mapping: torch.Tensor
    num_fresh_tokens: int
    fresh_meta: AttentionMetadata | None
    gathered: GatheredRun | None
    seq_writes: tuple[SeqWrite | None, ...] | None = None
    window_left: int | None = None

    def write(
        self, cache: PagedKVCache, store: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor
    ) -> None:
        if self.seq_writes is None:
            cache.write_slots(store, k, v, self.slot_mapping)
            return
        for w in self.seq_writes:  # int4: quantize-on-write per sequence, through its window slot
            w.new_num_quantized = cache.quantizer.write(
                store,
                k[w.row_start : w.row_end],
                v[w.row_start : w.row_end],
                w.block_table,
                w.start,
                w.num_quantized,
                w.window_slot,
            )

    def attend(
        self,
        cache: PagedKVCache,
        store: dict[str, torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window_size: tuple[int, int],
    ) -> torch.Tensor:
        if self.window_left is not None:
            left = self.window_left if window_size[0] < 0 else min(window_size[0], self.window_left)
            window_size = (left, window_size[1])
        out = torch.empty_like(q)
        end = self.num_fresh_tokens
        if self.fresh_meta is not None:
            out[:end] = attend_fresh(q[:end], k[:end], v[:end], self.fresh_meta, window_size)
        if self.gathered is not None:
            out[end:] = gathered_attention(cache, store, q[end:], self.gathered, self.seq_writes, window_size)
        return out


def gathered_attention(
    cache,
    store: dict[str, torch.Tensor],
    q: torch.Tensor,
    run: GatheredRun,
    seq_writes,
    window_size: tuple[int, int],
) -> torch.Tensor:
    """q (Tq, Hq, D): the run's queries -> (Tq, Hq, D). `cache` is the PagedKVCache (already written)."""
    use_kernel = q.is_cuda if INT4_DECODE_KERNEL is None else INT4_DECODE_KERNEL
    if run.kv_slots is None and run.mass is None and run.meta.max_seqlen_q == 1 and use_kernel:
        return _int4_decode(cache, store, q, run, seq_writes, window_size)
    if run.kv_slots is not None:
        keys, values = cache.read_slots(store, run.kv_slots, q.dtype)  # (Tk, Hkv, D)
    else:
        parts = [
            cache.quantizer.read(
                store,
                seq_writes[i].block_table,
                length,
                seq_writes[i].new_num_quantized,
                seq_writes[i].window_slot,
                q.dtype,
            )
            for i, length in run.reads
        ]
        keys = torch.cat([k for k, _ in parts])
        values = torch.cat([v for _, v in parts])
    m = run.meta
    out = flash_attn_varlen_func(
        q,
        keys,
        values,
        m.cu_seqlens_q,
        m.cu_seqlens_k,
        m.max_seqlen_q,
        m.max_seqlen_k,
        causal=True,
        window_size=window_size,
    )
    if run.mass is not None:
        _accumulate_mass(run, q, keys)
    return out


def _int4_decode(cache, store, q, run: GatheredRun, seq_writes, window_size) -> torch.Tensor:
    """One query per sequence over int4 pages and window, dequantized in the Triton kernel: (B, Hq, D)."""
    from longreach.attention.triton_decode_int4 import (  # lazy: optional heavy dependency (triton)
        paged_decode_attention_int4,
    )

    writes = [seq_writes[i] for i, _ in run.reads]
    table = torch.nn.utils.rnn.pad_sequence([w.block_table for w in writes], batch_first=True)

    def int32(values):
        return torch.tensor(values, dtype=torch.int32, device=q.device)

    return paged_decode_attention_int4(
        q,
        store,
        table.to(torch.int32),
        int32([n for _, n in run.reads]),
        int32([w.new_num_quantized for w in writes]),
        int32([w.window_slot for w in writes]),
        cache.quantizer.group_size,
        window_size=window_size,
    )


def _accumulate_mass(run: GatheredRun, q: torch.Tensor, keys: torch.Tensor) -> None:
    cu_q, cu_k = run.meta.cu_seqlens_q.tolist(), run.meta.cu_seqlens_k.tolist()
    for i, (q_pos, k_pos) in enumerate(zip(run.query_positions, run.key_positions)):
        q_i, k_i = q[cu_q[i] : cu_q[i + 1]], keys[cu_k[i] : cu_k[i + 1]]  # (n, Hq, D), (K, Hkv, D)
        q_pos, k_pos = q_pos.to(q.device), k_pos.to(q.device)
        rows = max(1, MASS_CHUNK_ELEMENTS // max(q_i.shape[1] * k_i.shape[0], 1))
        mass = sum(
            key_attention_mass(q_i[j : j + rows], k_i, q_pos[j : j + rows], k_pos)
            for j in range(0, q_i.shape[0], rows)
        )  # (K,) fp32
        run.mass[i] = mass if run.mass[i] is None else run.mass[i] + mass
