"""Mask kinds as data: token-level conventions and block-sparse layouts (window, documents, BigBird, Longformer)."""

from __future__ import annotations

import pytest
import torch

from longreach.attention import AttentionMetadata, masks


def test_visible_mask_is_bottom_right_with_windows():
    # Sq=2, Sk=4: query 0 sits at key position 2, query 1 at 3
    causal = masks.visible_mask(2, 4, causal=True)
    assert causal.tolist() == [[True, True, True, False], [True, True, True, True]]
    window = masks.visible_mask(2, 4, causal=False, window_size=(1, 0))
    assert window.tolist() == [[False, True, True, False], [False, False, True, True]]
    right_only = masks.visible_mask(3, 3, causal=False, window_size=(-1, 1))
    assert right_only.tolist() == [[True, True, False], [True, True, True], [True, True, True]]
    # causal overrides the right side of a window, as in FlashAttention
    assert torch.equal(masks.visible_mask(5, 5, True, (2, 3)), masks.visible_mask(5, 5, False, (2, 0)))


def test_document_mask_matches_per_sequence_masks():
    meta = AttentionMetadata.from_seqlens([3, 0, 4], [5, 2, 4])
    mask = masks.document_mask(meta.cu_seqlens_q, meta.cu_seqlens_k, causal=True, window_size=(2, -1))
    assert mask.shape == (7, 11)
    expected = torch.zeros(7, 11, dtype=torch.bool)
    expected[0:3, 0:5] = masks.visible_mask(3, 5, True, (2, -1))
    expected[3:7, 7:11] = masks.visible_mask(4, 4, True, (2, -1))
    assert torch.equal(mask, expected)
    assert masks.document_ids(meta.cu_seqlens_q).tolist() == [0, 0, 0, 2, 2, 2, 2]


@pytest.mark.parametrize("block_size", [4, 7, 16])
def test_layout_round_trip_of_a_random_mask(block_size):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(37, 29, generator=g) < 0.2
    mask[:, :5] = False
    mask[20:] = True
    layout = masks.BlockSparseLayout.from_dense(mask, block_size)
    assert torch.equal(layout.to_dense(37, 29), mask)
    dense_blocks = torch.nn.functional.pad(mask, (0, -29 % block_size, 0, -37 % block_size))
    dense_blocks = dense_blocks.view(layout.num_q_blocks, block_size, layout.num_k_blocks, block_size)
    assert torch.equal(layout.blocks, dense_blocks.any(3).any(1))  # exactly the non-empty blocks
    assert layout.tiles.shape[0] == int((layout.tile_index >= 0).sum())


@pytest.mark.parametrize(
    "sq,sk,window,causal",
    [
        (100, 100, (16, 0), False),
        (64, 150, (20, 5), False),
        (150, 64, (-1, -1), True),
        (96, 96, (10, 30), True),
    ],
)
def test_sliding_window_layout_matches_token_mask(sq, sk, window, causal):
    layout = masks.sliding_window_layout(sq, sk, window, causal, block_size=16)
    assert torch.equal(layout.to_dense(sq, sk), masks.visible_mask(sq, sk, causal, window))


def test_window_layout_grows_linearly():
    small = masks.sliding_window_layout(1024, 1024, (127, 0), block_size=32)
    large = masks.sliding_window_layout(4096, 4096, (127, 0), block_size=32)
    # each query block touches ceil(127/32) + 1 key blocks: 5 per row, minus the ragged start
    assert large.num_blocks - small.num_blocks == 5 * (128 - 32)
    assert large.density() < 0.05


def test_document_layout_matches_document_mask():
    meta = AttentionMetadata.from_seqlens([30, 7, 50, 13])
    layout = masks.document_layout(meta.cu_seqlens_q, causal=True, block_size=16)
    assert torch.equal(
        layout.to_dense(100, 100), masks.document_mask(meta.cu_seqlens_q, meta.cu_seqlens_k, True)
    )
    assert not layout.blocks[6, 0]  # rows of document 3 never see doc 0


def test_bigbird_layout_structure():
    layout = masks.bigbird_layout(16 * 20, block_size=16, num_random_blocks=3, seed=1)
    blocks = layout.blocks
    n = 20
    assert layout.tiles.shape[0] == 0  # purely block-level
    assert blocks[0].all() and blocks[-1].all()  # global rows
    assert blocks[:, 0].all() and blocks[:, -1].all()  # global columns
    idx = torch.arange(n)
    assert (
        blocks[idx[1:-1], idx[1:-1]].all()
        and blocks[idx[1:-1], idx[:-2]].all()
        and blocks[idx[1:-1], idx[2:]].all()
    )
    structural = (
        ((idx[:, None] - idx[None, :]).abs() <= 1)
        | (idx[:, None] % (n - 1) == 0)
        | (idx[None, :] % (n - 1) == 0)
    )
    random_per_row = (blocks & ~structural).sum(1)
    assert random_per_row[1:-1].tolist() == [3] * (n - 2)
    assert torch.equal(masks.bigbird_layout(320, 16, 3, seed=1).blocks, blocks)  # seeded
    assert not torch.equal(masks.bigbird_layout(320, 16, 3, seed=2).blocks, blocks)
    assert masks.bigbird_layout(100, block_size=8).num_q_blocks == 13  # ragged last block


def test_longformer_layout_matches_definition_and_tiles_only_partial_blocks():
    seqlen, window, global_tokens = 200, 9, [0, 77]
    layout = masks.longformer_layout(seqlen, window, global_tokens, block_size=16)
    i = torch.arange(seqlen)
    is_global = torch.zeros(seqlen, dtype=torch.bool)
    is_global[global_tokens] = True
    expected = ((i[:, None] - i[None, :]).abs() <= window) | is_global[:, None] | is_global[None, :]
    assert torch.equal(layout.to_dense(seqlen, seqlen), expected)
    assert (2 * window + 1) == int(expected[100].sum()) - 2  # 2w + 1 local keys + 2 globals
    # visited blocks are exactly the non-empty ones; untiled ("full") blocks are exactly the all-visible ones
    for qb in range(layout.num_q_blocks):
        for kb in range(layout.num_k_blocks):
            tile = expected[qb * 16 : (qb + 1) * 16, kb * 16 : (kb + 1) * 16]
            assert bool(layout.blocks[qb, kb]) == bool(tile.any())
            if tile.any():
                assert bool(layout.tile_index[qb, kb] < 0) == bool(tile.all())


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda: masks.bigbird_layout(64, block_size=0), r"block_size must be a positive int, got 0"),
        (lambda: masks.bigbird_layout(64, num_window_blocks=2), r"num_window_blocks must be odd .* got 2"),
        (lambda: masks.bigbird_layout(64, num_random_blocks=-1), r"num_random_blocks must be >= 0, got -1"),
        (lambda: masks.longformer_layout(64, window=-3), r"window must be >= 0, got -3"),
        (
            lambda: masks.longformer_layout(64, 4, global_tokens=[3, 64]),
            r"global token indices .* \[0, 64\).*\[3, 64\]",
        ),
        (
            lambda: masks.bigbird_layout(64, block_size=16).to_dense(100, 64),
            r"4x4 blocks of 16 cannot cover a 100x64",
        ),
    ],
)
def test_bad_layout_arguments(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()
