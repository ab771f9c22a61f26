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
from longreach.attention.paged_checks import check_decode_inputs

__all__ = ["attention_one", "paged_decode_reference", "varlen_attention", "visible_mask"]


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
    qh = q.to(compute).transpose(0, 1)  # (Hq, Sq, D)
    kh = k.to(compute).transpose(0, 1).repeat_interleave(group, dim=0)  # (Hq, Sk, D)
    vh = v.to(compute).transpose(0, 1).repeat_interleave(group, dim=0)  # (Hq, Sk, Dv)
    softmax_dtype = torch.float64 if compute == torch.float64 else torch.float32
    scores = (qh @ kh.transpose(1, 2)).to(softmax_dtype) * scale  # (Hq, Sq, Sk)
    visible = visible_mask(seqlen_q, seqlen_k, causal, window_size, q.device)
    if mask is not None:
        visible = visible & mask
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (Hq, Sq)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # empty rows -> 0
    out = (probs.to(compute) @ vh).transpose(0, 1)  # (Sq, Hq, Dv)
    return out.to(q.dtype), lse.float()


@torch.autocast("cpu", enabled=False)  # the oracle's precision is its own choice, not autocast's
@torch.autocast("cuda", enabled=False)
def varlen_attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    return_lse=False,
    upcast=True,
    layout: BlockSparseLayout | None = None,
):
    """THD layout: q (total_q, Hq, D), k/v (total_k, Hkv, D) -> (total_q, Hq, D) [, lse (Hq, total_q)].

    layout: optional block-sparse pattern applied to every sequence (positions within the sequence).
    """
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        seqlen_q, seqlen_k = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        mask = layout.to_dense(seqlen_q, seqlen_k).to(q.device) if layout is not None else None
        o, lse = attention_one(
            q[cq[b] : cq[b + 1]],
            k[ck[b] : ck[b + 1]],
            v[ck[b] : ck[b + 1]],
            softmax_scale,
            causal,
            window_size,
            mask=mask,
            upcast=upcast,
        )
        outs.append(o)
        lses.append(lse)
    # concatenation (not in-place writes) keeps the oracle differentiable for gradient tests
    tail = q.shape[0] - cq[-1]  # tokens after the last sequence (padding) output 0
    outs.append(q.new_zeros(tail, q.shape[1], v.shape[-1]))
    lses.append(torch.full((q.shape[1], tail), float("-inf"), dtype=torch.float32, device=q.device))
    out = torch.cat(outs, dim=0)
    lse = torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def paged_decode_reference(
    q,
    k_cache,
    v_cache,
    block_table,
    cache_seqlens,
    softmax_scale=None,
    window_size=(-1, -1),
    return_lse=False,
    k_scale=None,
    v_scale=None,
):
    """Paged decode's oracle: one query token per sequence against its paged K/V, a sequence at a time, fp32.

    q: (B, Hq, D); k_cache, v_cache: [num_blocks, block_size, Hkv, D] (any block_size >= 1), int8 with
    k_scale, v_scale [num_blocks, block_size, Hkv]; block_table: (B, max_blocks) int32; cache_seqlens: (B,) int32.
    Returns out (B, Hq, D) in q's dtype and, with return_lse, lse (B, Hq) fp32 (natural log;
    -inf and a zero output for an empty sequence).
    """
    batch, num_heads, num_kv_heads, head_dim, block_size = check_decode_inputs(
        q, k_cache, v_cache, block_table, cache_seqlens, window_size, k_scale, v_scale
    )
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    left = int(window_size[0])
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    lse = torch.full((batch, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    lengths = cache_seqlens.tolist()
    capacity = block_table.shape[1] * block_size
    for b, length in enumerate(lengths):
        if not 0 <= length <= capacity:
            raise ValueError(
                f"cache_seqlens[{b}] = {length} is outside 0..{capacity} (block_table width x block_size)"
            )
        start = max(0, length - 1 - left) if left >= 0 else 0
        if length == 0:
            continue
        pos = torch.arange(start, length, device=q.device)
        blocks = block_table[b, pos // block_size].long()
        if int(blocks.min()) < 0 or int(blocks.max()) >= k_cache.shape[0]:
            raise ValueError(f"block_table[{b}] points outside the cache's {k_cache.shape[0]} blocks")
        k = k_cache[blocks, pos % block_size].float()  # (n, Hkv, D)
        v = v_cache[blocks, pos % block_size].float()
        if k_scale is not None:
            k = k * k_scale[blocks, pos % block_size].float()[..., None]
            v = v * v_scale[blocks, pos % block_size].float()[..., None]
        qb = q[b].float().reshape(num_kv_heads, group, head_dim)  # (Hkv, G, D)
        scores = torch.einsum("hgd,nhd->hgn", qb, k) * scale  # (Hkv, G, n)
        lse_b = torch.logsumexp(scores, dim=-1)  # (Hkv, G)
        probs = torch.exp(scores - lse_b[..., None])
        out[b] = torch.einsum("hgn,nhd->hgd", probs, v).reshape(num_heads, head_dim).to(q.dtype)
        lse[b] = lse_b.reshape(num_heads)
    return (out, lse) if return_lse else out
