"""The tiled backend: exact against the reference for block-sparse layouts, skips empty blocks,
keeps every intermediate O(block) in size and saves only (q, k, v, out, lse) for backward."""

from __future__ import annotations

import pytest
import torch
from _ref_rule import check_all, reference_varlen, run, truth_and_same_precision

from longreach.attention import (
    AttentionMetadata,
    flash_attn_func,
    flash_attn_varlen_func,
    masks,
    reference,
    tiled,
)


def _qkv(total_q, total_k, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(total_q, hq, d, generator=g).to(dtype),
        torch.randn(total_k, hkv, d, generator=g).to(dtype),
        torch.randn(total_k, hkv, d, generator=g).to(dtype),
        torch.randn(total_q, hq, d, generator=g),
    )


SPARSE_CASES = {
    "bigbird": lambda n: masks.bigbird_layout(n, block_size=16, num_random_blocks=3, seed=0),
    "bigbird-r1-b32": lambda n: masks.bigbird_layout(n, block_size=32, num_random_blocks=1, seed=3),
    "longformer": lambda n: masks.longformer_layout(
        n, window=24, global_tokens=[0, 5, n // 2], block_size=32
    ),
    "window": lambda n: masks.sliding_window_layout(n, n, (40, 0), causal=False, block_size=16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", sorted(SPARSE_CASES))
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_layout_parity_and_skipping(pattern, causal, dtype):
    seqlens = [300, 141]  # two sequences, ragged last blocks
    n = max(seqlens)
    layout = SPARSE_CASES[pattern](n)
    meta = AttentionMetadata.from_seqlens(seqlens, causal=causal)
    q, k, v, dout = _qkv(sum(seqlens), sum(seqlens), 4, 2, 32, dtype)
    args = (meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k)
    truth, same = truth_and_same_precision(
        q, k, v, dout, reference_varlen(meta.cu_seqlens_q, meta.cu_seqlens_k, causal=causal, layout=layout)
    )
    stats = {}
    got = run(
        lambda a, b, c: tiled.varlen_attention(
            a, b, c, *args, causal=causal, return_lse=True, layout=layout, stats=stats
        ),
        q,
        k,
        v,
        dout,
    )
    check_all(f"tiled {pattern}", got, truth, same)
    # visited blocks: the layout's non-empty blocks (within each sequence, and inside the causal band)
    expected = 0
    for length in seqlens:
        nb = -(-length // layout.block_size)
        visible = layout.blocks[:nb, :nb]
        if causal:
            visible = visible & torch.ones(nb, nb, dtype=torch.bool).tril()
        expected += int(visible.sum())
    assert stats["visited_blocks"] == expected < stats["total_blocks"]
    # through the public entry point (auto -> tiled) and the SDPA explicit-mask comparison path
    out = flash_attn_varlen_func(q, k, v, *args, causal=causal, layout=layout)
    torch.testing.assert_close(out, got[0], atol=0, rtol=0)
    out_sdpa = flash_attn_varlen_func(q, k, v, *args, causal=causal, layout=layout, backend="sdpa")
    assert (out_sdpa.float() - truth[0].float()).abs().max() <= 2 * (
        same[0].float() - truth[0].float()
    ).abs().max() + 1e-5


def test_blocks_skipped_for_causal_window_and_documents():
    q, k, v, _ = _qkv(1024, 1024, 2, 2, 16, torch.float32)
    cu = torch.tensor([0, 1024], dtype=torch.int32)
    stats = {}
    tiled.varlen_attention(q, k, v, cu, cu, causal=True, block_size=128, stats=stats)
    assert stats == {"visited_blocks": 8 * 9 // 2, "total_blocks": 64}
    stats = {}
    tiled.varlen_attention(q, k, v, cu, cu, causal=True, window_size=(200, 0), block_size=128, stats=stats)
    assert stats["visited_blocks"] == 1 + 2 + 3 * 6  # each row block spans at most 3 key blocks
    stats = {}
    docs = torch.tensor(
        [0, 256, 512, 1024], dtype=torch.int32
    )  # document mask: cross-document blocks skipped
    tiled.varlen_attention(q, k, v, docs, docs, causal=True, block_size=128, stats=stats)
    assert stats["visited_blocks"] == 3 + 3 + 10
    # decode-style: one query against 1000 keys with a window touches only the last blocks
    stats = {}
    tiled.varlen_attention(
        q[:1],
        k[:1000],
        v[:1000],
        torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([0, 1000], dtype=torch.int32),
        causal=True,
        window_size=(100, 0),
        block_size=64,
        stats=stats,
    )
    assert stats["visited_blocks"] == 2


@pytest.mark.parametrize("block_size,chunk_blocks", [(16, 1), (50, 3), (128, 16), (1024, 1)])
def test_block_size_and_chunking_do_not_change_results(block_size, chunk_blocks):
    meta = AttentionMetadata.from_seqlens([257, 100], [300, 100], causal=True)
    q, k, v, dout = _qkv(357, 400, 6, 2, 24, torch.float32, seed=3)
    args = (meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k)
    expected = run(
        lambda a, b, c: reference.varlen_attention(
            a, b, c, *args, causal=True, window_size=(70, -1), return_lse=True
        ),
        q,
        k,
        v,
        dout,
    )
    got = run(
        lambda a, b, c: tiled.varlen_attention(
            a,
            b,
            c,
            *args,
            causal=True,
            window_size=(70, -1),
            return_lse=True,
            block_size=block_size,
            chunk_blocks=chunk_blocks,
        ),
        q,
        k,
        v,
        dout,
    )
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-5)


def test_document_layout_on_packed_sequence_equals_varlen():
    """The same document mask expressed two ways: cu_seqlens (per-sequence loop) and a block-sparse layout."""
    meta = AttentionMetadata.from_seqlens([100, 37, 120])
    q, k, v, _ = _qkv(257, 257, 4, 4, 32, torch.float32)
    varlen = tiled.varlen_attention(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, causal=True)
    layout = masks.document_layout(meta.cu_seqlens_q, causal=True, block_size=32)
    whole = torch.tensor([0, 257], dtype=torch.int32)
    stats = {}
    packed = tiled.varlen_attention(q, k, v, whole, whole, causal=True, layout=layout, stats=stats)
    torch.testing.assert_close(packed, varlen, atol=1e-6, rtol=1e-5)
    assert stats["visited_blocks"] == layout.num_blocks < 9 * 10 // 2


def test_intermediates_stay_block_sized(monkeypatch):
    """Peak working set is O(N * block): no matmul result grows with the sequence length."""
    sizes = []
    real_bmm, real_baddbmm = torch.bmm, torch.baddbmm

    def bmm(*a, **kw):
        out = real_bmm(*a, **kw)
        sizes.append(out.numel())
        return out

    def baddbmm(*a, **kw):
        out = real_baddbmm(*a, **kw)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "bmm", bmm)
    monkeypatch.setattr(torch, "baddbmm", baddbmm)
    for n in (1024, 2048):
        sizes.clear()
        q, k, v, dout = _qkv(n, n, 4, 2, 16, torch.float32)
        cu = torch.tensor([0, n], dtype=torch.int32)
        q.requires_grad_()
        out = tiled.varlen_attention(q, k, v, cu, cu, causal=True, block_size=64, chunk_blocks=8)
        out.backward(dout)
        assert max(sizes) == 4 * 64 * 8 * 64  # (Hq, block, chunk_blocks * block)


def test_backward_saves_only_inputs_output_and_lse():
    q, k, v, _ = _qkv(300, 300, 4, 2, 16, torch.bfloat16)
    q.requires_grad_()
    cu = torch.tensor([0, 300], dtype=torch.int32)
    out = tiled.varlen_attention(q, k, v, cu, cu, causal=True)
    saved = [t.shape for t in out.grad_fn.saved_tensors]
    assert saved == [q.shape, k.shape, v.shape, out.shape, (4, 300), cu.shape, cu.shape]


def test_gqa_groups_heads_without_repeating_kv():
    """Query heads 2h and 2h+1 read KV head h: swapping KV heads swaps the matching output heads."""
    q, k, v, _ = _qkv(64, 64, 4, 2, 16, torch.float32)
    out = flash_attn_func(q[None], k[None], v[None], causal=True, backend="tiled")[0]
    swapped = flash_attn_func(
        q[None][:, :, [2, 3, 0, 1]],
        k[None][:, :, [1, 0]],
        v[None][:, :, [1, 0]],
        causal=True,
        backend="tiled",
    )[0]
    torch.testing.assert_close(swapped, out[:, [2, 3, 0, 1]])


def test_tiled_rejects_block_size_that_disagrees_with_layout():
    layout = masks.bigbird_layout(64, block_size=16)
    q, k, v, _ = _qkv(64, 64, 2, 2, 16, torch.float32)
    cu = torch.tensor([0, 64], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_size 32 differs from the layout's block size 16"):
        tiled.varlen_attention(q, k, v, cu, cu, layout=layout, block_size=32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["tiled", "sdpa", "reference"])
def test_bf16_autocast_does_not_change_results(backend, dtype):
    """Training runs under bf16 autocast; the backends' fp32 math must not be downcast by it."""
    q, k, v, _ = _qkv(200, 200, 4, 2, 32, dtype)
    args = (q[None], k[None], v[None])
    plain = flash_attn_func(*args, causal=True, window_size=(50, -1), backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = flash_attn_func(*args, causal=True, window_size=(50, -1), backend=backend)
    torch.testing.assert_close(under_autocast, plain, atol=0, rtol=0)
