"""A ten-second check that the Triton kernels are right on this GPU before we train with them.

Forward and backward of packed, causal, GQA attention in bf16 at the demo model's head dim, against
the fp32 reference under FlashAttention's test rule. Exit status 0 when it holds, 1 otherwise.
Usage: python benchmarks/triton_sanity.py [--head-dim 32]
"""

import argparse
import sys

import torch

from longreach.attention import reference
from longreach.attention.triton_flash import varlen_attention


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=32)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    torch.manual_seed(0)
    lens = [300, 17, 512, 195]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total, hq, hkv, d = sum(lens), 8, 2, args.head_dim
    q = torch.randn(total, hq, d, device=device)
    k = torch.randn(total, hkv, d, device=device)
    v = torch.randn(total, hkv, d, device=device)
    grad = torch.randn(total, hq, d, device=device)

    def run(fn, dt, **kw):
        qi, ki, vi = (t.detach().to(dt).clone().requires_grad_() for t in (q, k, v))
        out = fn(qi, ki, vi, cu, cu, max(lens), max(lens), causal=True, **kw)
        out.backward(grad.to(dt))
        return [t.float() for t in (out, qi.grad, ki.grad, vi.grad)]

    exact = run(reference.varlen_attention, torch.float32)
    same = run(reference.varlen_attention, dtype, upcast=False)
    ours = run(varlen_attention, dtype)
    ok = True
    for name, e, s, o in zip(("out", "dq", "dk", "dv"), exact, same, ours):
        err, bound = (o - e).abs().max().item(), 2 * (s - e).abs().max().item() + 1e-5
        good = err <= max(bound, 3 * (s - e).abs().max().item())  # gradients get FlashAttention's 3x
        ok &= good
        print(
            f"{name}: max err {err:.2e} (same-precision reference {bound / 2:.2e}) {'ok' if good else 'FAIL'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
