"""Batch-invariant mode: a token's logits do not depend on what else is in its step.

In bf16 (and fp16) the reduction order of a matmul or of attention can change with the batch's shape, so
the same prompt gives slightly different logits alone, next to other requests, or prefilled in other
chunks, and near-ties flip greedy tokens. "Defeating nondeterminism in LLM inference" (Thinking Machines,
2025) fixes this by making every reduction's order independent of the batch: matmuls with one fixed tile
config, row-wise norms and softmax, and attention with a fixed KV split size; vLLM ships it as
VLLM_BATCH_INVARIANT=1. Here the mode is `LLM(..., batch_invariant=True)`, `longreach serve
--batch-invariant` or LONGREACH_BATCH_INVARIANT=1, and it swaps in:

- linears (`BatchInvariantLinear`, a module swap): the token dim is cut into tiles of `ROW_TILE` rows (the
  last one zero-padded) and every tile runs the same-shaped GEMM, so the library picks the same kernel and
  blocking for every row whatever the number of tokens (measured on this CPU: fp32 `F.linear` gives a row
  different bits at M = 1 than at M >= 2; the tiled one does not);
- attention (`attention.batch_invariant`, through `engine.bi_layout`): one path for decodes, fresh prefills
  and later chunks, over the paged cache in fixed, position-aligned query tiles and KV splits;
- RMSNorm, the sampler's fp32 log-softmax, RoPE and the activations are row-wise or elementwise already.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from longreach.model.quant import Int4Linear, Int8Linear

BATCH_INVARIANT_ENV = "LONGREACH_BATCH_INVARIANT"
ROW_TILE = 16  # rows per GEMM call on the CPU: every call of a batch-invariant linear has exactly this many
# on CUDA: a decode's padding to it is nearly free (the GEMM is bound by reading the weights), and fewer tiles
# mean fewer launches in a long prefill
ROW_TILE_CUDA = 128


def resolve_batch_invariant(flag: bool | None) -> bool:
    """The mode asked for: `flag` when given, else LONGREACH_BATCH_INVARIANT (1/true/yes on, 0/false/no/''
    off; anything else is an error naming the value)."""
    if flag is not None:
        if not isinstance(flag, bool):
            raise ValueError(f"batch_invariant={flag!r} must be True, False or None")
        return flag
    value = os.environ.get(BATCH_INVARIANT_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{BATCH_INVARIANT_ENV}={value!r} must be 1/true/yes/on or 0/false/no/off")


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with every GEMM exactly (ROW_TILE, in) x (in, out) (ROW_TILE_CUDA rows on
    CUDA): x (..., in) -> (..., out). Rows are independent in a GEMM; what can change a row's bits is the
    kernel (blocking, split-K) the library picks for the call's shape, and here that shape never changes."""
    tile_rows = ROW_TILE_CUDA if x.is_cuda else ROW_TILE
    rows = x.reshape(-1, x.shape[-1])
    num_rows = rows.shape[0]
    pad = -num_rows % tile_rows
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    out = torch.cat([F.linear(tile, weight, bias) for tile in rows.split(tile_rows)])
    return out[:num_rows].view(*x.shape[:-1], weight.shape[0])


class BatchInvariantLinear(nn.Linear):
    """nn.Linear computed in fixed row tiles (`tiled_linear`); swapped in by class, so parameters, their
    names and tied weights stay as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_linear(x, self.weight, self.bias)


def apply_batch_invariant(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear of `model` for `BatchInvariantLinear` in place; returns the model.
    Quantized linears (int8/int4 weight-only) have their own kernels and are refused, naming the module."""
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = BatchInvariantLinear
        elif isinstance(module, (Int8Linear, Int4Linear)):
            raise ValueError(
                f"batch_invariant does not support quantized linears ({name}: {type(module).__name__}); "
                "load the model without weight quantization"
            )
    return model
