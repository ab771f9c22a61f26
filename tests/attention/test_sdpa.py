"""The SDPA backend (attention/sdpa.py) called directly: each case of its module docstring is the one that
runs for its shapes, and agrees with the reference in output and log-sum-exp, padding rows and empty
sequences included."""

from __future__ import annotations

import pytest
import torch

from longreach.attention import AttentionMetadata, masks, reference, sdpa

# case name -> (seqlens_q, seqlens_k, causal, window, layout?, grad?)
CASES = {
    "full": ([20, 20], [33, 33], False, (-1, -1), False, False),
    "causal_equal": ([20, 7], [20, 7], True, (-1, -1), False, False),
    "decode": ([1, 1, 1], [5, 40, 1], True, (-1, -1), False, False),
    "blind_queries": ([12], [5], True, (-1, -1), False, False),
    "prefix_then_causal": ([9, 4], [30, 4 + 11], True, (-1, -1), False, False),
    "causal_longer_k_with_grad": ([9], [30], True, (-1, -1), False, True),
    "window": ([25, 3], [25, 40], False, (6, 2), False, False),
    "window_with_empty_rows": ([16], [4], True, (2, -1), False, False),
    "layout": ([32], [32], True, (-1, -1), True, False),
}
# the function `_attend` hands each case to (the cases SDPA takes as is go straight to `_sdpa`)
EXPECTED = {
    "full": "_sdpa",
    "causal_equal": "_sdpa",
    "decode": "_sdpa",
    "blind_queries": "_skip_blind_queries",
    "prefix_then_causal": "_prefix_then_causal",
    "causal_longer_k_with_grad": "_masked",
    "window": "_masked",
    "window_with_empty_rows": "_masked",
    "layout": "_masked",
}


def _qkv(seqlens_q, seqlens_k, padding=3, heads=(4, 2), dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(seqlens_q) + padding, heads[0], dim, generator=g)
    k = torch.randn(sum(seqlens_k), heads[1], dim, generator=g)
    v = torch.randn(sum(seqlens_k), heads[1], dim, generator=g)
    return q, k, v


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_case_runs_its_path_and_matches_the_reference(name, monkeypatch):
    seqlens_q, seqlens_k, causal, window, with_layout, with_grad = CASES[name]
    meta = AttentionMetadata.from_seqlens(seqlens_q, seqlens_k, causal=causal)
    q, k, v = _qkv(seqlens_q, seqlens_k)
    layout = masks.bigbird_layout(32, block_size=8, num_random_blocks=0) if with_layout else None
    taken = []
    for fn in set(EXPECTED.values()):
        original = getattr(sdpa, fn)
        monkeypatch.setattr(sdpa, fn, lambda *a, _f=original, _n=fn, **kw: taken.append(_n) or _f(*a, **kw))
    args = (meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k)
    q_in = q.clone().requires_grad_(with_grad)
    out, lse = sdpa.sdpa_varlen_attention(
        q_in, k, v, *args, causal=causal, window_size=window, return_lse=True, layout=layout
    )
    assert taken and taken[0] == EXPECTED[name], taken
    expected_out, expected_lse = reference.varlen_attention(
        q, k, v, *args, causal=causal, window_size=window, return_lse=True, layout=layout
    )
    torch.testing.assert_close(out.detach(), expected_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))  # empty rows and padding: -inf
    torch.testing.assert_close(lse[~torch.isinf(lse)], expected_lse[~torch.isinf(lse)], atol=1e-5, rtol=1e-5)
    assert torch.all(out[sum(seqlens_q) :] == 0)  # padding rows output 0


def test_sequences_without_queries_or_keys():
    meta = AttentionMetadata.from_seqlens([0, 5, 4], [6, 0, 9], causal=True)
    q, k, v = _qkv([0, 5, 4], [6, 0, 9], padding=0)
    args = (q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k)
    out, lse = sdpa.sdpa_varlen_attention(*args, causal=True, return_lse=True)
    expected_out, expected_lse = reference.varlen_attention(*args, causal=True, return_lse=True)
    assert torch.all(out[:5] == 0) and torch.all(lse[:, :5] == float("-inf"))  # the sequence with no keys
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:, 5:], expected_lse[:, 5:], atol=1e-5, rtol=1e-5)


def test_uniform_lengths_run_as_one_batched_call(monkeypatch):
    calls = []
    original = sdpa._attend
    monkeypatch.setattr(
        sdpa, "_attend", lambda call, q, *a: calls.append(q.shape[0]) or original(call, q, *a)
    )
    meta = AttentionMetadata.from_seqlens([8, 8, 8], causal=True)
    q, k, v = _qkv([8, 8, 8], [8, 8, 8], padding=0)
    sdpa.sdpa_varlen_attention(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, causal=True)
    assert calls == [3]  # one (B=3, H, S, D) call
    calls.clear()
    meta = AttentionMetadata.from_seqlens([8, 5, 8], causal=True)
    q, k, v = _qkv([8, 5, 8], [8, 5, 8], padding=0)
    sdpa.sdpa_varlen_attention(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, causal=True)
    assert calls == [1, 1, 1]  # one call per sequence
