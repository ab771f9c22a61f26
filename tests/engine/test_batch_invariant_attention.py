"""The fixed-split attention of the batch-invariant mode: exact against a reference, and bitwise the same for
a token however its sequence is chunked and whatever shares its call."""

import math

import pytest
import torch

from longreach.attention.batch_invariant import KV_SPLIT, SeqQueries, TilePlan, fixed_split_attention

HQ, HKV, D = 4, 2, 16
LENGTH = KV_SPLIT * 2 + 23  # three KV splits, the last partial


@pytest.fixture(scope="module")
def cache():
    """Keys and values of one sequence stored at scattered slots of a flat cache, and a reader."""
    g = torch.Generator().manual_seed(0)
    slots = torch.randperm(3 * LENGTH, generator=g)[:LENGTH]
    q = torch.randn(LENGTH, HQ, D, generator=g)
    k, v = torch.randn(LENGTH, HKV, D, generator=g), torch.randn(LENGTH, HKV, D, generator=g)
    store_k, store_v = torch.zeros(3 * LENGTH, HKV, D), torch.zeros(3 * LENGTH, HKV, D)
    store_k[slots], store_v[slots] = k, v
    return dict(slots=slots, q=q, k=k, v=v, store=(store_k, store_v))


def _reader(cache, dtype):
    store_k, store_v = (t.to(dtype) for t in cache["store"])
    return lambda slots: (store_k[slots], store_v[slots])


def _chunked(cache, dtype, chunks, window):
    q, out, start = cache["q"].to(dtype), [], 0
    for n in chunks:
        plan = TilePlan.build([SeqQueries(0, start, start + n, cache["slots"][: start + n])], n, q.device)
        out.append(fixed_split_attention(q[start : start + n], _reader(cache, dtype), plan, window))
        start += n
    return torch.cat(out)


def _reference(cache, dtype, window):
    q, k, v = (cache[n].to(dtype).double() for n in "qkv")
    k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
    i = torch.arange(LENGTH)
    hidden = i[None, :] > i[:, None]
    if window[0] >= 0:
        hidden |= i[None, :] < i[:, None] - window[0]
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(hidden, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window", [(-1, -1), (20, 0), (KV_SPLIT + 5, 0)])
def test_matches_reference_and_every_chunking_bitwise(cache, dtype, window):
    whole = _chunked(cache, dtype, [LENGTH], window)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the output's rounding to dtype; the math is fp32
    torch.testing.assert_close(whole.double(), _reference(cache, dtype, window), rtol=tol, atol=tol)
    for chunks in ([1] * LENGTH, [7, 33, 1, 1, KV_SPLIT, LENGTH - 42 - KV_SPLIT]):
        assert torch.equal(_chunked(cache, dtype, chunks, window), whole)


def test_a_sequence_next_to_others_gets_its_solo_bits(cache):
    whole = _chunked(cache, torch.bfloat16, [LENGTH], (-1, -1))
    q, slots = cache["q"].to(torch.bfloat16), cache["slots"]
    seqs = [
        SeqQueries(0, 100, 101, slots[:101]),
        SeqQueries(1, 0, 50, slots[:50]),
        SeqQueries(51, 3, 9, slots[:9]),
    ]
    plan = TilePlan.build(seqs, 57, q.device)
    out = fixed_split_attention(torch.cat([q[100:101], q[:50], q[3:9]]), _reader(cache, torch.bfloat16), plan)
    assert torch.equal(out[0], whole[100]) and torch.equal(out[1:51], whole[:50])
    assert torch.equal(out[51:], whole[3:9])


def test_rows_must_match_the_plan(cache):
    plan = TilePlan.build([SeqQueries(0, 0, 4, cache["slots"][:4])], 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="q has 5 rows but the tile plan was built for 4"):
        fixed_split_attention(cache["q"][:5], _reader(cache, torch.float32), plan)
