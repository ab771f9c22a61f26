"""Linear-cost approximations of softmax attention: Performer FAVOR+ and Linformer.

Performer (Choromanski et al. 2021, "Rethinking Attention with Performers"): positive orthogonal random
features `phi(x) = m^-1/2 exp(W x' - |x'|^2 / 2)` with `x' = x d^-1/4` give an unbiased estimate
`E[phi(q) . phi(k)] = exp(q . k / sqrt(d))`, so attention becomes `phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)`
in O(N m d). The rows of W are orthogonal within each block of d rows (lower variance than i.i.d.) and
carry chi(d)-distributed norms, so each row is still marginally Gaussian. Causal attention uses prefix
sums of phi(k) v^T, computed chunk by chunk (a masked C x C product inside a chunk, a carried (m, d) state
across chunks), so memory stays O(N m + C^2). Stabilised as in the paper's code: subtract the row max of
W x' for queries and the per-head max over all keys (both cancel in the ratio), add a small epsilon.

Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"): learned (n x k)
projections E, F compress keys and values along the sequence, so attention costs O(n k). Non-causal.
Tensors are BSHD `(batch, seqlen, heads, head_dim)` like `flash_attn_func`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def default_num_features(head_dim: int) -> int:
    """m ~ d ln d, the paper's recommendation."""
    return max(1, round(head_dim * math.log(head_dim))) if head_dim > 1 else 1


def orthogonal_random_features(
    num_features: int,
    head_dim: int,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """(num_features, head_dim) fp32 projection W: orthogonal rows in blocks of head_dim, chi(d) row norms."""
    if num_features < 1 or head_dim < 1:
        raise ValueError(f"num_features ({num_features}) and head_dim ({head_dim}) must be >= 1")
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(0 if seed is None else seed)
    blocks = []
    for _ in range(-(-num_features // head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))[None, :]  # unique QR: Haar-distributed rotation
        blocks.append(q.T)  # rows orthonormal
    rows = torch.cat(blocks)[:num_features]  # (m, d)
    norms = torch.randn(num_features, head_dim, generator=generator).norm(dim=1)  # chi(d)
    return (rows * norms[:, None]).to(device)


def favor_features(
    x: torch.Tensor, projection: torch.Tensor, is_query: bool, eps: float = 1e-6
) -> torch.Tensor:
    """Positive random features. x: (B, H, N, D); projection: (m, D) -> (B, H, N, m) fp32."""
    x = x.float() * x.shape[-1] ** -0.25  # x' = x d^-1/4
    wx = x @ projection.T  # (B, H, N, m)
    half_norm = (x * x).sum(-1, keepdim=True) / 2  # |x'|^2 / 2
    # the stabiliser is constant per query row / per head over keys, so it cancels in num / den
    stabiliser = wx.amax(-1, keepdim=True) if is_query else wx.amax(dim=(-2, -1), keepdim=True)
    return (torch.exp(wx - half_norm - stabiliser) + eps) * projection.shape[0] ** -0.5


def performer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_features: int | None = None,
    causal: bool = False,
    projection: torch.Tensor | None = None,
    seed: int = 0,
    chunk_size: int = 128,
) -> torch.Tensor:
    """FAVOR+ attention. q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D) -> (B, Sq, Hq, D) in q's dtype.

    num_features: m (default d ln d); projection: a fixed (m, D) W (else drawn from `seed`).
    Approximates softmax attention with scale 1/sqrt(D). Causal needs Sq == Sk.
    """
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if k.shape[-1] != head_dim or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and seqlen_q != seqlen_k:
        raise ValueError(f"causal Performer needs seqlen_q == seqlen_k, got {seqlen_q} and {seqlen_k}")
    if projection is None:
        projection = orthogonal_random_features(
            num_features or default_num_features(head_dim), head_dim, seed, device=q.device
        )
    group = num_heads // num_kv_heads
    phi_q = favor_features(q.transpose(1, 2), projection, is_query=True)  # (B, Hq, Sq, m)
    phi_k = favor_features(k.transpose(1, 2), projection, is_query=False)  # (B, Hkv, Sk, m)
    phi_k = phi_k.repeat_interleave(group, dim=1)  # (B, Hq, Sk, m)
    vh = v.transpose(1, 2).float().repeat_interleave(group, dim=1)  # (B, Hq, Sk, Dv)
    if not causal:
        kv = phi_k.transpose(-1, -2) @ vh  # (B, Hq, m, Dv)
        normaliser = phi_q @ phi_k.sum(2)[..., None]  # (B, Hq, Sq, 1)
        return (phi_q @ kv / normaliser).transpose(1, 2).to(q.dtype)
    state = phi_q.new_zeros(batch, num_heads, projection.shape[0], v.shape[-1])  # sum of phi(k) v^T so far
    key_sum = phi_q.new_zeros(batch, num_heads, projection.shape[0], 1)  # sum of phi(k) so far
    outs = []
    for start in range(0, seqlen_q, chunk_size):
        pq, pk = (
            phi_q[:, :, start : start + chunk_size],
            phi_k[:, :, start : start + chunk_size],
        )  # (B, Hq, C, m)
        vc = vh[:, :, start : start + chunk_size]  # (B, Hq, C, Dv)
        within = (pq @ pk.transpose(-1, -2)).tril()  # (B, Hq, C, C)
        numerator = pq @ state + within @ vc
        denominator = pq @ key_sum + within.sum(-1, keepdim=True)
        outs.append(numerator / denominator)
        state = state + pk.transpose(-1, -2) @ vc
        key_sum = key_sum + pk.sum(2)[..., None]
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)


class LinformerAttention(nn.Module):
    """Softmax attention over keys and values projected along the sequence by learned E, F: (n x k).

    forward(q, k, v): q (B, Sq, Hq, D); k, v (B, N, Hkv, D) with N <= max_seq_len -> (B, Sq, Hq, D).
    Shorter inputs use the first N rows of E and F.
    """

    def __init__(self, max_seq_len: int, proj_len: int, share_kv: bool = False):
        super().__init__()
        if max_seq_len < 1 or proj_len < 1:
            raise ValueError(f"max_seq_len ({max_seq_len}) and proj_len ({proj_len}) must be >= 1")
        self.max_seq_len, self.proj_len = max_seq_len, proj_len
        self.E = nn.Parameter(torch.randn(max_seq_len, proj_len) / math.sqrt(proj_len))
        self.F = (
            self.E if share_kv else nn.Parameter(torch.randn(max_seq_len, proj_len) / math.sqrt(proj_len))
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None):
        seqlen_k = k.shape[1]
        if seqlen_k > self.max_seq_len:
            raise ValueError(f"sequence of {seqlen_k} tokens exceeds max_seq_len={self.max_seq_len}")
        k_proj = torch.einsum("bnhd,nk->bkhd", k, self.E[:seqlen_k].to(k.dtype))  # (B, k, Hkv, D)
        v_proj = torch.einsum("bnhd,nk->bkhd", v, self.F[:seqlen_k].to(v.dtype))  # (B, k, Hkv, D)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k_proj.transpose(1, 2),
            v_proj.transpose(1, 2),
            scale=softmax_scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)  # (B, Sq, Hq, D)

    def extra_repr(self) -> str:
        return f"max_seq_len={self.max_seq_len}, proj_len={self.proj_len}, share_kv={self.F is self.E}"


__all__ = [
    "LinformerAttention",
    "default_num_features",
    "favor_features",
    "orthogonal_random_features",
    "performer_attention",
]
