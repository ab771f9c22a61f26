"""Paged decode attention (PyTorch and Triton split-K) and write_kv against the reference.

Each case builds caches whose blocks are handed out in shuffled order, gathers every sequence's K/V
back into contiguous THD tensors, and compares with `reference.varlen_attention` (one query per
sequence, causal, so it sees the whole cache or its window) under FlashAttention's test rule.
"""

from __future__ import annotations

import pytest
import torch
from _ref_rule import check, max_err

from longreach.attention import paged, reference
from longreach.kvcache.quant import dequantize_int8, quantize_int8

triton = pytest.importorskip("triton")
from longreach.attention import triton_decode, triton_flash  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
CAN_RUN_TRITON = ON_GPU or triton_flash.INTERPRET
needs_triton = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16


def _make_cache(lengths, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, spare_blocks=3):
    """Random caches with shuffled block ids; returns q, k_cache, v_cache, block_table, cache_seqlens."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    width = max(1, -(-max(lengths) // block_size)) + 1  # one unused column past the longest
    num_blocks = batch * width + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    block_table = (
        torch.randperm(num_blocks, generator=g)[: batch * width].view(batch, width).to(DEVICE, torch.int32)
    )
    q = torch.randn(batch, num_heads, head_dim, generator=g).to(DEVICE, dtype)
    return q, k_cache, v_cache, block_table, torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


def _gather(k_cache, v_cache, block_table, lengths):
    """Contiguous (total_k, Hkv, D) K and V in sequence order."""
    block_size = k_cache.shape[1]
    keys, values = [], []
    for b, length in enumerate(lengths):
        pos = torch.arange(length, device=k_cache.device)
        blocks = block_table[b, pos // block_size].long()
        keys.append(k_cache[blocks, pos % block_size])
        values.append(v_cache[blocks, pos % block_size])
    return torch.cat(keys), torch.cat(values)


def _check_decode(
    fn, lengths, num_heads, num_kv_heads, head_dim, block_size, dtype, window=(-1, -1), **kwargs
):
    q, k_cache, v_cache, block_table, seqlens = _make_cache(
        lengths, num_heads, num_kv_heads, head_dim, block_size, dtype
    )
    out, lse = fn(q, k_cache, v_cache, block_table, seqlens, window_size=window, return_lse=True, **kwargs)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (len(lengths), num_heads)
    k, v = _gather(k_cache, v_cache, block_table, lengths)
    cu_q = torch.arange(len(lengths) + 1, dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)
    high = torch.float64 if dtype == F32 else F32

    def ref(q, k, v, upcast):
        return reference.varlen_attention(
            q, k, v, cu_q, cu_k, causal=True, window_size=window, return_lse=True, upcast=upcast
        )

    truth_out, truth_lse = ref(q.to(high), k.to(high), v.to(high), True)
    same_out, same_lse = ref(q, k, v, False)
    tag = f"lengths={lengths} h{num_heads}/{num_kv_heads} d{head_dim} block={block_size} {dtype} window={window}"
    check(f"{tag} out", out, truth_out, same_out)
    check(f"{tag} lse", lse, truth_lse.T, same_lse.T)


# (lengths, Hq, Hkv, D, block_size, dtype, window): lengths off the block grid, an empty sequence,
# a single token, GQA/MQA/MHA, odd head dims, windows shorter than a split.
CASES = [
    ([1, 17, 100, 257], 8, 2, 64, 16, F32, (-1, -1)),
    ([0, 33, 70], 4, 4, 59, 16, F16, (-1, -1)),
    ([130, 9], 6, 1, 80, 32, F32, (40, -1)),
    ([64, 200], 4, 2, 32, 16, F16, (100, 0)),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_size", [None, 1, 5])
def test_torch_matches_reference(case, block_size):
    lengths, hq, hkv, d, bs, dtype, window = case
    _check_decode(paged.paged_decode_attention_torch, lengths, hq, hkv, d, block_size or bs, dtype, window)


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_matches_reference(case, num_splits):
    lengths, hq, hkv, d, bs, dtype, window = case
    _check_decode(
        triton_decode.paged_decode_attention, lengths, hq, hkv, d, bs, dtype, window, num_splits=num_splits
    )


@needs_triton
def test_triton_odd_block_size_and_default_splits():
    # block size 5 and the split heuristic (several splits over 300 tokens on any device)
    _check_decode(triton_decode.paged_decode_attention, [300, 1, 77], 4, 2, 32, 5, F32)
    _check_decode(triton_decode.paged_decode_attention, [300, 45], 4, 2, 32, 16, F16, num_splits=8)


def _slots(num_tokens, num_slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=g)[:num_tokens]
    slots[::4] = -1  # padding tokens are skipped
    return slots.to(DEVICE)


@pytest.mark.parametrize(
    "writer",
    [paged.write_kv_torch, pytest.param(triton_decode.write_kv, marks=needs_triton)],
    ids=["torch", "triton"],
)
@pytest.mark.parametrize("block_size", [16, 5])
def test_write_kv_round_trip(writer, block_size):
    num_blocks, hkv, d, tokens = 6, 3, 40, 23
    g = torch.Generator().manual_seed(3)
    k = torch.randn(tokens, hkv, d, generator=g).to(DEVICE, F16)
    v = torch.randn(tokens, hkv, d, generator=g).to(DEVICE, F16)
    k_cache = torch.full((num_blocks, block_size, hkv, d), 7.0, dtype=F16, device=DEVICE)
    v_cache = k_cache.clone()
    slots = _slots(tokens, num_blocks * block_size)
    writer(k, v, k_cache, v_cache, slots)
    keep = slots >= 0
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[slots[keep]], k[keep]) and torch.equal(flat_v[slots[keep]], v[keep])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots[keep]] = False
    assert (flat_k[untouched] == 7.0).all() and (flat_v[untouched] == 7.0).all()


def test_write_then_decode_matches_contiguous_attention():
    # a prefill written through write_kv, then decoded: the same as attention over the contiguous K/V
    lengths, hkv, d, block_size = [37, 20], 2, 32, 8
    g = torch.Generator().manual_seed(5)
    k = torch.randn(sum(lengths), hkv, d, generator=g).to(DEVICE)
    v = torch.randn(sum(lengths), hkv, d, generator=g).to(DEVICE)
    q = torch.randn(len(lengths), 4, d, generator=g).to(DEVICE)
    k_cache = torch.zeros(12, block_size, hkv, d, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    block_table = torch.tensor([[3, 0, 7, 9, 11], [5, 1, 2, 4, 6]], dtype=torch.int32, device=DEVICE)
    slots = torch.cat(
        [
            block_table[b, torch.arange(n, device=DEVICE) // block_size].long() * block_size
            + torch.arange(n, device=DEVICE) % block_size
            for b, n in enumerate(lengths)
        ]
    )
    paged.write_kv(k, v, k_cache, v_cache, slots)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = paged.paged_decode_attention(q, k_cache, v_cache, block_table, seqlens)
    cu_k = torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)
    cu_q = torch.arange(3, dtype=torch.int32, device=DEVICE)
    ref = reference.varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    assert max_err(out, ref) < 1e-5


def test_dispatch_uses_torch_on_cpu():
    q, k_cache, v_cache, block_table, seqlens = (t.cpu() for t in _make_cache([20, 3], 4, 2, 32, 16, F32))
    assert paged._triton_for(q) is None
    assert torch.equal(
        paged.paged_decode_attention(q, k_cache, v_cache, block_table, seqlens),
        paged.paged_decode_attention_torch(q, k_cache, v_cache, block_table, seqlens),
    )


@pytest.mark.parametrize(
    "fn",
    [
        paged.paged_decode_attention_torch,
        pytest.param(triton_decode.paged_decode_attention, marks=needs_triton),
    ],
    ids=["torch", "triton"],
)
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=torch.randn(2, 3, 32)), "multiple of KV heads"),
        (
            dict(
                q=torch.randn(2, 4, 300),
                k_cache=torch.randn(4, 16, 2, 300),
                v_cache=torch.randn(4, 16, 2, 300),
            ),
            "head dim",
        ),
        (dict(block_table=torch.zeros(2, 2, dtype=torch.int64)), "int32"),
        (dict(cache_seqlens=torch.zeros(3, dtype=torch.int32)), "cache_seqlens"),
        (dict(q=torch.randn(2, 4, 32, dtype=torch.float64)), "dtype"),
        (dict(v_cache=torch.randn(4, 8, 2, 32)), "differ"),
    ],
)
def test_decode_rejects_bad_inputs(fn, change, match):
    args = dict(
        q=torch.randn(2, 4, 32),
        k_cache=torch.randn(4, 16, 2, 32),
        v_cache=torch.randn(4, 16, 2, 32),
        block_table=torch.zeros(2, 2, dtype=torch.int32),
        cache_seqlens=torch.zeros(2, dtype=torch.int32),
    )
    args.update(change)
    args = {name: t.to(DEVICE) for name, t in args.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        fn(**args)


def test_torch_decode_rejects_lengths_past_the_block_table():
    q, k_cache, v_cache, block_table, _ = _make_cache([20], 4, 2, 32, 16, F32)
    with pytest.raises(ValueError, match="cache_seqlens"):
        paged.paged_decode_attention_torch(
            q, k_cache, v_cache, block_table, torch.tensor([100], dtype=torch.int32, device=DEVICE)
        )


@needs_triton
def test_triton_rejects_bad_num_splits():
    q, k_cache, v_cache, block_table, seqlens = _make_cache([20], 4, 2, 32, 16, F32)
    with pytest.raises(ValueError, match="num_splits"):
        triton_decode.paged_decode_attention(q, k_cache, v_cache, block_table, seqlens, num_splits=0)


# ------------------------------------------------------------------------------------------ int8 KV

# Max abs error of decode over int8 K/V (quantize_int8: |x - dequant(x)| <= scale / 2 = absmax / 254)
# against fp32 attention on the unquantized unit-normal K/V; measured 2e-3 to 1e-2 (out and lse) here.
INT8_TOLERANCE = 0.03


def _int8_cache(lengths, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """_make_cache's fp32 K/V and their int8 codes and fp16 scales; q in dtype."""
    q, k, v, block_table, seqlens = _make_cache(
        lengths, num_heads, num_kv_heads, head_dim, block_size, F32, seed
    )
    (k_codes, k_scale), (v_codes, v_scale) = quantize_int8(k), quantize_int8(v)
    return q.to(dtype), k, v, (k_codes, v_codes, k_scale, v_scale), block_table, seqlens


# (lengths, Hq, Hkv, D, block_size, dtype, window, num_splits): GQA, ragged lengths across block
# boundaries, an odd block size, a non-power-of-two head dim, a window shorter than the sequences.
INT8_CASES = [
    ([1, 17, 40, 70], 4, 2, 32, 16, F32, (-1, -1), 3),
    ([33, 9, 50], 4, 2, 80, 5, F16, (20, -1), 1),
    ([64, 100], 4, 1, 32, 16, F16, (-1, -1), None),
]


@needs_triton
@pytest.mark.parametrize("case", INT8_CASES)
def test_triton_int8_dequantizes_in_kernel(case):
    lengths, hq, hkv, d, bs, dtype, window, num_splits = case
    q, k, v, (k_codes, v_codes, k_scale, v_scale), block_table, seqlens = _int8_cache(
        lengths, hq, hkv, d, bs, dtype
    )
    common = dict(window_size=window, return_lse=True, num_splits=num_splits)
    out, lse = triton_decode.paged_decode_attention(
        q, k_codes, v_codes, block_table, seqlens, k_scale=k_scale, v_scale=v_scale, **common
    )
    assert out.shape == q.shape and out.dtype == dtype
    # (a) the same kernel over the cache dequantized beforehand, in q's dtype
    deq_out, deq_lse = triton_decode.paged_decode_attention(
        q,
        dequantize_int8(k_codes, k_scale, dtype),
        dequantize_int8(v_codes, v_scale, dtype),
        block_table,
        seqlens,
        **common,
    )
    tight = 1e-5 if dtype == F32 else 1e-3
    assert max_err(out, deq_out) <= tight and max_err(lse, deq_lse) <= 1e-5
    # the oracle with the same scales (fp32 throughout: the kernel's fp16 K/V, p and output round)
    torch_out, torch_lse = reference.paged_decode_reference(
        q,
        k_codes,
        v_codes,
        block_table,
        seqlens,
        window_size=window,
        return_lse=True,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    close = (1e-5, 1e-5) if dtype == F32 else (4e-3, 1e-3)
    assert max_err(out, torch_out) <= close[0] and max_err(lse, torch_lse) <= close[1]
    # (b) fp32 attention over the unquantized K/V
    ref_out, ref_lse = reference.paged_decode_reference(
        q.float(), k, v, block_table, seqlens, window_size=window, return_lse=True
    )
    assert max_err(out, ref_out) <= INT8_TOLERANCE and max_err(lse, ref_lse) <= INT8_TOLERANCE


@pytest.mark.parametrize(
    "fn",
    [
        paged.paged_decode_attention_torch,
        pytest.param(triton_decode.paged_decode_attention, marks=needs_triton),
    ],
    ids=["torch", "triton"],
)
@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(v_scale=None), ValueError, "both k_scale and v_scale"),
        (dict(k_scale=None, v_scale=None), ValueError, "int8 caches need"),
        (dict(k_scale=torch.ones(4, 16, 1, dtype=F16)), ValueError, "k_scale must be"),
        (dict(v_scale=torch.ones(4, 16, 2, 1, dtype=F16)), ValueError, "v_scale must be"),
        (dict(k_scale=torch.ones(4, 16, 2, dtype=torch.int32)), TypeError, "k_scale has dtype"),
        (
            dict(k_cache=torch.randn(4, 16, 2, 32), v_cache=torch.randn(4, 16, 2, 32)),
            ValueError,
            "go with int8",
        ),
    ],
)
def test_decode_rejects_bad_int8_inputs(fn, change, error, match):
    codes = torch.zeros(4, 16, 2, 32, dtype=torch.int8)
    args = dict(
        q=torch.randn(2, 4, 32),
        k_cache=codes,
        v_cache=codes,
        block_table=torch.zeros(2, 2, dtype=torch.int32),
        cache_seqlens=torch.zeros(2, dtype=torch.int32),
        k_scale=torch.ones(4, 16, 2, dtype=F16),
        v_scale=torch.ones(4, 16, 2, dtype=F16),
    )
    args.update(change)
    args = {name: t if t is None else t.to(DEVICE) for name, t in args.items()}
    with pytest.raises(error, match=match):
        fn(**args)


# ------------------------------------------------------------------------------------------ GPU grid


def _gpu_cases():
    cases = []
    for dtype in (BF16, F16, F32):
        for d, block_size in ((64, 16), (128, 16), (128, 32), (96, 64), (256, 16)):
            for hq, hkv in ((32, 8), (8, 8), (16, 1)):
                cases.append((dtype, d, block_size, hq, hkv))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", _gpu_cases(), ids=lambda c: f"{str(c[0])[6:]}-d{c[1]}-bs{c[2]}-h{c[3]}/{c[4]}"
)
def test_triton_matches_reference_gpu(case):
    dtype, d, block_size, hq, hkv = case
    lengths = [1, 255, 1000, 4097]
    _check_decode(triton_decode.paged_decode_attention, lengths, hq, hkv, d, block_size, dtype)
    _check_decode(
        triton_decode.paged_decode_attention, lengths, hq, hkv, d, block_size, dtype, window=(300, -1)
    )
    _check_decode(
        paged.paged_decode_attention, lengths, hq, hkv, d, block_size, dtype
    )  # dispatches to Triton


# ------------------------------------------------------------------------------------------ every autotune config
# The split kernel's autotuner may pick any config of its list that fits; each is pinned (`config=`) and
# checked once against the reference, on CPU every BLOCK_N (the interpreter ignores warps and stages).


def _split_candidates(head_dim, dtype, int8=False):
    probe = torch.empty(0, dtype=dtype)
    return triton_decode._SPLIT.candidates(
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        Q=probe,
        K=torch.empty(0, dtype=torch.int8) if int8 else probe,
        KV_INT8=int8,
    )


def _config_id(config):
    return f"n{config.kwargs['BLOCK_N']}w{config.num_warps}s{config.num_stages}"


@needs_triton
@pytest.mark.parametrize(
    "config", list({c.kwargs["BLOCK_N"]: c for c in _split_candidates(32, F32)}.values()), ids=_config_id
)
def test_every_split_tile_matches_reference(config):
    # 300 tokens in 2 splits: every tile size sees full tiles, a split boundary and a ragged end
    _check_decode(
        triton_decode.paged_decode_attention, [300, 0, 77], 4, 2, 32, 16, F32, num_splits=2, config=config
    )


GPU_SPLIT_PROBLEMS = [
    (BF16, 128, 16, 32, 8),
    (F16, 64, 32, 8, 8),
    (F32, 128, 16, 16, 1),
    (BF16, 256, 64, 8, 2),
]


def _gpu_split_cases():
    return [
        pytest.param(
            problem,
            config,
            id=f"{str(problem[0])[6:]}-d{problem[1]}-bs{problem[2]}-"
            f"h{problem[3]}/{problem[4]}-{_config_id(config)}",
        )
        for problem in GPU_SPLIT_PROBLEMS
        for config in _split_candidates(problem[1], problem[0])
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("problem,config", _gpu_split_cases())
def test_every_autotune_config_matches_reference_gpu(problem, config):
    dtype, d, block_size, hq, hkv = problem
    _check_decode(
        triton_decode.paged_decode_attention, [1, 700, 0, 1500], hq, hkv, d, block_size, dtype, config=config
    )
    _check_decode(
        triton_decode.paged_decode_attention,
        [1, 700, 0, 1500],
        hq,
        hkv,
        d,
        block_size,
        dtype,
        window=(300, -1),
        num_splits=3,
        config=config,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("config", _split_candidates(128, F16, int8=True), ids=_config_id)
def test_every_autotune_config_int8_gpu(config):
    # fp16 queries: INT8_TOLERANCE was measured with fp32/fp16 (bf16 would add its own rounding)
    q, k, v, (k_codes, v_codes, k_scale, v_scale), table, seqlens = _int8_cache(
        [1, 700, 1500], 32, 8, 128, 16, F16
    )
    out, lse = triton_decode.paged_decode_attention(
        q, k_codes, v_codes, table, seqlens, k_scale=k_scale, v_scale=v_scale, return_lse=True, config=config
    )
    ref_out, ref_lse = reference.paged_decode_reference(q.float(), k, v, table, seqlens, return_lse=True)
    assert max_err(out, ref_out) <= INT8_TOLERANCE and max_err(lse, ref_lse) <= INT8_TOLERANCE


@pytest.mark.gpu
def test_dispatch_uses_triton_on_gpu():
    q = torch.randn(1, 4, 32, device="cuda")
    assert paged._triton_for(q) is triton_decode
