"""The SDPA backend: torch.nn.functional.scaled_dot_product_attention over packed (varlen) sequences.

SDPA takes one (B, H, S, D) batch of equal lengths and a top-left aligned `is_causal`, where FlashAttention's
convention (see `longreach.attention`) is packed sequences of any lengths with bottom-right causal masks. So
sequences run as one batched call when they all share their (Sq, Sk), else one call per sequence, and each
call takes the cheapest form that keeps bottom-right alignment:
  full, or causal with Sq == Sk     SDPA as is (top-left equals bottom-right)
  causal with Sq == 1 (decode)      full attention: the one query sees every key
  causal with Sq > Sk               the first Sq - Sk queries see nothing (output 0, lse -inf); the rest are
                                    top-left causal over all keys
  causal with Sq < Sk, CPU, no grad two calls of SDPA's CPU flash kernel, on the prefix keys and on the
                                    diagonal block, merged exactly by their log-sum-exps (a prefill chunk
                                    after earlier ones; O(N) memory at flash speed)
  anything else                     an explicit (Sq, Sk) boolean mask: windows, block-sparse layouts, and
                                    unequal causal lengths under autograd or off the CPU; costs O(Sq * Sk)
SDPA returns no log-sum-exp, so with return_lse it is recomputed in query chunks (`_sdpa_lse`).

Inputs are taken as checked: `flash_attn_varlen_func` validates them once before it calls a backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F

from longreach.attention.masks import BlockSparseLayout, visible_mask


@dataclass(frozen=True)
class _Call:
    """What every SDPA call of one varlen call shares."""

    scale: float
    causal: bool
    window_size: tuple
    layout: BlockSparseLayout | None
    needs_grad: bool  # autograd will differentiate through this call
    kv_requires_grad: bool  # k or v asks for gradients (decides how GQA is expanded, see `_sdpa`)
    return_lse: bool

    @property
    def is_plain(self) -> bool:
        """Only causal or full: no window or layout that would need an explicit mask."""
        return self.layout is None and self.window_size == (-1, -1)


@torch.autocast("cpu", enabled=False)  # keep the precision chosen in `_sdpa` (inputs come in already cast)
@torch.autocast("cuda", enabled=False)
def sdpa_varlen_attention(
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
    layout: BlockSparseLayout | None = None,
):
    """torch SDPA over packed sequences (the cases are in the module docstring).

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_*: (B + 1,) int32. max_seqlen_* are unused
    (SDPA sizes itself). Returns out (total_q, Hq, D) and, with return_lse, lse (Hq, total_q) fp32.
    """
    kv_requires_grad = k.requires_grad or v.requires_grad
    call = _Call(
        scale=softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1]),
        causal=causal,
        window_size=tuple(window_size),
        layout=layout,
        needs_grad=torch.is_grad_enabled() and (q.requires_grad or kv_requires_grad),
        kv_requires_grad=kv_requires_grad,
        return_lse=return_lse,
    )
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    num_heads, dim_v = q.shape[1], v.shape[-1]
    outs, lses = [], []
    for b0, b1, seqlen_q, seqlen_k in _sequence_groups(cq, ck):
        batch = b1 - b0
        if seqlen_k == 0:  # nothing to attend to
            outs.append(q.new_zeros(batch * seqlen_q, num_heads, dim_v))
            lses.append(torch.full((num_heads, batch * seqlen_q), float("-inf"), device=q.device))
            continue
        qb = q[cq[b0] : cq[b1]].reshape(batch, seqlen_q, *q.shape[1:]).transpose(1, 2)  # (B, Hq, Sq, D)
        kb = k[ck[b0] : ck[b1]].reshape(batch, seqlen_k, *k.shape[1:]).transpose(1, 2)  # (B, Hkv, Sk, D)
        vb = v[ck[b0] : ck[b1]].reshape(batch, seqlen_k, *v.shape[1:]).transpose(1, 2)  # (B, Hkv, Sk, Dv)
        o, lse = _attend(call, qb, kb, vb)  # (B, Hq, Sq, Dv), (B, Hq, Sq)
        outs.append(o.transpose(1, 2).reshape(batch * seqlen_q, num_heads, dim_v))
        if return_lse:
            lses.append(lse.permute(1, 0, 2).reshape(num_heads, -1))
    tail = q.shape[0] - cq[-1]  # tokens after the last sequence (padding) output 0, lse -inf
    out = torch.cat(outs + [q.new_zeros(tail, num_heads, dim_v)], dim=0)
    if not return_lse:
        return out
    return out, torch.cat(lses + [torch.full((num_heads, tail), float("-inf"), device=q.device)], dim=1)


def _sequence_groups(cq: list[int], ck: list[int]) -> list[tuple[int, int, int, int]]:
    """(first, last + 1, Sq, Sk) for each SDPA call: one batched call when every sequence has the same
    lengths (SDPA takes one length per batch), else one call per sequence. Sequences without queries
    need no call."""
    lens_q = [b - a for a, b in pairwise(cq)]
    lens_k = [b - a for a, b in pairwise(ck)]
    if len(set(lens_q)) <= 1 and len(set(lens_k)) <= 1:
        ranges = [(0, len(lens_q))]
    else:
        ranges = [(b, b + 1) for b in range(len(lens_q))]
    return [(b0, b1, lens_q[b0], lens_k[b0]) for b0, b1 in ranges if b1 > b0 and lens_q[b0] > 0]


def _attend(call: _Call, q, k, v):
    """One group of equal-length sequences, q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), Sk > 0: picks the case of
    the module docstring. Returns out (B, Hq, Sq, Dv) in q's dtype and lse (B, Hq, Sq) fp32 (None when
    the call wants no lse, except from the prefix-then-causal merge, which has it for free)."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    if call.is_plain and not call.causal:
        return _sdpa(call, q, k, v, mask=None, is_causal=False)
    if call.is_plain and call.causal:
        if seqlen_q == 1:  # a single bottom-right query sees every key (decode)
            return _sdpa(call, q, k, v, mask=None, is_causal=False)
        if seqlen_q == seqlen_k:
            return _sdpa(call, q, k, v, mask=None, is_causal=True)
        if seqlen_q > seqlen_k:
            return _skip_blind_queries(call, q, k, v)
        if q.device.type == "cpu" and not call.needs_grad:
            return _prefix_then_causal(q, k, v, call.scale)
    return _masked(call, q, k, v)


def _sdpa(call: _Call, q, k, v, mask, is_causal):
    """One SDPA call on (B, H, S, D) tensors, in the precision that keeps its error at the reference's.
    Returns out (B, Hq, Sq, Dv) in q's dtype and, with call.return_lse, lse (B, Hq, Sq) fp32, else None."""
    dtype, group = q.dtype, q.shape[1] // k.shape[1]
    if dtype != torch.float32 and (mask is not None or (dtype == torch.float16 and q.device.type == "cpu")):
        # SDPA's explicit-mask path, and its CPU fp16 kernel, compute in the input precision: backward
        # 2-3x the error of the same-precision reference. The mask path already costs O(Sq * Sk), and
        # on CPU fp32 is faster than fp16 (measured at 4K causal: backward 0.95 s vs 8.6 s), so use fp32
        q, k, v = q.float(), k.float(), v.float()
    elif group > 1 and dtype != torch.float32 and call.kv_requires_grad:
        # enable_gqa's backward sums the group's dk/dv in low precision (2x the error of the
        # reference at bf16, MQA); expanding first lets autograd sum them more accurately
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=call.scale, enable_gqa=q.shape[1] != k.shape[1]
    )  # (B, Hq, Sq, Dv)
    lse = _sdpa_lse(q, k, call.scale, mask, is_causal) if call.return_lse else None
    return out.to(dtype), lse


def _skip_blind_queries(call: _Call, q, k, v):
    """Bottom-right causal with Sq > Sk: the first Sq - Sk queries see no key (output 0, lse -inf), the
    rest are top-left causal over all keys, which SDPA's is_causal gives."""
    skipped = q.shape[2] - k.shape[2]
    out, lse = _sdpa(call, q[:, :, skipped:], k, v, mask=None, is_causal=True)
    out = F.pad(out, (0, 0, skipped, 0))  # (B, Hq, Sq, Dv)
    if lse is not None:
        lse = F.pad(lse, (skipped, 0), value=float("-inf"))  # (B, Hq, Sq)
    return out, lse


def _masked(call: _Call, q, k, v):
    """Windows, layouts, and causal lengths SDPA cannot align without one: an explicit (Sq, Sk) mask."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    mask = visible_mask(seqlen_q, seqlen_k, call.causal, call.window_size, q.device)  # (Sq, Sk)
    if call.layout is not None:
        mask &= call.layout.to_dense(seqlen_q, seqlen_k).to(q.device)
    empty_rows = ~mask.any(-1)  # (Sq,)
    if not empty_rows.any():
        return _sdpa(call, q, k, v, mask=mask, is_causal=False)
    mask[empty_rows, 0] = True  # a fully masked row gives NaN in older torch: give it a key, zero it below
    out, lse = _sdpa(call, q, k, v, mask=mask, is_causal=False)
    out = out.masked_fill(empty_rows[:, None], 0.0)
    if lse is not None:
        lse = lse.masked_fill(empty_rows, float("-inf"))
    return out, lse


def _prefix_then_causal(q, k, v, scale):
    """Bottom-right causal attention with more keys than queries, on CPU (q (B, Hq, Sq, D), k/v
    (B, Hkv, Sk, D)): every query sees the first Sk - Sq keys, and the last Sq keys top-left causally. Two
    calls of SDPA's CPU flash kernel, which also returns its log-sum-exp, merged exactly by the two lse's:
    O(N) memory and flash speed, where SDPA's own is_causal is top-left aligned and a dense (Sq, Sk) mask
    runs its slower masked path. Returns the output in q's dtype and the fp32 lse (B, Hq, Sq). Inference
    only: the kernel's backward takes no gradient for its lse, so a merge through the lse's would get
    wrong gradients."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    dtype, prefix = q.dtype, k.shape[2] - q.shape[2]
    if dtype == torch.float16:  # SDPA's CPU fp16 kernel is slower and less exact than fp32 (see `_sdpa`)
        q, k, v = q.float(), k.float(), v.float()
    out_p, lse_p = flash(q, k[:, :, :prefix], v[:, :, :prefix], 0.0, False, scale=scale)
    out_c, lse_c = flash(q, k[:, :, prefix:], v[:, :, prefix:], 0.0, True, scale=scale)
    lse = torch.logaddexp(lse_p.float(), lse_c.float())
    out = out_p.float() * (lse_p - lse).exp()[..., None] + out_c.float() * (lse_c - lse).exp()[..., None]
    return out.to(dtype), lse


def _sdpa_lse(q, k, scale, mask, is_causal):
    """(B, Hq, Sq) fp32 log-sum-exp, which SDPA does not return; in query chunks, so memory stays
    O(chunk * Sk)."""
    batch, num_heads, seqlen_q, _ = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    kg = k.float()[:, :, None]  # (B, Hkv, 1, Sk, D)
    rows = max(1, (1 << 24) // max(1, batch * num_heads * seqlen_k))
    out = []
    for start in range(0, seqlen_q, rows):
        qc = q[:, :, start : start + rows].float()
        qc = qc.reshape(batch, num_kv_heads, num_heads // num_kv_heads, qc.shape[2], -1)  # (B, Hkv, G, r, D)
        scores = (qc @ kg.transpose(-1, -2)) * scale  # (B, Hkv, G, r, Sk)
        if is_causal:  # only used with Sq == Sk, where top-left and bottom-right agree
            q_idx = torch.arange(start, min(start + rows, seqlen_q), device=q.device)[:, None]
            visible = torch.arange(seqlen_k, device=q.device)[None, :] <= q_idx
        else:
            visible = None if mask is None else mask[start : start + rows]
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        out.append(torch.logsumexp(scores, -1).reshape(batch, num_heads, -1))
    return torch.cat(out, dim=2) if out else q.new_zeros(batch, num_heads, 0, dtype=torch.float32)


__all__ = ["sdpa_varlen_attention"]
