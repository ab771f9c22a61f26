"""Ring attention over packed documents: exact causal attention for a sequence sharded over N ranks.

The packed sequence (documents back to back, `boundaries` = its document starts) is cut into 2N equal
chunks; rank r holds chunks r and 2N-1-r (the load-balanced causal layout of Megatron-LM and torchtitan:
every rank gets one early, cheap chunk and one late, expensive one). Each rank's K/V pair of chunks
travels once around the ring of context-parallel ranks with `torch.distributed` point-to-point ops
(`batch_isend_irecv`, started before each step's compute so the transfer overlaps it); at every step a
rank attends its two query chunks to the pair it holds and merges the partial outputs exactly by their
log-sum-exps (Liu et al. 2023, "Ring Attention"; the merge of FlashAttention's split-K decoding).

Because documents are contiguous, a (query chunk, key chunk) pair is one of three things: the same chunk
(causal attention within its document pieces: one varlen call of our attention backends); an earlier key
chunk (a dense rectangle: the queries of the one document that spans both chunks against its keys in the
key chunk, or nothing); a later key chunk (nothing). The forward computes each block with
`flash_attn_varlen_func(..., return_lse=True)` (SDPA or tiled on CPU, Triton on CUDA). The backward runs
the ring again: K/V circulate with their gradient accumulators (fp32), each block's gradients come from
FlashAttention-2's recomputation with the *merged* output and log-sum-exp (dS = P * (dP - rowsum(dO * O)),
P = exp(S - lse)), here in PyTorch a few query rows at a time, and after N steps each accumulator has
come home to the rank that owns its K/V.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longreach.attention import flash_attn_varlen_func

# fp32 elements per (heads x rows x keys) score tile in the backward: 4 such tiles live at once
BACKWARD_TILE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class BlockPair:
    """One query-chunk x key-chunk block: local query rows [q_start, q_stop), buffer keys [k_start, k_stop),
    split into sequences by cu_q / cu_k (offsets inside the block; host tuples and int32 tensors)."""

    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    causal: bool
    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    cu_q_tensor: torch.Tensor
    cu_k_tensor: torch.Tensor

    @property
    def max_q(self) -> int:
        return max(b - a for a, b in zip(self.cu_q, self.cu_q[1:]))

    @property
    def max_k(self) -> int:
        return max(b - a for a, b in zip(self.cu_k, self.cu_k[1:]))


@dataclass(frozen=True)
class RingLayout:
    """What one rank needs for every layer of one micro-batch: its ring and the block pairs of each step.

    steps[s]: the pairs computed at ring step s, against the K/V chunks of ring rank (rank - s) mod size.
    """

    group: object  # the context-parallel ProcessGroup (None when size == 1)
    rank: int
    size: int
    chunk_len: int
    steps: tuple[tuple[BlockPair, ...], ...]
    send_to: int | None  # global ranks of the next and previous ring members
    recv_from: int | None


def chunk_ids(rank: int, size: int) -> tuple[int, int]:
    """The two of the 2 * size chunks that ring rank `rank` holds: an early one and its mirror."""
    return rank, 2 * size - 1 - rank


def _block_pair(boundaries, chunk_len, q_chunk, k_chunk, q_slot, k_slot, device) -> BlockPair | None:
    """The visible part of query chunk `q_chunk` x key chunk `k_chunk` (global chunk ids), or None.
    q_slot / k_slot: where the chunk sits (0 or 1) in the local query tensor / the K/V buffer."""
    if k_chunk > q_chunk:
        return None
    q0, q1 = q_chunk * chunk_len, (q_chunk + 1) * chunk_len
    if k_chunk == q_chunk:  # causal within the chunk's document pieces
        cu = (0, *(b - q0 for b in boundaries if q0 < b < q1), chunk_len)
        rows = (q_slot * chunk_len, (q_slot + 1) * chunk_len)
        keys = (k_slot * chunk_len, (k_slot + 1) * chunk_len)
        cu_q = cu_k = cu
        causal = True
    else:  # only the document holding the chunk's first token can reach back into an earlier chunk
        i = bisect_right(boundaries, q0) - 1
        doc_start, doc_stop = boundaries[i], boundaries[i + 1]
        k0, k1 = k_chunk * chunk_len, (k_chunk + 1) * chunk_len
        if doc_start >= k1:
            return None
        num_rows, first_key = min(doc_stop, q1) - q0, max(doc_start, k0) - k0
        rows = (q_slot * chunk_len, q_slot * chunk_len + num_rows)
        keys = (k_slot * chunk_len + first_key, (k_slot + 1) * chunk_len)
        cu_q, cu_k = (0, num_rows), (0, chunk_len - first_key)
        causal = False
    as_tensor = lambda cu: torch.tensor(cu, dtype=torch.int32, device=device)  # noqa: E731
    return BlockPair(*rows, *keys, causal, cu_q, cu_k, as_tensor(cu_q), as_tensor(cu_k))


def ring_layout(boundaries, chunk_len: int, rank: int, size: int, group=None, device="cpu") -> RingLayout:
    """The layout of a packed sequence of 2 * size * chunk_len tokens whose documents start at
    `boundaries` (sorted, from 0, ending with the total length) for ring rank `rank` of `size`.
    group: the context-parallel ProcessGroup (needed to run when size > 1)."""
    boundaries = list(boundaries)
    if boundaries[0] != 0 or boundaries[-1] != 2 * size * chunk_len:
        raise ValueError(
            f"document boundaries must run from 0 to 2 x {size} ranks x {chunk_len} = "
            f"{2 * size * chunk_len} tokens; got {boundaries[0]}..{boundaries[-1]}"
        )
    mine = chunk_ids(rank, size)
    steps = []
    for step in range(size):
        theirs = chunk_ids((rank - step) % size, size)
        pairs = [
            _block_pair(boundaries, chunk_len, q_chunk, k_chunk, q_slot, k_slot, device)
            for q_slot, q_chunk in enumerate(mine)
            for k_slot, k_chunk in enumerate(theirs)
        ]
        steps.append(tuple(p for p in pairs if p is not None))
    send_to = recv_from = None
    if size > 1 and group is not None:  # no group: a plan to inspect, not to run
        send_to = dist.get_global_rank(group, (rank + 1) % size)
        recv_from = dist.get_global_rank(group, (rank - 1) % size)
    return RingLayout(group, rank, size, chunk_len, tuple(steps), send_to, recv_from)


def _shift_start(tensors: list[torch.Tensor], layout: RingLayout):
    """Send `tensors` to the next ring rank and receive the previous rank's; returns (requests, received)."""
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), layout.send_to, layout.group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, layout.recv_from, layout.group) for r in received]
    return dist.batch_isend_irecv(ops), received


def _shift_finish(pending) -> list[torch.Tensor]:
    requests, received = pending
    for request in requests:
        request.wait()
    return received


def _merge(out_acc, lse_acc, start, stop, out, lse) -> None:
    """Fold a block's (out (n, H, D), lse (H, n)) into the running fp32 output and lse of rows [start, stop)."""
    old = lse_acc[:, start:stop]
    new = torch.logaddexp(old, lse)
    safe = new.masked_fill(new == float("-inf"), 0.0)  # rows that have seen no key yet
    keep = (old - safe).exp().t()[..., None]  # (n, H, 1)
    take = (lse - safe).exp().t()[..., None]
    out_acc[start:stop] = out_acc[start:stop] * keep + out.float() * take
    lse_acc[:, start:stop] = new


def _block_forward(q, k, v, pair: BlockPair, scale: float):
    return flash_attn_varlen_func(
        q[pair.q_start : pair.q_stop],
        k[pair.k_start : pair.k_stop],
        v[pair.k_start : pair.k_stop],
        pair.cu_q_tensor,
        pair.cu_k_tensor,
        pair.max_q,
        pair.max_k,
        softmax_scale=scale,
        causal=pair.causal,
        return_lse=True,
    )


def _dense_grads(q, k, v, dout, delta, lse, scale, first_row):
    """FlashAttention-2's gradients of rows q (R, Hq, D) against keys k, v (L, Hkv, D), given the merged
    lse and delta (Hq, R). first_row: the rows' offset into a causal sequence whose keys start at 0
    (None: every key visible). Returns dq (R, Hq, D), dk, dv (L, Hkv, D), fp32."""
    num_rows, num_heads, dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qg = q.float().view(num_rows, num_kv_heads, group, dim).permute(1, 2, 0, 3)  # (Hkv, G, R, D)
    dog = dout.float().view(num_rows, num_kv_heads, group, -1).permute(1, 2, 0, 3)  # (Hkv, G, R, Dv)
    kh = k.float().transpose(0, 1)[:, None]  # (Hkv, 1, L, D)
    vh = v.float().transpose(0, 1)[:, None]  # (Hkv, 1, L, Dv)
    scores = (qg @ kh.transpose(-1, -2)) * scale  # (Hkv, G, R, L)
    if first_row is not None:
        rows = torch.arange(first_row, first_row + num_rows, device=q.device)[:, None]
        scores.masked_fill_(torch.arange(num_keys, device=q.device)[None, :] > rows, float("-inf"))
    probs = (scores - lse.view(num_kv_heads, group, num_rows, 1)).exp_()
    dv = (probs.transpose(-1, -2) @ dog).sum(1)  # (Hkv, L, Dv)
    dscores = probs.mul_(dog @ vh.transpose(-1, -2) - delta.view(num_kv_heads, group, num_rows, 1))
    dq = (dscores @ kh) * scale  # (Hkv, G, R, D)
    dk = (dscores.transpose(-1, -2) @ qg).sum(1) * scale  # (Hkv, L, D)
    return dq.permute(2, 0, 1, 3).reshape(num_rows, num_heads, dim), dk.transpose(0, 1), dv.transpose(0, 1)


def _block_backward(q, k, v, dout, delta, lse, pair: BlockPair, scale, dq, dk, dv) -> None:
    """Accumulate one block's gradients into dq (local rows) and dk, dv (the buffer's keys), fp32."""
    num_heads = q.shape[1]
    for b in range(len(pair.cu_q) - 1):
        q0, q1 = pair.q_start + pair.cu_q[b], pair.q_start + pair.cu_q[b + 1]
        k0, k1 = pair.k_start + pair.cu_k[b], pair.k_start + pair.cu_k[b + 1]
        step = max(1, BACKWARD_TILE_ELEMENTS // (num_heads * max(1, k1 - k0)))
        for r0 in range(q0, q1, step):
            r1 = min(r0 + step, q1)
            key_stop = k0 + (r1 - q0) if pair.causal else k1  # causal rows see keys up to themselves
            grads = _dense_grads(
                q[r0:r1],
                k[k0:key_stop],
                v[k0:key_stop],
                dout[r0:r1],
                delta[:, r0:r1],
                lse[:, r0:r1],
                scale,
                r0 - q0 if pair.causal else None,
            )
            dq[r0:r1] += grads[0]
            dk[k0:key_stop] += grads[1]
            dv[k0:key_stop] += grads[2]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: RingLayout, scale: float):
        out_acc = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
        lse_acc = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        k_buf, v_buf = k.contiguous(), v.contiguous()
        for step in range(layout.size):
            pending = _shift_start([k_buf, v_buf], layout) if step < layout.size - 1 else None
            for pair in layout.steps[step]:
                out, lse = _block_forward(q, k_buf, v_buf, pair, scale)
                _merge(out_acc, lse_acc, pair.q_start, pair.q_stop, out, lse)
            if pending is not None:
                k_buf, v_buf = _shift_finish(pending)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        delta = (dout.float() * out.float()).sum(-1).t().contiguous()  # (Hq, T)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        k_buf, v_buf = k.contiguous(), v.contiguous()
        dk_buf = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv_buf = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for step in range(layout.size):
            pending = _shift_start([k_buf, v_buf], layout) if step < layout.size - 1 else None
            for pair in layout.steps[step]:
                _block_backward(q, k_buf, v_buf, dout, delta, lse, pair, scale, dq, dk_buf, dv_buf)
            if pending is not None:
                k_buf, v_buf = _shift_finish(pending)
            if layout.size > 1:  # the accumulators follow their K/V; the last shift brings them home
                dk_buf, dv_buf = _shift_finish(_shift_start([dk_buf, dv_buf], layout))
        return dq.to(q.dtype), dk_buf.to(k.dtype), dv_buf.to(v.dtype), None, None


def ring_attention(q, k, v, layout: RingLayout, softmax_scale: float | None = None) -> torch.Tensor:
    """Causal, document-masked attention of this rank's tokens against the whole sharded sequence.

    q: (2C, Hq, D); k, v: (2C, Hkv, D): this rank's two chunks (chunk_ids) back to back. Every rank of
    `layout.group` must call this together (it exchanges K/V). Returns (2C, Hq, D) in q's dtype.
    """
    expected = 2 * layout.chunk_len
    if q.shape[0] != expected or k.shape[0] != expected or v.shape[0] != expected:
        raise ValueError(
            f"ring attention needs this rank's 2 x {layout.chunk_len} tokens; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _RingAttention.apply(q, k, v, layout, scale)


__all__ = ["BlockPair", "RingLayout", "chunk_ids", "ring_attention", "ring_layout"]
