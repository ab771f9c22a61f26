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
  sdpa       torch.nn.functional.scaled_dot_product_attention, one call per distinct sequence shape (sdpa.py)
  triton     FlashAttention forward/backward kernels (triton_flash.py), imported on first use; skips the
             empty blocks of a layout whose block size is a multiple of 16
`backend=None` picks: triton for CUDA tensors when it imports; otherwise SDPA for plain full/causal
attention (SDPA's CPU flash kernel is the fastest exact path there, and packed documents run as one call
per document, never touching cross-document blocks: measured 4 x 2K causal documents in 0.12 s vs 0.16 s
tiled). SDPA's is_causal is top-left aligned, which equals bottom-right when query and key lengths match
and for decode's single query; on CPU, causal with more keys than queries (a prefill chunk after earlier
ones) runs as two flash calls merged by their log-sum-exps when no gradient is needed (chunked prefill of a
32K prompt in benchmarks/serving.py: 98 s, against 145 s with the tiled backend). Tiled takes anything with a
window, a block-sparse layout, or unequal causal lengths where SDPA would need a dense mask, where skipping
blocks wins.

Input is validated once per call, by `check_varlen_inputs` in `flash_attn_varlen_func`; backends called
through it take their input as checked (see the validation section below).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch.utils.weak import WeakIdKeyDictionary

from longreach.attention import reference, tiled
from longreach.attention.masks import BlockSparseLayout
from longreach.attention.sdpa import sdpa_varlen_attention


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
    def from_seqlens(
        seqlens_q: list[int],
        seqlens_k: list[int] | None = None,
        device: torch.device | str = "cpu",
        causal: bool = True,
    ) -> AttentionMetadata:
        seqlens_k = seqlens_q if seqlens_k is None else seqlens_k
        if len(seqlens_q) != len(seqlens_k):
            raise ValueError(f"{len(seqlens_q)} query lengths but {len(seqlens_k)} key lengths")

        def cu(lens):
            out = torch.zeros(len(lens) + 1, dtype=torch.int32)
            out[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
            return out.to(device)

        return AttentionMetadata(
            cu(seqlens_q), cu(seqlens_k), max(seqlens_q, default=0), max(seqlens_k, default=0), causal
        )


# ---------------------------------------------------------------- registry

_TRITON: dict = {}


def _load_triton():
    """The Triton varlen kernel, or None (with the reason kept) when it cannot be imported."""
    if "fn" not in _TRITON:
        try:
            from longreach.attention import triton_flash  # lazy: optional heavy dependency (triton)

            _TRITON.update(fn=triton_flash.varlen_attention_prechecked, error=None)
        except Exception as exc:  # triton missing, no driver, or the module failing: report, never pick
            _TRITON.update(fn=None, error=f"{type(exc).__name__}: {exc}")
    return _TRITON["fn"]


def _triton_backend(*args, **kwargs):
    fn = _load_triton()
    if fn is None:
        raise RuntimeError(
            f"attention backend 'triton' is unavailable ({_TRITON['error']}); "
            f"use backend='tiled' or 'sdpa' on CPU"
        )
    return fn(*args, **kwargs)


# Each takes input already checked by check_varlen_inputs: call them through flash_attn_varlen_func.
BACKENDS = {
    "reference": reference.varlen_attention,
    "tiled": tiled.varlen_attention,
    "sdpa": sdpa_varlen_attention,
    "triton": _triton_backend,
}


def _supports_layout(name: str) -> bool:
    fn = _load_triton() if name == "triton" else BACKENDS[name]
    return fn is not None and "layout" in inspect.signature(fn).parameters


def choose_backend(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    window_size=(-1, -1),
    layout: BlockSparseLayout | None = None,
) -> str:
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
    is_training = torch.is_grad_enabled() and q.requires_grad
    if (
        layout is None
        and tuple(window_size) == (-1, -1)
        and (
            not causal
            or cu_seqlens_q is cu_seqlens_k
            or (q.device.type == "cpu" and not is_training)  # prefix + causal
            or torch.equal(cu_seqlens_q, cu_seqlens_k)
            or torch.equal(
                cu_seqlens_q,
                torch.arange(len(cu_seqlens_q), dtype=cu_seqlens_q.dtype, device=cu_seqlens_q.device),
            )
        )
    ):  # one query each: decode
        return "sdpa"
    return "tiled"


# ---------------------------------------------------------------- validation, once per call path
# flash_attn_varlen_func runs check_varlen_inputs (flash_attn_func and attention reach it through that
# function) and then calls a backend, which takes its input as checked. Of the backends only the Triton one
# checks again when called directly (triton_flash.varlen_attention, through this same function): its kernels
# index raw pointers, so bad offsets there read and write out of bounds, where PyTorch's indexing in the
# others fails loudly on its own.

# cu_seqlens already read on the host, by tensor identity: (version counter or None, summary)
_SEQLENS_READ = WeakIdKeyDictionary()


def seqlens_summary(cu: torch.Tensor) -> tuple[int, int, int, int]:
    """(first offset, last offset, longest length, shortest length) of cu_seqlens, read on the host.

    On CUDA the read is a device-to-host copy that waits for the stream, and the checks it serves need it:
    a max_seqlen below the longest sequence would leave rows silently unwritten, offsets past the tensors
    would read and write out of bounds. It is remembered per tensor: a model's layers all pass the same
    metadata (`AttentionMetadata.from_seqlens` builds it from host lengths once per step), so a forward pass
    waits once per cu_seqlens tensor, not once per layer. An in-place change is seen through the tensor's
    version counter; inference tensors keep none, so one changed in place after a call is not read again.
    """
    version = None if cu.is_inference() else cu._version
    memo = _SEQLENS_READ.get(cu)
    if memo is not None and memo[0] == version:
        return memo[1]
    if cu.device.type == "cpu":  # nothing to wait for: Python over the offsets beats four tensor ops
        values = cu.tolist()
        lengths = [b - a for a, b in pairwise(values)]
        summary = (values[0], values[-1], max(lengths, default=0), min(lengths, default=0))
    elif cu.numel() > 1:  # one small device-to-host copy
        lengths = cu[1:] - cu[:-1]
        summary = tuple(torch.stack([cu[0], cu[-1], lengths.max(), lengths.min()]).tolist())
    else:  # no sequences
        summary = (cu.item(), cu.item(), 0, 0)
    _SEQLENS_READ[cu] = (version, summary)
    return summary


def check_varlen_inputs(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    window_size=(-1, -1),
    layout: BlockSparseLayout | None = None,
) -> tuple[int, int]:
    """The one validation of a varlen attention call; each error names the bad value and what is accepted.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_*: (B + 1,) int32 on q's device, read on the
    host once per tensor (`seqlens_summary`). Returns (max_seqlen_q, max_seqlen_k) as host ints, None
    replaced by the longest sequence.
    """
    _check_tensors(q, k, v)
    if len(window_size) != 2 or any(int(w) != w or w < -1 for w in window_size):
        raise ValueError(f"window_size must be two ints >= -1 (-1 = unbounded), got {tuple(window_size)}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            got = f"{getattr(cu, 'dtype', type(cu).__name__)} of shape {tuple(getattr(cu, 'shape', ()))}"
            raise ValueError(f"{name} must be a 1-D int32 tensor of batch + 1 offsets, got {got}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has "
            f"{cu_seqlens_k.numel()}; both must be batch + 1"
        )
    max_seqlen_q = _check_offsets("q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    max_seqlen_k = _check_offsets("k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    if layout is not None:
        bs = layout.block_size
        need_q, need_k = -(-max_seqlen_q // bs), -(-max_seqlen_k // bs)
        if need_q > layout.num_q_blocks or need_k > layout.num_k_blocks:
            raise ValueError(
                f"layout has {layout.num_q_blocks}x{layout.num_k_blocks} blocks of {bs} but "
                f"sequences up to {max_seqlen_q}x{max_seqlen_k} tokens need {need_q}x{need_k}"
            )
    return max_seqlen_q, max_seqlen_k


def _check_tensors(q, k, v):
    """Shapes, dtypes, devices, GQA grouping and head dims of q, k, v (THD layout)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be (tokens, heads, head_dim); got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"q, k, v must share one dtype of float16/bfloat16/float32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match in tokens and heads")
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"head dims differ: q {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]}")


def _check_offsets(side: str, cu: torch.Tensor, total: int, max_len) -> int:
    """cu_seqlens_<side> against the `total` tokens given and max_seqlen_<side>; returns max_seqlen as an
    int (None: the longest sequence)."""
    first, last, longest, shortest = seqlens_summary(cu)
    if first != 0 or shortest < 0 or last > total:
        # the error path may read the whole tensor: the message shows every offset
        raise ValueError(
            f"cu_seqlens_{side}={cu.tolist()} must start at 0, never decrease, and end at most "
            f"at the {total} tokens given" + (", but it decreases" if shortest < 0 else "")
        )
    if max_len is None:
        return longest
    if int(max_len) < longest:
        raise ValueError(
            f"max_seqlen_{side}={max_len} is below the longest sequence in cu_seqlens_{side} "
            f"({longest}): its rows past {max_len} would never be computed"
        )
    return int(max_len)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    return_lse=False,
    backend=None,
    layout: BlockSparseLayout | None = None,
):
    """Attention over packed sequences.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_*: (B + 1,) int32.
    layout: optional block-sparse pattern (masks.BlockSparseLayout) ANDed with causal/window, per sequence.
    Returns out (total_q, Hq, D) and, with return_lse, lse (Hq, total_q) fp32.
    """
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p} is not supported (inference and our training use 0)")
    max_seqlen_q, max_seqlen_k = check_varlen_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size, layout
    )
    name = backend or choose_backend(q, cu_seqlens_q, cu_seqlens_k, causal, window_size, layout)
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}")
    extra = {}
    if layout is not None:
        if not _supports_layout(name):
            raise ValueError(
                f"attention backend {name!r} does not take a block-sparse layout; "
                f"use 'tiled', 'sdpa' or 'reference'"
            )
        extra["layout"] = layout
    return BACKENDS[name](
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=tuple(window_size),
        return_lse=return_lse,
        **extra,
    )


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    return_lse=False,
    backend=None,
    layout: BlockSparseLayout | None = None,
):
    """Attention in BSHD layout. q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D).

    Returns out (B, Sq, Hq, D) and, with return_lse, lse (B, Hq, Sq) fp32.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (batch, seqlen, heads, head_dim); got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    batch, seqlen_q = q.shape[:2]
    seqlen_k = k.shape[1]
    meta = AttentionMetadata.from_seqlens([seqlen_q] * batch, [seqlen_k] * batch, device=q.device)
    out = flash_attn_varlen_func(
        q.reshape(batch * seqlen_q, *q.shape[2:]),  # (B * Sq, Hq, D)
        k.reshape(batch * seqlen_k, *k.shape[2:]),  # (B * Sk, Hkv, D)
        v.reshape(batch * seqlen_k, *v.shape[2:]),  # (B * Sk, Hkv, D)
        meta.cu_seqlens_q,
        meta.cu_seqlens_k,
        seqlen_q,
        seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        return_lse,
        backend,
        layout,
    )
    if return_lse:
        out, lse = out
        return out.view(batch, seqlen_q, *out.shape[1:]), lse.view(-1, batch, seqlen_q).transpose(0, 1)
    return out.view(batch, seqlen_q, *out.shape[1:])


def attention(
    q,
    k,
    v,
    meta: AttentionMetadata,
    window_size=(-1, -1),
    softmax_scale=None,
    backend=None,
    layout: BlockSparseLayout | None = None,
):
    """What the model calls: varlen attention described by one metadata object."""
    return flash_attn_varlen_func(
        q,
        k,
        v,
        meta.cu_seqlens_q,
        meta.cu_seqlens_k,
        meta.max_seqlen_q,
        meta.max_seqlen_k,
        softmax_scale=softmax_scale,
        causal=meta.causal,
        window_size=window_size,
        backend=backend,
        layout=layout,
    )


__all__ = [
    "BACKENDS",
    "AttentionMetadata",
    "BlockSparseLayout",
    "attention",
    "check_varlen_inputs",
    "choose_backend",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "sdpa_varlen_attention",
    "seqlens_summary",
]
