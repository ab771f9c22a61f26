"""Performer FAVOR+ and Linformer: approximation quality against exact softmax attention, and training."""

from __future__ import annotations

import math

import pytest
import torch

from longreach.attention import flash_attn_func
from longreach.attention.linear import (
    LinformerAttention,
    default_num_features,
    favor_features,
    orthogonal_random_features,
    performer_attention,
)


def _qkv(batch, seqlen, heads, dim, seed, kv_heads=None, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    return (
        torch.randn(batch, seqlen, heads, dim, generator=g) * scale,
        torch.randn(batch, seqlen, kv_heads, dim, generator=g) * scale,
        torch.randn(batch, seqlen, kv_heads, dim, generator=g),
    )


def test_orthogonal_features_are_orthogonal_blocks_with_gaussian_norms():
    w = orthogonal_random_features(40, 16, seed=0)
    assert w.shape == (40, 16)
    for start in (0, 16):
        block = w[start : start + 16]
        directions = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(directions @ directions.T, torch.eye(16), atol=1e-5, rtol=0)
    assert 2.5 < w.norm(dim=1).mean() < 5.5  # chi(16) has mean ~3.94
    assert torch.equal(w, orthogonal_random_features(40, 16, seed=0))
    assert default_num_features(64) == round(64 * math.log(64))


def test_features_are_positive_and_unbiased():
    q, k, _ = _qkv(1, 8, 1, 8, seed=0)
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    w = orthogonal_random_features(20000, 8, seed=1)
    phi_q, phi_k = (
        favor_features(qh, w, is_query=True, eps=0.0),
        favor_features(kh, w, is_query=False, eps=0.0),
    )
    assert (phi_q > 0).all() and (phi_k > 0).all()
    # with the stabilisers undone, phi(q) . phi(k) estimates exp(q . k / sqrt(d))
    wq, wk = (qh * 8**-0.25) @ w.T, (kh * 8**-0.25) @ w.T
    estimate = (phi_q @ phi_k.transpose(-1, -2)) * torch.exp(wq.amax(-1, keepdim=True)) * torch.exp(wk.amax())
    exact = torch.exp(qh @ kh.transpose(-1, -2) / math.sqrt(8))
    assert ((estimate - exact).abs() / exact).mean() < 0.05


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_falls_with_more_features(causal):
    """Relative error against exact softmax attention, averaged over 8 seeds, falls ~ 1/sqrt(m)."""
    errors = {}
    for m in (16, 64, 256):
        per_seed = []
        for seed in range(8):
            q, k, v = _qkv(1, 96, 2, 16, seed=seed, scale=0.5)
            exact = flash_attn_func(q, k, v, causal=causal, backend="reference")
            approx = performer_attention(
                q, k, v, num_features=m, causal=causal, seed=100 + seed, chunk_size=32
            )
            per_seed.append(((approx - exact).norm() / exact.norm()).item())
        errors[m] = sum(per_seed) / len(per_seed)
    assert errors[16] > errors[64] > errors[256], errors
    assert errors[256] < 0.5 * errors[16] and errors[256] < 0.2, errors


def test_performer_causal_prefix_sums_match_masked_quadratic_form():
    q, k, v = _qkv(2, 50, 4, 8, seed=5, kv_heads=2)
    w = orthogonal_random_features(32, 8, seed=3)
    got = performer_attention(q, k, v, causal=True, projection=w, chunk_size=16)
    phi_q = favor_features(q.transpose(1, 2), w, True)
    phi_k = favor_features(k.transpose(1, 2), w, False).repeat_interleave(2, dim=1)
    weights = (phi_q @ phi_k.transpose(-1, -2)).tril()  # (B, H, S, S)
    expected = (weights / weights.sum(-1, keepdim=True)) @ v.transpose(1, 2).repeat_interleave(2, dim=1)
    torch.testing.assert_close(got, expected.transpose(1, 2), atol=1e-5, rtol=1e-4)
    # non-causal equals the last row of causal (which sees every key)
    full = performer_attention(q, k, v, causal=False, projection=w)
    torch.testing.assert_close(full[:, -1], got[:, -1], atol=1e-5, rtol=1e-4)


def test_performer_is_stable_for_large_inputs_and_low_precision():
    q, k, v = _qkv(1, 64, 2, 32, seed=0)
    out = performer_attention(q * 30, k * 30, v, causal=True)  # exp would overflow unstabilised
    assert torch.isfinite(out).all()
    half = performer_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), num_features=64)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


def test_performer_rejects_bad_shapes():
    q, k, v = _qkv(1, 8, 3, 8, seed=0, kv_heads=2)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of KV heads \(2\)"):
        performer_attention(q, k, v)
    q, k, v = _qkv(1, 8, 2, 8, seed=0)
    with pytest.raises(ValueError, match="causal Performer needs seqlen_q == seqlen_k, got 4 and 8"):
        performer_attention(q[:, :4], k, v, causal=True)


class _TinyLinformer(torch.nn.Module):
    """Embedding -> one Linformer attention layer (2 heads) -> logits, for the copy-first-token task."""

    def __init__(self, vocab, seqlen, dim=32, heads=2, proj_len=8):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(seqlen, dim) * 0.1)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.attn = LinformerAttention(seqlen, proj_len)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]  # (B, N, C)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # (B, N, H, C/H) each
        return self.out(self.attn(q, k, v).flatten(2) + x)


def test_linformer_trains_on_a_tiny_task():
    torch.manual_seed(0)
    vocab, seqlen = 8, 32
    model = _TinyLinformer(vocab, seqlen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(120):
        tokens = torch.randint(vocab, (32, seqlen), generator=g)
        target = tokens[:, :1].expand(-1, seqlen)  # every position: first token
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.3 * first, (first, last)


def test_linformer_projects_along_the_sequence():
    layer = LinformerAttention(max_seq_len=64, proj_len=16)
    assert layer.E.shape == (64, 16) and layer.F.shape == (64, 16)
    q, k, v = _qkv(2, 40, 4, 8, seed=0, kv_heads=2)
    out = layer(q, k, v)
    assert out.shape == q.shape
    # with E = F = identity-like selection of 16 keys, Linformer is exact attention over those keys
    with torch.no_grad():
        layer.E.zero_()
        layer.E[torch.arange(16), torch.arange(16)] = 1.0
        layer.F.copy_(layer.E)
    exact = flash_attn_func(q, k[:, :16], v[:, :16], backend="reference")
    torch.testing.assert_close(layer(q, k, v), exact, atol=1e-5, rtol=1e-5)
    shared = LinformerAttention(64, 16, share_kv=True)
    assert shared.E is shared.F and len(list(shared.parameters())) == 1
    with pytest.raises(ValueError, match="sequence of 80 tokens exceeds max_seq_len=64"):
        layer(*_qkv(1, 80, 2, 8, seed=0))
