"""The naive O(N^2) oracle every attention backend is tested against.

Materialises the full score matrix per sequence, accumulates in fp32, and
applies FlashAttention's mask conventions (see `longreach.attention`).
"""
from __future__ import annotations

import math

import torch


def visible_mask(seqlen_q: int, seqlen_k: int, causal: bool, window_size=(-1, -1), device=None) -> torch.Tensor:
    """(Sq, Sk) bool: which keys each query may see (bottom-right aligned)."""
    left, right = window_size
    if causal:
        right = 0
    q_idx = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)  # query i's aligned key index
    k_idx = torch.arange(seqlen_k, device=device)[None, :]
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= k_idx <= q_idx + right
    if left >= 0:
        mask &= k_idx >= q_idx - left
    return mask


def attention_one(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), mask=None, upcast=True):
    """One sequence. q: (Sq, Hq, D); k, v: (Sk, Hkv, D) -> out (Sq, Hq, D), lse (Hq, Sq) fp32.

    With upcast=False the scores and P @ V are computed in the input dtype (softmax
    still in fp32): the "same-precision reference" of FlashAttention's test rule.
    """
    seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads, _ = k.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = num_heads // num_kv_heads
    compute = torch.float32 if upcast else q.dtype
    qh = q.to(compute).transpose(0, 1)                                             # (Hq, Sq, D)
    kh = k.to(compute).transpose(0, 1).repeat_interleave(group, dim=0)             # (Hq, Sk, D)
    vh = v.to(compute).transpose(0, 1).repeat_interleave(group, dim=0)             # (Hq, Sk, Dv)
    scores = (qh @ kh.transpose(1, 2)).float() * scale                             # (Hq, Sq, Sk)
    visible = visible_mask(seqlen_q, seqlen_k, causal, window_size, q.device)
    if mask is not None:
        visible = visible & mask
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                          # (Hq, Sq)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)                     # empty rows -> 0
    out = (probs.to(compute) @ vh).transpose(0, 1)                                 # (Sq, Hq, Dv)
    return out.to(q.dtype), lse


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     softmax_scale=None, causal=False, window_size=(-1, -1), return_lse=False, upcast=True):
    """THD layout: q (total_q, Hq, D), k/v (total_k, Hkv, D) -> (total_q, Hq, D) [, lse (Hq, total_q)]."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b]:
            continue
        o, l = attention_one(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                             softmax_scale, causal, window_size, upcast=upcast)
        out[cq[b]:cq[b + 1]] = o
        lse[:, cq[b]:cq[b + 1]] = l
    return (out, lse) if return_lse else out
