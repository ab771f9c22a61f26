"""Chunked cross-entropy over the LM head: never the whole (tokens, vocab) logits at once.

The full-logits loss materialises `(T, V)` logits, their fp32 copy and, in backward, their gradient:
with Llama 3's 128K vocabulary and 32K tokens that is 17 GB of fp32 logits alone. Here the loss is one
custom autograd Function (the approach of Liger Kernel's fused linear cross-entropy, torchtune's chunked
loss and Apple's Cut Cross-Entropy): the forward walks the tokens `chunk_size` at a time, computing
each chunk's logits, log-sum-exp and target logit in fp32 and keeping only the summed loss; the
backward recomputes each chunk's logits, turns them into `softmax - one_hot` (scaled by the incoming
gradient) and accumulates the gradients of the hidden states and of the head weight in fp32. Peak extra
memory is O(chunk_size x V) instead of O(T x V); the price is one extra head matmul per chunk.

The logits are computed exactly as `F.linear(hidden, weight)` would in the given dtype (bf16 operands
under autocast, like the full path) and upcast to fp32 before the softmax, so the loss matches the
full-logits loss to fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longreach.train.data import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 1024


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, H) x (V, H) -> (n, V) fp32 logits, the matmul in `dtype` as autocast would run it."""
    return F.linear(hidden.to(dtype), weight.to(dtype)).float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, ignore_index, dtype):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            logits = _chunk_logits(hidden[start:stop], weight, dtype)  # (n, V) fp32
            target = labels[start:stop]
            valid = target != ignore_index
            picked = logits.gather(1, target.clamp(min=0)[:, None]).squeeze(1)  # (n,)
            total += (torch.logsumexp(logits, dim=1) - picked)[valid].sum()
            del logits  # before the next chunk's: only one chunk of logits lives at a time
        ctx.save_for_backward(hidden, weight, labels)
        ctx.args = (chunk_size, ignore_index, dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels = ctx.saved_tensors
        chunk_size, ignore_index, dtype = ctx.args
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # fp32 operands keep fp32 runs exact; bf16 runs multiply in bf16 and accumulate in fp32
        matmul_dtype = torch.float32 if dtype == torch.float32 else dtype
        weight_m = weight.to(matmul_dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:stop]
            target = labels[start:stop]
            valid = target != ignore_index
            grad_logits = torch.softmax(_chunk_logits(h, weight, dtype), dim=1)  # (n, V) fp32
            rows = valid.nonzero().squeeze(1)
            grad_logits[rows, target[rows]] -= 1.0
            grad_logits.mul_((valid.float() * grad_total)[:, None])  # ignored rows get no gradient
            g = grad_logits.to(matmul_dtype)
            del grad_logits
            if need_hidden:
                grad_hidden[start:stop] = (g @ weight_m).to(hidden.dtype)  # (n, H)
            if need_weight:
                grad_weight.add_(g.t() @ h.to(matmul_dtype))  # (V, H), summed in fp32
            del g  # before the next chunk's softmax
        return grad_hidden, grad_weight.to(weight.dtype) if need_weight else None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "sum",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cross-entropy of `F.linear(hidden, weight)` against `labels`, `chunk_size` tokens at a time.

    hidden: (T, H); weight: (V, H) (the LM head, tied or not); labels: (T,) int64 with `ignore_index`
    where a token has no target. compute_dtype: the dtype of the head matmul (default: the active
    autocast dtype on hidden's device, else weight's dtype). reduction: "sum" (fp32) or "mean" over
    the tokens with a target (NaN when there is none, as F.cross_entropy gives).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (tokens, hidden) and weight (vocab, hidden); got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be ({hidden.shape[0]},), one per token")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r}; choose 'sum' or 'mean'")
    if compute_dtype is None:
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        compute_dtype = torch.get_autocast_dtype(device) if autocast else weight.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        total = _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_size, ignore_index, compute_dtype)
    if reduction == "mean":
        return total / (labels != ignore_index).sum()
    return total


__all__ = ["DEFAULT_CHUNK_SIZE", "chunked_cross_entropy"]
