"""The PyTorch paged decode (batched, the CPU serving path) against the per-sequence oracle: GQA/MQA, windows,
empty sequences, lse, int8 pages with their scales; and the PyTorch KV write."""

import pytest
import torch

from longreach.attention.paged import paged_decode_attention, paged_decode_attention_torch, write_kv_torch
from longreach.attention.reference import paged_decode_reference
from longreach.kvcache.codecs import quantize_int8


def _pages(heads, seqlens, head_dim=16, block_size=4, num_blocks=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = heads
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: len(seqlens) * 8].view(len(seqlens), 8).int()
    q = torch.randn(len(seqlens), num_heads, head_dim, generator=g)
    return q, k_cache, v_cache, tables, torch.tensor(seqlens, dtype=torch.int32)


@pytest.mark.parametrize("window", [(-1, -1), (5, 0)])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1), (8, 8)])
def test_batched_decode_matches_the_oracle(window, heads):
    q, k_cache, v_cache, tables, seqlens = _pages(heads, [1, 7, 16, 29, 0])
    got, got_lse = paged_decode_attention_torch(
        q, k_cache, v_cache, tables, seqlens, window_size=window, return_lse=True, workspace={}
    )
    want, want_lse = paged_decode_reference(
        q, k_cache, v_cache, tables, seqlens, window_size=window, return_lse=True
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[4], torch.zeros_like(got[4])) and torch.isinf(got_lse[4]).all()  # the empty one
    assert torch.equal(paged_decode_attention(q, k_cache, v_cache, tables, seqlens, window_size=window), got)


def test_int8_pages_are_dequantized_where_they_are_read():
    q, k_cache, v_cache, tables, seqlens = _pages((4, 2), [3, 17, 30])
    k_codes, k_scale = quantize_int8(k_cache)
    v_codes, v_scale = quantize_int8(v_cache)
    got = paged_decode_attention_torch(q, k_codes, v_codes, tables, seqlens, k_scale=k_scale, v_scale=v_scale)
    want = paged_decode_reference(q, k_codes, v_codes, tables, seqlens, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lengths_past_the_block_table_are_refused():
    q, k_cache, v_cache, tables, _ = _pages((4, 2), [3, 5])
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 40 is outside 0..32"):
        paged_decode_attention_torch(q, k_cache, v_cache, tables, torch.tensor([3, 40], dtype=torch.int32))


def test_write_kv_places_tokens_in_their_slots_and_skips_negative_ones():
    k_cache, v_cache = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    write_kv_torch(k, v, k_cache, v_cache, torch.tensor([9, 2, -1, 3]))
    assert (
        torch.equal(k_cache[2, 1], k[0])
        and torch.equal(v_cache[0, 2], v[1])
        and torch.equal(k_cache[0, 3], k[3])
    )
    assert int((k_cache != 0).sum()) == int((k[[0, 1, 3]] != 0).sum())  # nothing written elsewhere
    with pytest.raises(ValueError, match="slot 12 but the cache has 12 slots"):
        write_kv_torch(k[:1], v[:1], k_cache, v_cache, torch.tensor([12]))
