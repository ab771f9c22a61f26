"""int8 KV decode through `PagedKVCache`: the cache hands the int8 pages and their scales to the paged decode as
they are; the Triton kernel (the CUDA route, run here under TRITON_INTERPRET=1) dequantizes them in the kernel
and matches the batched PyTorch route (the CPU one), which dequantizes the rows it gathers."""

import pytest
import torch

from longreach.attention import AttentionMetadata
from longreach.kvcache import paged_cache
from longreach.kvcache.paged_cache import PagedBatch, PagedKVCache
from longreach.kvcache.quant import Int8KV

pytest.importorskip("triton")
from longreach.attention import triton_decode, triton_flash  # noqa: E402


@pytest.mark.skipif(
    not triton_flash.INTERPRET, reason="runs the kernel on CPU tensors: needs TRITON_INTERPRET=1"
)
@pytest.mark.parametrize("window", [(-1, -1), (6, 0)])
def test_int8_decode_reads_pages_in_kernel(window, monkeypatch):
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs, lengths = 4, 2, 32, 4, [9, 3, 14]  # lengths after this step's token
    cache = PagedKVCache(1, 16, bs, hkv, d, quantizer=Int8KV())
    store = cache.stores[0]
    tables = torch.randperm(16, generator=g)[:12].view(3, 4).int()
    slots = torch.cat(
        [tables[b, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs for b, n in enumerate(lengths)]
    )
    cache.quantizer.write_slots(
        store,
        torch.randn(len(slots), hkv, d, generator=g),
        torch.randn(len(slots), hkv, d, generator=g),
        slots,
    )  # earlier steps' keys
    q = torch.randn(3, hq, d, generator=g)
    k, v = torch.randn(3, hkv, d, generator=g), torch.randn(3, hkv, d, generator=g)  # this step's tokens
    last = torch.tensor([tables[b, (n - 1) // bs] * bs + (n - 1) % bs for b, n in enumerate(lengths)])
    batch = PagedBatch(
        slot_mapping=last,
        num_decodes=3,
        decode_block_table=tables,
        decode_seqlens=torch.tensor(lengths, dtype=torch.int32),
        num_fresh_tokens=0,
        fresh_meta=None,
        continued_meta=None,
        continued_kv_slots=None,
    )
    meta = AttentionMetadata.from_seqlens([1] * 3, lengths)
    want = cache.bind(batch).attend(0, q, k, v, meta, window)  # CPU: batched PyTorch

    calls = []

    def kernel(q, k_cache, v_cache, block_table, cache_seqlens, workspace=None, **kwargs):
        calls.append((k_cache, v_cache, kwargs["k_scale"], kwargs["v_scale"]))
        return triton_decode.paged_decode_attention(q, k_cache, v_cache, block_table, cache_seqlens, **kwargs)

    monkeypatch.setattr(paged_cache, "paged_decode_attention", kernel)  # the CUDA route
    got = cache.bind(batch).attend(0, q, k, v, meta, window)
    assert [tuple(map(id, c)) for c in calls] == [
        tuple(id(store[n]) for n in ("k", "v", "k_scale", "v_scale"))
    ]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
