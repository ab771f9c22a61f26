"""The Triton backend with block-sparse layouts (BigBird, Longformer): outputs and gradients against the
reference with the same layout, under FlashAttention's test rule; empty layout cells are skipped, not masked.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on small sizes in fp16/fp32; the
larger grid, bf16 included, is marked `gpu`.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from _ref_rule import check_all, reference_varlen, run, truth_and_same_precision  # noqa: E402

import longreach.attention as attn  # noqa: E402
from longreach.attention import masks, triton_flash  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(
    not (ON_GPU or triton_flash.INTERPRET),
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)

FULL, CAUSAL, WINDOW, CAUSAL_WINDOW = (False, (-1, -1)), (True, (-1, -1)), (False, (37, 5)), (True, (50, -1))
MHA, GQA, MQA = (2, 2), (4, 2), (3, 1)
F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
# name -> layout over n tokens. 16-token blocks run 16x16 kernel tiles; with 32-token blocks the interpreter's
# 32x16 / 16x32 tiles each cover half a layout block, so partial tiles are read in slices
LAYOUTS = {
    "bigbird16": lambda n: masks.bigbird_layout(n, block_size=16, num_random_blocks=2, seed=0),
    "bigbird32": lambda n: masks.bigbird_layout(n, block_size=32, num_random_blocks=1, seed=1),
    "longformer32": lambda n: masks.longformer_layout(
        n, window=20, global_tokens=[0, 37, n - 3], block_size=32
    ),
    "bigbird64": lambda n: masks.bigbird_layout(n, block_size=64, num_random_blocks=3, seed=2),
    "longformer64": lambda n: masks.longformer_layout(
        n, window=200, global_tokens=[0, 100, n // 2], block_size=64
    ),
    "longformer128": lambda n: masks.longformer_layout(
        n, window=300, global_tokens=[7, n - 1], block_size=128
    ),
}

# (layout, head_dim, seqlens_q, seqlens_k, heads, mask, dtype): packed batches of unequal lengths, and one
# whose queries are fewer than its keys (the layout's rows are query positions, the band bottom-right aligned)
CPU_GRID = [
    ("bigbird16", 32, [96], [96], MHA, FULL, F32),
    ("bigbird16", 80, [64, 40], [64, 40], GQA, CAUSAL_WINDOW, F16),
    ("bigbird32", 32, [70, 45, 100], [70, 45, 100], GQA, CAUSAL, F16),
    ("bigbird32", 80, [50, 90], [70, 90], MQA, CAUSAL, F32),
    ("longformer32", 32, [100], [100], GQA, WINDOW, F32),
    ("longformer32", 80, [70, 45, 100], [70, 45, 100], MHA, FULL, F16),
    ("longformer32", 32, [40, 96], [80, 96], MQA, CAUSAL, F16),
]


def _case_id(case):
    name, d, sq, sk, (hq, hkv), (causal, window), dtype = case
    return (
        f"{name}-d{d}-{'+'.join(map(str, sq))}x{'+'.join(map(str, sk))}-h{hq}/{hkv}-"
        f"{'causal' if causal else 'full'}-w{window[0]},{window[1]}-{str(dtype)[6:]}"
    )


def _cu(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)


def _inputs(seqlens_q, seqlens_k, heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(seqlens_q), heads[0], head_dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(sum(seqlens_k), heads[1], head_dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(sum(seqlens_k), heads[1], head_dim, generator=g).to(DEVICE, dtype)
    return q, k, v, torch.randn(q.shape, generator=g).to(DEVICE)


def _check_case(name, head_dim, seqlens_q, seqlens_k, heads, mask, dtype):
    (causal, window), cu_q, cu_k = mask, _cu(seqlens_q), _cu(seqlens_k)
    layout = LAYOUTS[name](max(seqlens_q + seqlens_k))
    q, k, v, dout = _inputs(seqlens_q, seqlens_k, heads, head_dim, dtype)

    def ours(q, k, v):
        return triton_flash.varlen_attention(
            q,
            k,
            v,
            cu_q,
            cu_k,
            max(seqlens_q),
            max(seqlens_k),
            causal=causal,
            window_size=window,
            return_lse=True,
            layout=layout,
        )

    got = run(ours, q, k, v, dout)
    truth, same = truth_and_same_precision(
        q, k, v, dout, reference_varlen(cu_q, cu_k, causal=causal, window_size=window, layout=layout)
    )
    check_all(_case_id((name, head_dim, seqlens_q, seqlens_k, heads, mask, dtype)), got, truth, same)


@pytest.mark.parametrize("case", CPU_GRID, ids=_case_id)
def test_layout_matches_reference(case):
    _check_case(*case)


@pytest.mark.parametrize("causal", [False, True])
def test_empty_cells_are_skipped_not_masked(causal):
    # Query block 2 and key block 3 are empty in every cell. NaN in their q / dO and k / v rows would reach the
    # results through 0 * NaN if those tiles were computed and masked; skipped, they leave the exact answer
    # of clean inputs: rows that see nothing output 0, keys nobody sees get zero gradients.
    bs, n = 32, 128
    base = masks.longformer_layout(n, window=20, global_tokens=[5, 40], block_size=bs)
    blocks, tile_index = base.blocks.clone(), base.tile_index.clone()
    blocks[2, :] = False
    blocks[:, 3] = False
    tile_index[~blocks] = -1
    layout = masks.BlockSparseLayout(bs, blocks, tile_index, base.tiles)
    assert base.blocks[2].any() and base.blocks[:, 3].any() and (tile_index >= 0).any()
    cu = _cu([n])
    q, k, v, dout = _inputs([n], [n], GQA, 32, F32)
    rows, keys = slice(2 * bs, 3 * bs), slice(3 * bs, 4 * bs)
    poisoned = [t.clone() for t in (q, k, v, dout)]
    poisoned[0][rows] = float("nan")
    poisoned[1][keys] = float("nan")
    poisoned[2][keys] = float("nan")
    poisoned[3][rows] = float("nan")

    def ours(q, k, v):
        return triton_flash.varlen_attention(
            q, k, v, cu, cu, n, n, causal=causal, return_lse=True, layout=layout
        )

    got = run(ours, *poisoned)
    truth, same = truth_and_same_precision(
        q, k, v, dout, reference_varlen(cu, cu, causal=causal, layout=layout)
    )
    check_all(f"skip-causal={causal}", got, truth, same)
    out, lse, dq, dk, dv = got
    assert (out[rows] == 0).all() and torch.isneginf(lse[:, rows]).all() and (dq[rows] == 0).all()
    assert (dk[keys] == 0).all() and (dv[keys] == 0).all()


@pytest.mark.parametrize("block_size", [8, 24, 40])
def test_layout_block_size_must_be_a_multiple_of_16(block_size):
    layout = masks.bigbird_layout(64, block_size=block_size, num_random_blocks=0)
    q = torch.randn(64, 2, 32, device=DEVICE)
    cu = _cu([64])
    with pytest.raises(ValueError, match=f"layout block size {block_size} is not a multiple of 16"):
        triton_flash.varlen_attention(q, q, q, cu, cu, 64, 64, layout=layout)


def test_layout_must_cover_the_longest_sequence():
    layout = masks.bigbird_layout(64, block_size=32, num_random_blocks=0)
    q = torch.randn(100, 2, 32, device=DEVICE)
    cu = _cu([100])
    with pytest.raises(
        ValueError, match=r"layout has 2x2 blocks of 32 but sequences up to 100x100 tokens need 4x4"
    ):
        triton_flash.varlen_attention(q, q, q, cu, cu, 100, 100, layout=layout)


@pytest.mark.parametrize("block_size", [16, 32, 48, 64, 128, 256])
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_layout_configs_divide_the_block_and_fit_every_head_dim(kind, block_size):
    configs = triton_flash._launcher(kind, block_size).configs
    assert all(
        block_size % c.kwargs["BLOCK_M"] == 0 and block_size % c.kwargs["BLOCK_N"] == 0 for c in configs
    )
    for block_d in (16, 32, 64, 128, 256):
        for elt in (2, 4):
            assert any(triton_flash._fits(kind, c, block_d, elt) for c in configs), (kind, block_d, elt)


def test_flash_api_runs_layouts_on_the_triton_backend():
    # through flash_attn_func, the triton backend takes the layout and agrees with the tiled one
    assert attn._supports_layout("triton")
    layout = LAYOUTS["longformer32"](64)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 64, 2, 32, generator=g).to(DEVICE) for _ in range(3))
    got = attn.flash_attn_func(q, k, v, causal=True, backend="triton", layout=layout)
    expected = attn.flash_attn_func(q, k, v, causal=True, backend="tiled", layout=layout)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ GPU grid


def _gpu_grid():
    cases = []
    for dtype in (BF16, F16, F32):
        for d in (64, 128):
            group = pytest.mark.xdist_group(f"sparse-{str(dtype)[6:]}-d{d}")  # one compile set per worker
            for name, lengths, heads, mask in (
                ("bigbird64", ([1000, 517, 2048], [1000, 517, 2048]), GQA, CAUSAL),
                ("bigbird64", ([2048], [2048]), MHA, FULL),
                ("longformer64", ([1500, 700], [2000, 700]), MQA, CAUSAL_WINDOW),
                ("longformer64", ([2048, 999], [2048, 999]), GQA, WINDOW),
                ("longformer128", ([2048, 300], [2048, 300]), GQA, CAUSAL),
            ):
                cases.append(pytest.param((name, d, *lengths, heads, mask, dtype), marks=group))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("case", _gpu_grid(), ids=lambda p: _case_id(p))
def test_layout_matches_reference_gpu(case):
    _check_case(*case)


@pytest.mark.gpu
def test_auto_backend_picks_triton_for_layouts_on_cuda():
    q = torch.zeros(64, 2, 32, device="cuda")
    cu = _cu([64])
    assert attn.choose_backend(q, cu, cu, causal=True, layout=LAYOUTS["bigbird64"](64)) == "triton"
