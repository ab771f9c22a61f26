"""FlashAttention's test rule, shared by the attention tests.

An output (or gradient) passes when max|out - truth| <= 2 * max|same_precision_ref - truth| + 1e-5.
truth is the reference in fp32 for fp16/bf16 inputs; for fp32 inputs, whose same-precision reference is
the fp32 reference itself, truth is the reference in fp64 (so the rule keeps a meaningful margin).
"""

from __future__ import annotations

import torch

from longreach.attention import reference

TOLERANCE_FACTOR = 2.0
TOLERANCE_FLOOR = 1e-5


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over finite entries; infinities (lse of empty rows) must match exactly."""
    a, b = a.double(), b.double()
    inf = torch.isinf(a)
    assert torch.equal(inf, torch.isinf(b)) and torch.equal(a[inf], b[inf]), "infinite entries differ"
    return (a[~inf] - b[~inf]).abs().max().item() if (~inf).any() else 0.0


def check(
    name: str, got: torch.Tensor, truth: torch.Tensor, same_precision: torch.Tensor, factor=TOLERANCE_FACTOR
):
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err, ref_err = max_err(got, truth), max_err(same_precision, truth)
    assert err <= factor * ref_err + TOLERANCE_FLOOR, (
        f"{name}: error {err:.3e} > {factor} x {ref_err:.3e} + 1e-5"
    )


def run(fn, q, k, v, dout):
    """out, lse, dq, dk, dv of fn(q, k, v) -> (out, lse), on fresh leaves."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return out.detach(), lse.detach(), dq, dk, dv


def truth_and_same_precision(q, k, v, dout, fn_reference):
    """fn_reference(q, k, v, upcast) -> (out, lse): returns (truth results, same-precision results)."""
    high = torch.float64 if q.dtype == torch.float32 else torch.float32
    truth = run(
        lambda a, b, c: fn_reference(a, b, c, True), q.to(high), k.to(high), v.to(high), dout.to(high)
    )
    same = run(lambda a, b, c: fn_reference(a, b, c, False), q, k, v, dout)
    return truth, same


def check_all(tag, got, truth, same, grad_factor=TOLERANCE_FACTOR):
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        check(f"{tag} {name}", got[i], truth[i], same[i], TOLERANCE_FACTOR if i < 2 else grad_factor)


def reference_varlen(cu_q, cu_k, **kwargs):
    def fn(q, k, v, upcast):
        return reference.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, upcast=upcast, **kwargs)

    return fn
