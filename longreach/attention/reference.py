"""The naive O(N^2) oracle every attention backend is tested against.

Materialises the full score matrix per sequence, accumulates in fp32, and
applies FlashAttention's mask conventions (see `longreach.attention`): bottom-right
causal, (left, right) windows, documents via cu_seqlens, and block-sparse layouts
(`masks.BlockSparseLayout`, densified here; the tiled backend skips their empty blocks).
"""
from __future__ import annotations

import math

import torch

from longreach.attention.masks import BlockSparseLayout, visible_mask

__all__ = ["attention_one", "varlen_attention", "visible_mask"]


def attention_one(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), mask=None, upcast=True):
    """One sequence. q: (Sq, Hq, D); k, v: (Sk, Hkv, D) -> out (Sq, Hq, D), lse (Hq, Sq) fp32.

    mask: optional (Sq, Sk) bool of extra visible pairs, ANDed with the causal/window band.
    With upcast=False the scores and P @ V are computed in the input dtype (softmax
    still in fp32): the "same-precision reference" of FlashAttention's test rule.
    """
    seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads, _ = k.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = num_heads // num_kv_heads
    compute = torch.float32 if upcast and q.dtype != torch.float64 else q.dtype
    qh = q.to(compute).transpose(0, 1)                                             # (Hq, Sq, D)
    kh = k.to(compute).transpose(0, 1).repeat_interleave(group, dim=0)             # (Hq, Sk, D)
    vh = v.to(compute).transpose(0, 1).repeat_interleave(group, dim=0)             # (Hq, Sk, Dv)
    softmax_dtype = torch.float64 if compute == torch.float64 else torch.float32
    scores = (qh @ kh.transpose(1, 2)).to(softmax_dtype) * scale                   # (Hq, Sq, Sk)
    visible = visible_mask(seqlen_q, seqlen_k, causal, window_size, q.device)
    if mask is not None:
        visible = visible & mask
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                          # (Hq, Sq)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)                     # empty rows -> 0
    out = (probs.to(compute) @ vh).transpose(0, 1)                                 # (Sq, Hq, Dv)
    return out.to(q.dtype), lse.float()


@torch.autocast("cpu", enabled=False)   # the oracle's precision is its own choice, not autocast's
@torch.autocast("cuda", enabled=False)
def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     softmax_scale=None, causal=False, window_size=(-1, -1), return_lse=False, upcast=True,
                     layout: BlockSparseLayout | None = None):
    """THD layout: q (total_q, Hq, D), k/v (total_k, Hkv, D) -> (total_q, Hq, D) [, lse (Hq, total_q)].

    layout: optional block-sparse pattern applied to every sequence (positions within the sequence).
    """
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        seqlen_q, seqlen_k = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        mask = layout.to_dense(seqlen_q, seqlen_k).to(q.device) if layout is not None else None
        o, l = attention_one(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                             softmax_scale, causal, window_size, mask=mask, upcast=upcast)
        outs.append(o)
        lses.append(l)
    # concatenation (not in-place writes) keeps the oracle differentiable for gradient tests
    tail = q.shape[0] - cq[-1]  # tokens after the last sequence (padding) output 0
    outs.append(q.new_zeros(tail, q.shape[1], v.shape[-1]))
    lses.append(torch.full((q.shape[1], tail), float("-inf"), dtype=torch.float32, device=q.device))
    out = torch.cat(outs, dim=0)
    lse = torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out
