"""Tile configs of the FlashAttention kernels (`triton_flash.py`): the candidate lists and which of them fit.

Policy only: `Launcher` (`triton_launch.py`) runs a kernel with these; `triton_flash._launcher` picks the list
of a kernel kind and, for a block-sparse layout, keeps the configs whose tiles divide its block size.
"""

from __future__ import annotations

import triton

from longreach.attention.triton_launch import SMEM_BUDGET


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Hopper candidates in order of preference; _fits drops those whose tiles overflow shared memory or
# registers for the head dim and dtype. `regs` counts fp32 accumulator elements per thread.
_FWD_CONFIGS = [
    _config(128, 64, 8, 3),
    _config(128, 128, 8, 3),
    _config(64, 64, 4, 3),
    _config(64, 64, 8, 2),
    _config(64, 32, 4, 2),
    _config(32, 32, 4, 1),
]
_DKDV_CONFIGS = [
    _config(32, 128, 8, 3),
    _config(64, 64, 8, 2),
    _config(32, 64, 4, 3),
    _config(32, 64, 8, 2),
    _config(16, 32, 4, 1),
]
_DQ_CONFIGS = [_config(128, 32, 8, 3), _config(64, 64, 4, 3), _config(64, 32, 8, 2), _config(32, 32, 4, 1)]
_INTERPRET_META = {
    "fwd": {"BLOCK_M": 32, "BLOCK_N": 16},
    "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32},
    "dq": {"BLOCK_M": 32, "BLOCK_N": 16},
}
_SMALLEST = _config(16, 16, 4, 1)  # tl.dot's smallest tile: for layouts of 16-token blocks


def _fits(kind: str, config: triton.Config, block_d: int, elt: int) -> bool:
    bm, bn, warps, stages = (
        config.kwargs["BLOCK_M"],
        config.kwargs["BLOCK_N"],
        config.num_warps,
        config.num_stages,
    )
    if kind == "fwd":  # q resident, k/v streamed; acc (BM, D)
        smem, regs = elt * (bm * block_d + stages * 2 * bn * block_d), bm * block_d
    elif kind == "dkdv":  # k/v resident, q/dO streamed; dk, dv (BN, D)
        smem, regs = elt * (2 * bn * block_d + stages * 2 * bm * block_d), 2 * bn * block_d
    else:  # q/dO resident, k/v streamed; dq (BM, D)
        smem, regs = elt * (2 * bm * block_d + stages * 2 * bn * block_d), bm * block_d
    return smem <= SMEM_BUDGET and regs <= 128 * 32 * warps


def _divides(meta: dict, layout_block: int) -> bool:
    return layout_block % meta["BLOCK_M"] == 0 and layout_block % meta["BLOCK_N"] == 0
