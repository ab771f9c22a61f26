"""Triton FlashAttention-2 over packed (varlen) sequences: configs, launch, autograd and the public entry point.

The kernels, and how they walk the causal/window band and a block-sparse layout, are in
`triton_flash_kernels.py`; their tile configs in `triton_flash_configs.py`; the launch machinery they share
with the decode kernels in `triton_launch.py`. On a GPU the configs are autotuned per (head dim, causal,
dtype) over a small Hopper set (LONGREACH_TRITON_AUTOTUNE=0 takes the first config that fits instead); under
TRITON_INTERPRET=1 one small fixed config keeps CPU tests fast. With a layout only configs whose
tiles divide its block size take part, so each kernel tile lies in one layout cell. `configs=` pins a
kernel's config instead (the tests run every config of the lists this way).

FlashAttention's contract for rows past cu_seqlens_q[-1] (padding): output 0, lse -inf, and zero
gradients for them (and for keys past cu_seqlens_k[-1]). The kernels only visit rows inside sequences,
so those rows are cleared here, from cu_seqlens read on the host (`longreach.attention.seqlens_summary`).

Input is validated once per call: the public API (`flash_attn_varlen_func`) runs `check_varlen_inputs` and
then `varlen_attention_prechecked`, which checks only the kernels' own limits; a direct call of
`varlen_attention` runs the same check itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton

from longreach.attention import check_varlen_inputs, seqlens_summary, triton_launch
from longreach.attention.masks import BlockSparseLayout
from longreach.attention.triton_flash_configs import (
    _DKDV_CONFIGS,
    _DQ_CONFIGS,
    _FWD_CONFIGS,
    _INTERPRET_META,
    _SMALLEST,
    _divides,
    _fits,
)
from longreach.attention.triton_flash_configs import _config as _config
from longreach.attention.triton_flash_kernels import (
    EMPTY,
    bwd_dkdv_kernel,
    bwd_dq_kernel,
    bwd_preprocess,
    fwd_kernel,
)
from longreach.attention.triton_launch import AUTOTUNE, INTERPRET, LOG2E, UNBOUNDED
from longreach.attention.triton_launch import SMEM_BUDGET as SMEM_BUDGET

MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- configs and launch


class Launcher(triton_launch.Launcher):
    """`triton_launch.Launcher` reading INTERPRET and AUTOTUNE from this module, so setting them here (the
    tests do, to drive the first-fit path on CPU) steers the FlashAttention kernels' launches, as it always has."""

    def _interpret(self) -> bool:
        return INTERPRET

    def _autotune(self) -> bool:
        return AUTOTUNE


_KERNELS = {
    "fwd": (fwd_kernel, _FWD_CONFIGS),
    "dkdv": (bwd_dkdv_kernel, _DKDV_CONFIGS),
    "dq": (bwd_dq_kernel, _DQ_CONFIGS),
}


@functools.lru_cache(maxsize=None)
def _launcher(kind: str, layout_block: int) -> Launcher:
    """The launcher of kernel `kind`; for a layout of `layout_block`-token blocks (0: none), only the configs
    whose BLOCK_M and BLOCK_N divide it, so every kernel tile lies in one layout cell."""
    fn, configs = _KERNELS[kind]
    interpret_meta = _INTERPRET_META[kind]
    if layout_block:
        configs = [c for c in configs + [_SMALLEST] if _divides(c.kwargs, layout_block)]
        if not configs:
            raise ValueError(
                f"layout block size {layout_block} is not a multiple of 16: the Triton backend's "
                "kernel tiles (16 tokens or more) must divide the layout's blocks "
                "(backend='tiled' takes any block size)"
            )
        if not _divides(interpret_meta, layout_block):
            interpret_meta = _SMALLEST.kwargs
    fits = lambda config, args: _fits(kind, config, args["BLOCK_D"], args["Q"].element_size())  # noqa: E731
    return Launcher(fn, configs, ["BLOCK_D", "IS_CAUSAL"], fits, interpret_meta)


def _layout_tables(layout: BlockSparseLayout | None, device) -> tuple | None:
    """The layout as the kernels read it: cells (nq, nk) int32 holding EMPTY (-2), FULL (-1) or an index into
    tiles (num_partial, bs, bs) int8 (one all-zero tile when there are none: never read)."""
    if layout is None:
        return None
    cells = torch.where(layout.blocks, layout.tile_index, EMPTY.value).to(device, torch.int32).contiguous()
    tiles = layout.tiles if layout.tiles.shape[0] else layout.tiles.new_zeros(1, *layout.tiles.shape[1:])
    return cells, tiles.to(device, torch.int8).contiguous(), layout.block_size


def _common(q, plan, group, cu_q):
    head_dim = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    # without a layout the kernels never read Cells and Tiles: cu_q stands in for them
    cells, tiles, layout_block = plan.tables if plan.tables is not None else (cu_q, cu_q, 0)
    return dict(
        window_left=plan.window_left,
        window_right=plan.window_right,
        group=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        EVEN_D=head_dim == block_d,
        IS_CAUSAL=plan.causal,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        Cells=cells,
        Tiles=tiles,
        stride_cells=cells.stride(0),
        LAYOUT_BLOCK=layout_block,
    )


@dataclass(frozen=True)
class _Plan:
    """What the kernels take besides tensors, fixed on the host at the call (nothing is read back later)."""

    max_seqlen_q: int
    max_seqlen_k: int
    end_q: int  # cu_seqlens_q[-1]: rows from here on are padding (output 0, lse -inf, zero dq)
    end_k: int  # cu_seqlens_k[-1]: keys from here on get zero dk, dv
    softmax_scale: float
    causal: bool
    window_left: int
    window_right: int
    tables: tuple | None  # _layout_tables(layout)
    configs: dict  # kernel kind -> a pinned triton.Config (empty: autotune)


def _forward(q, k, v, cu_q, cu_k, plan: _Plan):
    total_q, num_heads, _ = q.shape
    batch = cu_q.numel() - 1
    out = torch.empty_like(q)  # (total_q, Hq, D)
    lse = torch.empty(num_heads, total_q, dtype=torch.float32, device=q.device)  # (Hq, total_q)
    out[plan.end_q :].zero_()
    lse[:, plan.end_q :].fill_(float("-inf"))
    if plan.end_q == 0:  # no query rows
        return out, lse
    common = _common(q, plan, num_heads // k.shape[1], cu_q)
    grid = lambda meta: (triton.cdiv(plan.max_seqlen_q, meta["BLOCK_M"]), num_heads, batch)  # noqa: E731
    _launcher("fwd", common["LAYOUT_BLOCK"])(
        grid,
        config=plan.configs.get("fwd"),
        Q=q,
        K=k,
        V=v,
        Out=out,
        Lse=lse,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        stride_qt=q.stride(0),
        stride_qh=q.stride(1),
        stride_kt=k.stride(0),
        stride_kh=k.stride(1),
        stride_vt=v.stride(0),
        stride_vh=v.stride(1),
        stride_ot=out.stride(0),
        stride_oh=out.stride(1),
        stride_lh=lse.stride(0),
        qk_scale=plan.softmax_scale * LOG2E,
        **common,
    )
    return out, lse


def _backward(do, q, k, v, out, lse, cu_q, cu_k, plan: _Plan):
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    batch = cu_q.numel() - 1
    if plan.end_q == 0 or plan.end_k == 0:  # no query sees a key
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = _backward_delta(do, out, lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dq[plan.end_q :].zero_()  # padding rows: the kernels visit only rows inside sequences
    dk[plan.end_k :].zero_()
    dv[plan.end_k :].zero_()
    common = _common(q, plan, num_heads // num_kv_heads, cu_q)
    strides = _backward_strides(do, q, k, v, lse, plan)
    _launcher("dkdv", common["LAYOUT_BLOCK"])(
        lambda meta: (triton.cdiv(plan.max_seqlen_k, meta["BLOCK_N"]), num_kv_heads, batch),
        config=plan.configs.get("dkdv"),
        Q=q,
        K=k,
        V=v,
        dOut=do,
        Lse=lse,
        Delta=delta,
        dK=dk,
        dV=dv,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        stride_dkt=dk.stride(0),
        stride_dkh=dk.stride(1),
        stride_dvt=dv.stride(0),
        stride_dvh=dv.stride(1),
        **strides,
        **common,
    )
    _launcher("dq", common["LAYOUT_BLOCK"])(
        lambda meta: (triton.cdiv(plan.max_seqlen_q, meta["BLOCK_M"]), num_heads, batch),
        config=plan.configs.get("dq"),
        Q=q,
        K=k,
        V=v,
        dOut=do,
        Lse=lse,
        Delta=delta,
        dQ=dq,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        stride_dqt=dq.stride(0),
        stride_dqh=dq.stride(1),
        **strides,
        **common,
    )
    return dq, dk, dv


def _backward_delta(do, out, lse):
    """delta = rowsum(dO * O) per (head, query row), (Hq, total_q) fp32 like lse: FlashAttention-2's
    preprocessing pass, so the dk/dv and dq kernels get the softmax gradient's row term without reading O."""
    total_q, num_heads, head_dim = out.shape
    delta = torch.empty_like(lse)  # (Hq, total_q)
    bwd_preprocess[(triton.cdiv(total_q, 64), num_heads)](
        out,
        do,
        delta,
        out.stride(0),
        out.stride(1),
        do.stride(0),
        do.stride(1),
        delta.stride(0),
        total_q,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=64,
    )
    return delta


def _backward_strides(do, q, k, v, lse, plan: _Plan) -> dict:
    """The strides and scales the dk/dv and dq kernels both take."""
    return dict(
        stride_qt=q.stride(0),
        stride_qh=q.stride(1),
        stride_kt=k.stride(0),
        stride_kh=k.stride(1),
        stride_vt=v.stride(0),
        stride_vh=v.stride(1),
        stride_dot=do.stride(0),
        stride_doh=do.stride(1),
        stride_lh=lse.stride(0),
        qk_scale=plan.softmax_scale * LOG2E,
        sm_scale=plan.softmax_scale,
    )


class _FlashAttnVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, plan):
        with _on_device(q):
            out, lse = _forward(q, k, v, cu_q, cu_k, plan)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        with _on_device(q):
            dq, dk, dv = _backward(dout, q, k, v, out, lse, cu_q, cu_k, ctx.plan)
        return dq, dk, dv, None, None, None


class _on_device:
    """Launch on the tensor's GPU rather than the current one (no-op on CPU / interpreter)."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.cuda.device(t.device) if t.is_cuda else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


def _check_kernel_limits(
    q, k, v, cu_seqlens_q, layout: BlockSparseLayout | None, configs: dict | None
) -> dict:
    """What the kernels need beyond the contract `check_varlen_inputs` checks (run it first): unit-stride
    rows, a head dim the tiles take, a batch one grid axis holds, a device to run on, layout blocks some
    tile divides, and well-formed pinned configs. Returns the configs as a dict."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"{name} must be contiguous in its last dim (stride(-1) == 1), got strides {t.stride()}"
            )
    if not 1 <= q.shape[2] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[2]} is unsupported: the Triton backend takes 1..{MAX_HEAD_DIM}")
    if cu_seqlens_q.numel() - 1 > 65535:
        raise ValueError(f"batch {cu_seqlens_q.numel() - 1} exceeds the 65535 sequences one launch can take")
    if not (q.is_cuda or INTERPRET):
        raise ValueError(
            f"the Triton backend needs CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 "
            "before importing triton to run it on CPU"
        )
    layout_block = layout.block_size if layout is not None else 0
    if layout_block:
        for kind in _KERNELS:
            _launcher(kind, layout_block)  # raises when no config's tiles divide the block size
    return _check_configs(configs or {}, layout_block)


def _check_configs(configs: dict, layout_block: int) -> dict:
    """Pinned configs: known kernel kinds, triton.Config objects with both tile sizes, dividing a layout's blocks."""
    for kind, config in configs.items():
        if kind not in _KERNELS:
            raise ValueError(f"configs names kernel {kind!r}; the kernels are {sorted(_KERNELS)}")
        if not isinstance(config, triton.Config) or set(config.kwargs) != {"BLOCK_M", "BLOCK_N"}:
            raise ValueError(
                f"configs[{kind!r}] must be a triton.Config of BLOCK_M and BLOCK_N, got {config!r}"
            )
        if layout_block and not _divides(config.kwargs, layout_block):
            raise ValueError(
                f"configs[{kind!r}] tiles {config.kwargs} do not divide the layout's {layout_block}-token "
                "blocks"
            )
    return dict(configs)


def varlen_attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    return_lse=False,
    layout: BlockSparseLayout | None = None,
    configs: dict | None = None,
):
    """FlashAttention-2 over packed sequences, differentiable in q, k and v.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D) with Hq % Hkv == 0 and D <= 256; cu_seqlens_q/_k:
    (B + 1,) int32, ending at most at total_q / total_k (rows past the end are padding: output 0, lse -inf,
    zero gradients); max_seqlen_q/_k: the longest query / key length (sizes the grid; checked against
    cu_seqlens, which are read on the host once per tensor; None reads them).
    layout: optional block-sparse pattern ANDed with causal/window, indexed by positions within each
    sequence (one layout for every sequence); its block size must be a multiple of 16.
    configs: optional {"fwd" | "dkdv" | "dq": triton.Config} pinning those kernels' tiles instead of the
    autotuner's choice (the tests run every config of the lists this way).
    Returns out (total_q, Hq, D) in q's dtype and, with return_lse, lse (Hq, total_q) fp32 (natural log).
    """
    # Called directly (tests, benchmarks), nothing has checked the arguments, and the kernels index raw
    # pointers with them: offsets past the tensors would read and write out of bounds, a max_seqlen below
    # the longest sequence would leave rows unwritten. So this entry runs the public API's one check.
    max_seqlen_q, max_seqlen_k = check_varlen_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size, layout
    )
    return varlen_attention_prechecked(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        causal,
        window_size,
        return_lse,
        layout,
        configs,
    )


def varlen_attention_prechecked(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    return_lse=False,
    layout: BlockSparseLayout | None = None,
    configs: dict | None = None,
):
    """`varlen_attention` for a caller that has run `check_varlen_inputs` on these arguments and passes the
    max_seqlen_q/_k it returned (the public API's registry entry): checks only the kernels' own limits."""
    configs = _check_kernel_limits(q, k, v, cu_seqlens_q, layout, configs)
    # the check's remembered host read of the offsets: no second device-to-host copy
    end_q, end_k = seqlens_summary(cu_seqlens_q)[1], seqlens_summary(cu_seqlens_k)[1]
    left, right = (UNBOUNDED if w < 0 else min(int(w), UNBOUNDED) for w in window_size)
    plan = _Plan(
        int(max_seqlen_q),
        int(max_seqlen_k),
        end_q,
        end_k,
        float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1]),
        bool(causal),
        left,
        0 if causal else right,
        _layout_tables(layout, q.device),
        configs,
    )
    out, lse = _FlashAttnVarlen.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, plan)
    return (out, lse) if return_lse else out


__all__ = ["MAX_HEAD_DIM", "Launcher", "varlen_attention", "varlen_attention_prechecked"]
