"""Attention entry point: FlashAttention's API over interchangeable backends.

`flash_attn_func` (BSHD) and `flash_attn_varlen_func` (THD + cu_seqlens) follow
Dao-AILab/flash-attention's conventions: causal masks are bottom-right aligned
when query and key lengths differ, `window_size=(left, right)` with -1 meaning
unbounded, query head h reads KV head h // (Hq // Hkv), the log-sum-exp is fp32
natural log, and a row with nothing to attend to outputs 0.

Backends register themselves in `BACKENDS`; `backend=None` picks one automatically.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longreach.attention import reference

BACKENDS = {
    "reference": reference.varlen_attention,
}


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's queries and keys lie in the flattened token batch.

    cu_seqlens_q / cu_seqlens_k: (B + 1,) int32 prefix sums of the lengths.
    Queries of sequence b are the *last* tokens of its keys (bottom-right causal).
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool = True

    @staticmethod
    def from_seqlens(seqlens_q: list[int], seqlens_k: list[int] | None = None,
                     device: torch.device | str = "cpu", causal: bool = True) -> "AttentionMetadata":
        seqlens_k = seqlens_q if seqlens_k is None else seqlens_k
        if len(seqlens_q) != len(seqlens_k):
            raise ValueError(f"{len(seqlens_q)} query lengths but {len(seqlens_k)} key lengths")

        def cu(lens):
            out = torch.zeros(len(lens) + 1, dtype=torch.int32)
            out[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
            return out.to(device)

        return AttentionMetadata(cu(seqlens_q), cu(seqlens_k), max(seqlens_q, default=0),
                                 max(seqlens_k, default=0), causal)


def _pick_backend(q: torch.Tensor, backend: str | None):
    name = backend or "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name]


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           return_lse=False, backend=None):
    """Attention over packed sequences.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_*: (B + 1,) int32.
    Returns out (total_q, Hq, D) and, with return_lse, lse (Hq, total_q) fp32.
    """
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p} is not supported (inference and our training use 0)")
    fn = _pick_backend(q, backend)
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              softmax_scale=softmax_scale, causal=causal, window_size=window_size, return_lse=return_lse)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    return_lse=False, backend=None):
    """Attention in BSHD layout. q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D).

    Returns out (B, Sq, Hq, D) and, with return_lse, lse (B, Hq, Sq) fp32.
    """
    batch, seqlen_q = q.shape[:2]
    seqlen_k = k.shape[1]
    meta = AttentionMetadata.from_seqlens([seqlen_q] * batch, [seqlen_k] * batch, device=q.device)
    out = flash_attn_varlen_func(q.reshape(batch * seqlen_q, *q.shape[2:]), k.reshape(batch * seqlen_k, *k.shape[2:]),
                                 v.reshape(batch * seqlen_k, *v.shape[2:]), meta.cu_seqlens_q, meta.cu_seqlens_k,
                                 seqlen_q, seqlen_k, dropout_p, softmax_scale, causal, window_size, return_lse, backend)
    if return_lse:
        out, lse = out
        return out.view(batch, seqlen_q, *q.shape[2:]), lse.view(-1, batch, seqlen_q).transpose(0, 1)
    return out.view(batch, seqlen_q, *q.shape[2:])


def attention(q, k, v, meta: AttentionMetadata, window_size=(-1, -1), softmax_scale=None, backend=None):
    """What the model calls: varlen attention described by one metadata object."""
    return flash_attn_varlen_func(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                                  meta.max_seqlen_k, softmax_scale=softmax_scale, causal=meta.causal,
                                  window_size=window_size, backend=backend)


__all__ = ["AttentionMetadata", "BACKENDS", "attention", "flash_attn_func", "flash_attn_varlen_func"]
