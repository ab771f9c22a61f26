"""Attention entry point: FlashAttention's API over interchangeable backends.

`flash_attn_func` (BSHD) and `flash_attn_varlen_func` (THD + cu_seqlens) follow
Dao-AILab/flash-attention's conventions: causal masks are bottom-right aligned
when query and key lengths differ, `window_size=(left, right)` with -1 meaning
unbounded, query head h reads KV head h // (Hq // Hkv), the log-sum-exp is fp32
natural log ((B, Hq, Sq), varlen (Hq, total_q)), and a row with nothing to attend
to outputs 0 (its lse is -inf).

Backends share one signature `fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
softmax_scale=None, causal=False, window_size=(-1, -1), return_lse=False[, layout=None])`:
  reference  naive O(N^2) oracle (reference.py)
  tiled      exact blockwise online softmax, O(N) memory, skips masked blocks (tiled.py)
  sdpa       torch.nn.functional.scaled_dot_product_attention, one call per distinct sequence shape
  triton     FlashAttention forward/backward kernels (triton_flash.py), imported on first use; skips the
             empty blocks of a layout whose block size is a multiple of 16
`backend=None` picks: triton for CUDA tensors when it imports; otherwise SDPA for plain full/causal
attention (SDPA's CPU flash kernel is the fastest exact path there, and packed documents run as one call
per document, never touching cross-document blocks: measured 4 x 2K causal documents in 0.12 s vs 0.16 s
tiled). SDPA's is_causal is top-left aligned, which equals bottom-right when query and key lengths match
and for decode's single query; on CPU, causal with more keys than queries (a prefill chunk after earlier
ones) runs as two flash calls merged by their log-sum-exps when no gradient is needed (chunked prefill of a
32K prompt in benchmarks/serving.py: 98 s, against 145 s with the tiled backend). Tiled takes anything with a window, a block-sparse layout, or
unequal causal lengths where SDPA would need a dense mask, where skipping blocks wins.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longreach.attention import reference, tiled
from longreach.attention.masks import BlockSparseLayout, visible_mask


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


# ---------------------------------------------------------------- SDPA backend

def _prefix_then_causal(q, k, v, scale):
    """Bottom-right causal attention with more keys than queries, on CPU (q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D)):
    every query sees the first Sk - Sq keys, and the last Sq keys top-left causally. Two calls of SDPA's CPU
    flash kernel, which also returns its log-sum-exp, merged exactly by the two lse's: O(N) memory and flash
    speed, where SDPA's own is_causal is top-left aligned and a dense (Sq, Sk) mask runs its slower masked
    path. Returns the output in q's dtype and the fp32 lse (B, Hq, Sq). Inference only: the kernel's backward
    takes no gradient for its lse, so a merge through the lse's would get wrong gradients."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    dtype, prefix = q.dtype, k.shape[2] - q.shape[2]
    if dtype == torch.float16:  # SDPA's CPU fp16 kernel is slower and less exact than fp32 (see below)
        q, k, v = q.float(), k.float(), v.float()
    out_p, lse_p = flash(q, k[:, :, :prefix], v[:, :, :prefix], 0.0, False, scale=scale)
    out_c, lse_c = flash(q, k[:, :, prefix:], v[:, :, prefix:], 0.0, True, scale=scale)
    lse = torch.logaddexp(lse_p.float(), lse_c.float())
    out = out_p.float() * (lse_p - lse).exp()[..., None] + out_c.float() * (lse_c - lse).exp()[..., None]
    return out.to(dtype), lse


def _sdpa_lse(q, k, scale, mask, is_causal):
    """(B, Hq, Sq) fp32 log-sum-exp, in query chunks so memory stays O(chunk * Sk). SDPA does not return it."""
    batch, num_heads, seqlen_q, _ = q.shape
    num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
    kg = k.float()[:, :, None]                                                          # (B, Hkv, 1, Sk, D)
    rows = max(1, (1 << 24) // max(1, batch * num_heads * seqlen_k))
    out = []
    for start in range(0, seqlen_q, rows):
        qc = q[:, :, start:start + rows].float()
        qc = qc.reshape(batch, num_kv_heads, num_heads // num_kv_heads, qc.shape[2], -1)  # (B, Hkv, G, r, D)
        scores = (qc @ kg.transpose(-1, -2)) * scale                                    # (B, Hkv, G, r, Sk)
        if is_causal:  # only used with Sq == Sk, where top-left and bottom-right agree
            q_idx = torch.arange(start, min(start + rows, seqlen_q), device=q.device)[:, None]
            visible = torch.arange(seqlen_k, device=q.device)[None, :] <= q_idx
        else:
            visible = None if mask is None else mask[start:start + rows]
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        out.append(torch.logsumexp(scores, -1).reshape(batch, num_heads, -1))
    return torch.cat(out, dim=2) if out else q.new_zeros(batch, num_heads, 0, dtype=torch.float32)


@torch.autocast("cpu", enabled=False)   # keep the precision chosen below (inputs come in already cast)
@torch.autocast("cuda", enabled=False)
def sdpa_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                          softmax_scale=None, causal=False, window_size=(-1, -1), return_lse=False,
                          layout: BlockSparseLayout | None = None):
    """torch SDPA over packed sequences: one batched call when all sequences share their lengths, else one
    per sequence. is_causal is used only where top-left equals bottom-right (Sq == Sk); windows, layouts
    and unequal causal lengths go through an explicit (Sq, Sk) boolean mask, which costs O(Sq * Sk)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lens_q = [b - a for a, b in zip(cq, cq[1:])]
    lens_k = [b - a for a, b in zip(ck, ck[1:])]
    if len(set(lens_q)) <= 1 and len(set(lens_k)) <= 1:
        groups = [(0, len(lens_q))]             # uniform: one (B, H, S, D) call
    else:
        groups = [(b, b + 1) for b in range(len(lens_q))]
    plain = layout is None and tuple(window_size) == (-1, -1)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs, lses = [], []
    for b0, b1 in groups:
        batch, seqlen_q, seqlen_k = b1 - b0, lens_q[b0] if lens_q else 0, lens_k[b0] if lens_k else 0
        if batch == 0 or seqlen_q == 0:
            continue
        if seqlen_k == 0:  # nothing to attend to
            outs.append(q.new_zeros(batch * seqlen_q, q.shape[1], v.shape[-1]))
            lses.append(torch.full((q.shape[1], batch * seqlen_q), float("-inf"), device=q.device))
            continue
        qb = q[cq[b0]:cq[b1]].reshape(batch, seqlen_q, *q.shape[1:]).transpose(1, 2)    # (B, Hq, Sq, D)
        kb = k[ck[b0]:ck[b1]].reshape(batch, seqlen_k, *k.shape[1:]).transpose(1, 2)    # (B, Hkv, Sk, D)
        vb = v[ck[b0]:ck[b1]].reshape(batch, seqlen_k, *v.shape[1:]).transpose(1, 2)    # (B, Hkv, Sk, Dv)
        is_causal, mask, empty_rows, skipped = causal, None, None, 0
        if plain and causal and seqlen_q == 1:
            is_causal = False  # a single bottom-right query sees every key (decode)
        elif plain and causal and seqlen_q > seqlen_k:
            # bottom-right: the first Sq - Sk queries see nothing, the rest are top-left causal over all keys
            skipped = seqlen_q - seqlen_k
            qb = qb[:, :, skipped:]
        elif plain and causal and seqlen_q < seqlen_k and q.device.type == "cpu" and not needs_grad:
            o, lse = _prefix_then_causal(qb, kb, vb, scale)                   # a prefill chunk after others
            outs.append(o.transpose(1, 2).reshape(batch * seqlen_q, q.shape[1], v.shape[-1]))
            lses.append(lse.permute(1, 0, 2).reshape(q.shape[1], -1))
            continue
        elif not (plain and (not causal or seqlen_q == seqlen_k)):
            is_causal = False
            mask = visible_mask(seqlen_q, seqlen_k, causal, window_size, q.device)       # (Sq, Sk)
            if layout is not None:
                mask &= layout.to_dense(seqlen_q, seqlen_k).to(q.device)
            empty_rows = ~mask.any(-1)
            if empty_rows.any():  # a fully masked row would give NaN in older torch: give it a key, zero it below
                mask[empty_rows, 0] = True
            else:
                empty_rows = None
        dtype, group = qb.dtype, q.shape[1] // k.shape[1]
        if dtype != torch.float32 and (mask is not None or (dtype == torch.float16 and q.device.type == "cpu")):
            # SDPA's explicit-mask path, and its CPU fp16 kernel, compute in the input precision: backward
            # 2-3x the error of the same-precision reference. The mask path already costs O(Sq * Sk), and
            # on CPU fp32 is faster than fp16 (measured at 4K causal: backward 0.95 s vs 8.6 s), so use fp32
            qb, kb, vb = qb.float(), kb.float(), vb.float()
        elif group > 1 and dtype != torch.float32 and (k.requires_grad or v.requires_grad):
            # enable_gqa's backward sums the group's dk/dv in low precision (2x the error of the
            # reference at bf16, MQA); expanding first lets autograd sum them more accurately
            kb, vb = kb.repeat_interleave(group, dim=1), vb.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=is_causal, scale=scale,
                                           enable_gqa=qb.shape[1] != kb.shape[1])         # (B, Hq, Sq', Dv)
        if empty_rows is not None:
            o = o.masked_fill(empty_rows[:, None], 0.0)
        o = F.pad(o.to(dtype), (0, 0, skipped, 0))                                         # (B, Hq, Sq, Dv)
        outs.append(o.transpose(1, 2).reshape(batch * seqlen_q, q.shape[1], v.shape[-1]))
        if return_lse:
            lse = F.pad(_sdpa_lse(qb, kb, scale, mask, is_causal), (skipped, 0), value=float("-inf"))
            if empty_rows is not None:
                lse = lse.masked_fill(empty_rows, float("-inf"))
            lses.append(lse.permute(1, 0, 2).reshape(q.shape[1], -1))
    tail = q.shape[0] - cq[-1]  # tokens after the last sequence output 0
    out = torch.cat(outs + [q.new_zeros(tail, q.shape[1], v.shape[-1])], dim=0)
    if not return_lse:
        return out
    lse = torch.cat(lses + [torch.full((q.shape[1], tail), float("-inf"), device=q.device)], dim=1)
    return out, lse


# ---------------------------------------------------------------- registry

_TRITON: dict = {}


def _load_triton():
    """The Triton varlen kernel, or None (with the reason kept) when it cannot be imported."""
    if "fn" not in _TRITON:
        try:
            from longreach.attention.triton_flash import varlen_attention as fn
            _TRITON.update(fn=fn, error=None)
        except Exception as exc:  # triton missing, no driver, or the module itself failing: report, never pick
            _TRITON.update(fn=None, error=f"{type(exc).__name__}: {exc}")
    return _TRITON["fn"]


def _triton_backend(*args, **kwargs):
    fn = _load_triton()
    if fn is None:
        raise RuntimeError(f"attention backend 'triton' is unavailable ({_TRITON['error']}); "
                           f"use backend='tiled' or 'sdpa' on CPU")
    return fn(*args, **kwargs)


BACKENDS = {
    "reference": reference.varlen_attention,
    "tiled": tiled.varlen_attention,
    "sdpa": sdpa_varlen_attention,
    "triton": _triton_backend,
}


def _supports_layout(name: str) -> bool:
    fn = _load_triton() if name == "triton" else BACKENDS[name]
    return fn is not None and "layout" in inspect.signature(fn).parameters


def choose_backend(q: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool = False,
                   window_size=(-1, -1), layout: BlockSparseLayout | None = None) -> str:
    """The backend `backend=None` runs (see the module docstring for the rule).

    LONGREACH_ATTENTION_BACKEND=<name> in the environment overrides the rule for every call (to pin a
    backend in a benchmark, or to step around a misbehaving kernel without touching code)."""
    forced = os.environ.get("LONGREACH_ATTENTION_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"LONGREACH_ATTENTION_BACKEND={forced!r}; choose one of {sorted(BACKENDS)}")
        return forced
    if q.is_cuda and _load_triton() is not None and (layout is None or _supports_layout("triton")):
        return "triton"
    if layout is None and tuple(window_size) == (-1, -1) and (
            not causal or cu_seqlens_q is cu_seqlens_k
            or (q.device.type == "cpu" and not (torch.is_grad_enabled() and q.requires_grad))  # prefix + causal
            or torch.equal(cu_seqlens_q, cu_seqlens_k)
            or torch.equal(cu_seqlens_q, torch.arange(len(cu_seqlens_q), dtype=cu_seqlens_q.dtype,
                                                      device=cu_seqlens_q.device))):  # one query each: decode
        return "sdpa"
    return "tiled"


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size, layout):
    """Shape, dtype and value checks; each error names the bad value. Value checks read cu_seqlens only when
    they live on the CPU, so a CUDA call never synchronises here."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (tokens, heads, head_dim); got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of float16/bfloat16/float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match in tokens and heads")
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"head dims differ: q {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]}")
    if len(window_size) != 2 or any(int(w) != w or w < -1 for w in window_size):
        raise ValueError(f"window_size must be two ints >= -1 (-1 = unbounded), got {tuple(window_size)}")
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor of batch + 1 offsets, got "
                             f"{getattr(cu, 'dtype', type(cu).__name__)} of shape {tuple(getattr(cu, 'shape', ()))}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel()}; both must be batch + 1")
    if q.device.type == "cpu":
        for name, cu, total, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                         ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
            values = cu.tolist()
            lengths = [b - a for a, b in zip(values, values[1:])]
            if values[0] != 0 or any(n < 0 for n in lengths) or values[-1] > total:
                raise ValueError(f"{name}={values} must start at 0, never decrease, and end at most at "
                                 f"the {total} tokens given")
            if max_len is not None and lengths and max(lengths) > max_len:
                raise ValueError(f"max_seqlen ({max_len}) is below the longest sequence in {name} ({max(lengths)})")
    if layout is not None:
        longest_q = max_seqlen_q if max_seqlen_q is not None else q.shape[0]
        longest_k = max_seqlen_k if max_seqlen_k is not None else k.shape[0]
        need_q, need_k = -(-longest_q // layout.block_size), -(-longest_k // layout.block_size)
        if need_q > layout.num_q_blocks or need_k > layout.num_k_blocks:
            raise ValueError(f"layout has {layout.num_q_blocks}x{layout.num_k_blocks} blocks of {layout.block_size} "
                             f"but sequences up to {longest_q}x{longest_k} tokens need {need_q}x{need_k}")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           return_lse=False, backend=None, layout: BlockSparseLayout | None = None):
    """Attention over packed sequences.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_*: (B + 1,) int32.
    layout: optional block-sparse pattern (masks.BlockSparseLayout) ANDed with causal/window, per sequence.
    Returns out (total_q, Hq, D) and, with return_lse, lse (Hq, total_q) fp32.
    """
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p} is not supported (inference and our training use 0)")
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size, layout)
    name = backend or choose_backend(q, cu_seqlens_q, cu_seqlens_k, causal, window_size, layout)
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}")
    extra = {}
    if layout is not None:
        if not _supports_layout(name):
            raise ValueError(f"attention backend {name!r} does not take a block-sparse layout; "
                             f"use 'tiled', 'sdpa' or 'reference'")
        extra["layout"] = layout
    return BACKENDS[name](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size),
                          return_lse=return_lse, **extra)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    return_lse=False, backend=None, layout: BlockSparseLayout | None = None):
    """Attention in BSHD layout. q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D).

    Returns out (B, Sq, Hq, D) and, with return_lse, lse (B, Hq, Sq) fp32.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, seqlen, heads, head_dim); got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    batch, seqlen_q = q.shape[:2]
    seqlen_k = k.shape[1]
    meta = AttentionMetadata.from_seqlens([seqlen_q] * batch, [seqlen_k] * batch, device=q.device)
    out = flash_attn_varlen_func(q.reshape(batch * seqlen_q, *q.shape[2:]), k.reshape(batch * seqlen_k, *k.shape[2:]),
                                 v.reshape(batch * seqlen_k, *v.shape[2:]), meta.cu_seqlens_q, meta.cu_seqlens_k,
                                 seqlen_q, seqlen_k, dropout_p, softmax_scale, causal, window_size, return_lse,
                                 backend, layout)
    if return_lse:
        out, lse = out
        return out.view(batch, seqlen_q, *out.shape[1:]), lse.view(-1, batch, seqlen_q).transpose(0, 1)
    return out.view(batch, seqlen_q, *out.shape[1:])


def attention(q, k, v, meta: AttentionMetadata, window_size=(-1, -1), softmax_scale=None, backend=None,
              layout: BlockSparseLayout | None = None):
    """What the model calls: varlen attention described by one metadata object."""
    return flash_attn_varlen_func(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                                  meta.max_seqlen_k, softmax_scale=softmax_scale, causal=meta.causal,
                                  window_size=window_size, backend=backend, layout=layout)


__all__ = ["AttentionMetadata", "BACKENDS", "BlockSparseLayout", "attention", "choose_backend", "flash_attn_func",
           "flash_attn_varlen_func", "sdpa_varlen_attention"]
