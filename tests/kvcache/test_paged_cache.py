"""Paged storage: `attend` over pages equals plain varlen attention on the same tokens, and the block count
follows each budget."""

import pytest
import torch

from longreach.attention import AttentionMetadata, flash_attn_varlen_func
from longreach.attention.paged import write_kv_torch
from longreach.config import CacheConfig
from longreach.kvcache.paged_cache import PagedBatch, PagedKVCache, num_blocks_for


def test_attend_over_pages_equals_plain_attention():
    """Two decodes, a fresh prefill and a chunk continuing a cached prefix, in one call."""
    g = torch.Generator().manual_seed(1)
    hq, hkv, d, bs = 4, 2, 8, 4
    cache = PagedKVCache(1, 20, bs, hkv, d)
    ctx = [6, 9, 0, 5]  # keys already cached per sequence
    new = [1, 1, 7, 3]  # this step's tokens (decodes first)
    tables = [[0, 1], [2, 3, 4], [5, 6], [7, 8]]
    full_k = [torch.randn(c + n, hkv, d, generator=g) for c, n in zip(ctx, new)]
    full_v = [torch.randn(c + n, hkv, d, generator=g) for c, n in zip(ctx, new)]

    def slots(table, start, end):
        return torch.tensor([table[p // bs] * bs + p % bs for p in range(start, end)])

    for b in range(4):  # earlier steps' keys
        if ctx[b]:
            write_kv_torch(
                full_k[b][: ctx[b]],
                full_v[b][: ctx[b]],
                cache.k_caches[0],
                cache.v_caches[0],
                slots(tables[b], 0, ctx[b]),
            )
    q = torch.randn(sum(new), hq, d, generator=g)
    k = torch.cat([full_k[b][ctx[b] :] for b in range(4)])
    v = torch.cat([full_v[b][ctx[b] :] for b in range(4)])
    batch = PagedBatch(
        slot_mapping=torch.cat([slots(tables[b], ctx[b], ctx[b] + new[b]) for b in range(4)]),
        num_decodes=2,
        decode_block_table=torch.tensor([tables[0] + [0], tables[1]], dtype=torch.int32),
        decode_seqlens=torch.tensor([7, 10], dtype=torch.int32),
        num_fresh_tokens=7,
        fresh_meta=AttentionMetadata.from_seqlens([7]),
        continued_meta=AttentionMetadata.from_seqlens([3], [8]),
        continued_kv_slots=slots(tables[3], 0, 8),
    )
    meta = AttentionMetadata.from_seqlens(new, [c + n for c, n in zip(ctx, new)])
    got = cache.bind(batch).attend(0, q, k, v, meta, (-1, -1))
    want = flash_attn_varlen_func(
        q,
        torch.cat(full_k),
        torch.cat(full_v),
        meta.cu_seqlens_q,
        meta.cu_seqlens_k,
        meta.max_seqlen_q,
        meta.max_seqlen_k,
        causal=True,
        backend="reference",
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_num_blocks_from_each_budget():
    cpu = torch.device("cpu")
    assert num_blocks_for(CacheConfig(num_blocks=7), 1000, cpu) == 7
    assert num_blocks_for(CacheConfig(kv_cache_memory=10_500), 1000, cpu) == 10
    assert num_blocks_for(CacheConfig(memory_fraction=0.5), 1000, cpu, max_useful_blocks=12) == 12
    with pytest.raises(ValueError, match="memory_fraction=1.5 must be in"):
        CacheConfig(memory_fraction=1.5)
    with pytest.raises(ValueError, match="block_size=0"):
        CacheConfig(block_size=0)
