"""Exact attention in O(N) memory, in plain PyTorch: blockwise online softmax that skips masked blocks.

Forward: the online softmax of Milakov & Gimelshein (2018) as used by FlashAttention (Dao et al. 2022)
and Rabe & Staats (2021, "Self-attention does not need O(n^2) memory"). For each (sequence, query block)
we walk only the key blocks that intersect the causal/window band and the block-sparse layout, keep a
running row max m, normaliser l and fp32 accumulator, and normalise once at the end. Runs of visible key
blocks are processed together (`chunk_blocks` at a time) so each step is one large batched matmul;
masks are applied only to chunks holding a partial block (window edges, the diagonal, layout tiles).
Backward: FlashAttention-2's recomputation per block from (q, k, v, out, lse) in a custom
autograd.Function, so training memory is O(N) as well.

Heads are batched; GQA packs the G query heads that share a KV head into the rows of one matmul
(query head h reads KV head h // G), so K and V are never repeated. All math is fp32 whatever the input
dtype, so bf16/fp16 results carry only the final rounding. Peak extra memory is
O(N * H * D) for the output plus O(H * block_size * chunk_blocks * block_size) per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longreach.attention.masks import BlockSparseLayout, window_bounds

DEFAULT_BLOCK_SIZE = 128
DEFAULT_CHUNK_BLOCKS = 16


@dataclass
class _Chunk:
    """A run of key blocks of one query block's row, processed by one matmul."""

    block_ids: list[int]
    start: int  # token range when the blocks are contiguous ...
    stop: int
    index: torch.Tensor | None  # ... else the gathered token indices
    needs_mask: bool

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.start : self.stop] if self.index is None else x.index_select(0, self.index)

    def key_positions(self, device) -> torch.Tensor:
        return torch.arange(self.start, self.stop, device=device) if self.index is None else self.index


class _Plan:
    """Which key blocks each query block of one (seqlen_q, seqlen_k) sequence visits."""

    def __init__(self, seqlen_q, seqlen_k, block_size, chunk_blocks, left, right, layout, device):
        self.seqlen_q, self.seqlen_k, self.block_size = seqlen_q, seqlen_k, block_size
        self.chunk_blocks, self.left, self.right, self.layout, self.device = (
            chunk_blocks,
            left,
            right,
            layout,
            device,
        )
        self.offset = seqlen_k - seqlen_q  # bottom-right alignment
        self.num_q_blocks = -(-seqlen_q // block_size)
        self.num_k_blocks = -(-seqlen_k // block_size)
        if layout is not None:  # per query block: its visible key blocks, and tile ids of the partial ones
            rows, cols = layout.blocks[: self.num_q_blocks, : self.num_k_blocks].nonzero(as_tuple=True)
            tile_ids = layout.tile_index[rows, cols].tolist()
            self.layout_rows: list[list[int]] = [[] for _ in range(self.num_q_blocks)]
            self.tile_rows: list[dict[int, int]] = [{} for _ in range(self.num_q_blocks)]
            for i, j, t in zip(rows.tolist(), cols.tolist(), tile_ids):
                self.layout_rows[i].append(j)
                if t >= 0:
                    self.tile_rows[i][j] = t

    def row(self, qb: int) -> list[_Chunk]:
        bs, left, right = self.block_size, self.left, self.right
        q_start, q_stop = qb * bs, min((qb + 1) * bs, self.seqlen_q)
        pos_lo, pos_hi = q_start + self.offset, q_stop - 1 + self.offset  # aligned key positions of the rows
        k_lo = 0 if left is None else max(0, pos_lo - left)
        k_hi = self.seqlen_k if right is None else min(self.seqlen_k, pos_hi + right + 1)
        if k_lo >= k_hi:
            return []
        ids = range(k_lo // bs, (k_hi - 1) // bs + 1)
        if self.layout is not None:
            tiles = self.tile_rows[qb]
            ids = [j for j in self.layout_rows[qb] if ids.start <= j < ids.stop]
        chunks: list[_Chunk] = []
        run: list[int] = []
        run_mask = False
        for j in ids:
            k_start, k_stop = j * bs, min((j + 1) * bs, self.seqlen_k)
            # a block needs no mask when every row of the query block sees every key in it
            needs_mask = (
                (left is not None and k_start < pos_hi - left)
                or (right is not None and k_stop - 1 > pos_lo + right)
                or (self.layout is not None and j in tiles)
            )
            if run and (len(run) == self.chunk_blocks or needs_mask != run_mask):
                chunks.append(self._chunk(run, run_mask))
                run = []
            run.append(j)
            run_mask = needs_mask
        if run:
            chunks.append(self._chunk(run, run_mask))
        return chunks

    def _chunk(self, ids: list[int], needs_mask: bool) -> _Chunk:
        bs = self.block_size
        start, stop = ids[0] * bs, min((ids[-1] + 1) * bs, self.seqlen_k)
        index = None
        if ids[-1] - ids[0] + 1 != len(ids):  # not contiguous: gather the blocks' tokens
            index = torch.cat([torch.arange(j * bs, min((j + 1) * bs, self.seqlen_k)) for j in ids]).to(
                self.device
            )
        return _Chunk(ids, start, stop, index, needs_mask)

    def mask(self, qb: int, chunk: _Chunk) -> torch.Tensor:
        """(bq, nk) bool: visible pairs of the chunk for query block qb."""
        bs = self.block_size
        q_start, q_stop = qb * bs, min((qb + 1) * bs, self.seqlen_q)
        q_pos = torch.arange(q_start, q_stop, device=self.device)[:, None] + self.offset  # (bq, 1)
        k_pos = chunk.key_positions(self.device)[None, :]  # (1, nk)
        mask = torch.ones(q_stop - q_start, k_pos.shape[1], dtype=torch.bool, device=self.device)
        if self.right is not None:
            mask &= k_pos <= q_pos + self.right
        if self.left is not None:
            mask &= k_pos >= q_pos - self.left
        tiles = self.tile_rows[qb] if self.layout is not None else {}
        if any(j in tiles for j in chunk.block_ids):
            parts = []
            for j in chunk.block_ids:
                width = min((j + 1) * bs, self.seqlen_k) - j * bs
                parts.append(
                    self.layout.tiles[tiles[j], : q_stop - q_start, :width].to(self.device)
                    if j in tiles
                    else torch.ones(q_stop - q_start, width, dtype=torch.bool, device=self.device)
                )
            mask &= torch.cat(parts, dim=1)
        return mask


def _group_rows(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(bq, Hq, D) -> (Hkv, G * bq, D) fp32: the G query heads of a KV head stacked as rows."""
    bq, num_heads, dim = x.shape
    group = num_heads // num_kv_heads
    return (
        x.reshape(bq, num_kv_heads, group, dim)
        .permute(1, 2, 0, 3)
        .reshape(num_kv_heads, group * bq, dim)
        .float()
    )


def _ungroup_rows(x: torch.Tensor, bq: int) -> torch.Tensor:
    """(Hkv, G * bq, D) -> (bq, Hq, D)."""
    num_kv_heads, rows, dim = x.shape
    return x.view(num_kv_heads, rows // bq, bq, dim).permute(2, 0, 1, 3).reshape(bq, -1, dim)


def _masked_scores(plan: _Plan, qb: int, chunk: _Chunk, qg: torch.Tensor, kc: torch.Tensor, group: int):
    """(Hkv, G * bq, nk) fp32 scores of one chunk, -inf where masked. qg is pre-scaled."""
    scores = torch.bmm(qg, kc.transpose(1, 2))
    if chunk.needs_mask:
        hkv, rows, nk = scores.shape
        scores.view(hkv, group, rows // group, nk).masked_fill_(~plan.mask(qb, chunk), float("-inf"))
    return scores


def _forward_seq(q, k, v, scale, plan: _Plan, out, lse, stats):
    """One sequence. q: (Sq, Hq, D); k, v: (Sk, Hkv, D); writes out (Sq, Hq, Dv) and lse (Hq, Sq)."""
    num_kv_heads = k.shape[1]
    group = q.shape[1] // num_kv_heads
    bs = plan.block_size
    for qb in range(plan.num_q_blocks):
        q_start, q_stop = qb * bs, min((qb + 1) * bs, plan.seqlen_q)
        bq = q_stop - q_start
        qg = _group_rows(q[q_start:q_stop], num_kv_heads) * scale  # (Hkv, G*bq, D)
        row_max = torch.full(qg.shape[:2], float("-inf"), device=q.device)  # (Hkv, G*bq)
        row_sum = torch.zeros(qg.shape[:2], device=q.device)
        acc = torch.zeros(num_kv_heads, qg.shape[1], v.shape[-1], device=q.device)  # (Hkv, G*bq, Dv)
        for chunk in plan.row(qb):
            if stats is not None:
                stats["visited_blocks"] = stats.get("visited_blocks", 0) + len(chunk.block_ids)
            kc = chunk.take(k).transpose(0, 1).float()  # (Hkv, nk, D)
            vc = chunk.take(v).transpose(0, 1).float()  # (Hkv, nk, Dv)
            scores = _masked_scores(plan, qb, chunk, qg, kc, group)  # (Hkv, G*bq, nk)
            new_max = torch.maximum(row_max, scores.amax(-1))
            safe_max = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows that have seen nothing yet
            probs = scores.sub_(safe_max[..., None]).exp_()
            alpha = torch.exp(row_max - safe_max)
            row_sum = row_sum * alpha + probs.sum(-1)
            acc = torch.baddbmm(acc * alpha[..., None], probs, vc)
            row_max = new_max
        if stats is not None:
            stats["total_blocks"] = stats.get("total_blocks", 0) + plan.num_k_blocks
        has_keys = row_sum > 0
        out[q_start:q_stop] = _ungroup_rows(acc / row_sum.where(has_keys, 1.0)[..., None], bq).to(out.dtype)
        lse[:, q_start:q_stop] = (row_max + row_sum.log()).where(has_keys, float("-inf")).view(-1, bq)


def _backward_seq(q, k, v, out, dout, lse, scale, plan: _Plan, dq, dk, dv):
    """FlashAttention-2 backward for one sequence: recompute P per block from lse; dk/dv accumulate in fp32."""
    num_kv_heads = k.shape[1]
    group = q.shape[1] // num_kv_heads
    bs = plan.block_size
    dk_acc = torch.zeros(num_kv_heads, k.shape[0], k.shape[-1], device=q.device)  # (Hkv, Sk, D)
    dv_acc = torch.zeros(num_kv_heads, v.shape[0], v.shape[-1], device=q.device)  # (Hkv, Sk, Dv)
    for qb in range(plan.num_q_blocks):
        q_start, q_stop = qb * bs, min((qb + 1) * bs, plan.seqlen_q)
        bq = q_stop - q_start
        qg = _group_rows(q[q_start:q_stop], num_kv_heads)  # (Hkv, G*bq, D)
        dog = _group_rows(dout[q_start:q_stop], num_kv_heads)  # (Hkv, G*bq, Dv)
        delta = (dog * _group_rows(out[q_start:q_stop], num_kv_heads)).sum(-1)  # (Hkv, G*bq)
        row_lse = lse[:, q_start:q_stop].reshape(num_kv_heads, -1)
        row_lse = row_lse.masked_fill(row_lse == float("-inf"), float("inf"))  # empty rows: P = 0
        qg_scaled = qg * scale
        dqg = torch.zeros_like(qg)
        for chunk in plan.row(qb):
            kc = chunk.take(k).transpose(0, 1).float()  # (Hkv, nk, D)
            vc = chunk.take(v).transpose(0, 1).float()  # (Hkv, nk, Dv)
            probs = _masked_scores(plan, qb, chunk, qg_scaled, kc, group).sub_(row_lse[..., None]).exp_()
            dv_c = torch.bmm(probs.transpose(1, 2), dog)  # (Hkv, nk, Dv)
            dscores = probs.mul_(
                torch.bmm(dog, vc.transpose(1, 2)).sub_(delta[..., None])
            )  # dS = P * (dP - delta)
            dqg.baddbmm_(dscores, kc)
            dk_c = torch.bmm(dscores.transpose(1, 2), qg)  # (Hkv, nk, D)
            if chunk.index is None:
                dk_acc[:, chunk.start : chunk.stop] += dk_c
                dv_acc[:, chunk.start : chunk.stop] += dv_c
            else:
                dk_acc.index_add_(1, chunk.index, dk_c)
                dv_acc.index_add_(1, chunk.index, dv_c)
        dq[q_start:q_stop] = _ungroup_rows(dqg * scale, bq).to(dq.dtype)
    dk.copy_((dk_acc * scale).transpose(0, 1))
    dv.copy_(dv_acc.transpose(0, 1))


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, left, right, layout, block_size, chunk_blocks, stats
    ):
        out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
        with torch.autocast(q.device.type, enabled=False):  # the fp32 math must stay fp32 under bf16 autocast
            for (qs, qe), (ks, ke) in _sequences(cu_seqlens_q, cu_seqlens_k):
                plan = _Plan(qe - qs, ke - ks, block_size, chunk_blocks, left, right, layout, q.device)
                _forward_seq(q[qs:qe], k[ks:ke], v[ks:ke], scale, plan, out[qs:qe], lse[:, qs:qe], stats)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (scale, left, right, layout, block_size, chunk_blocks)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        scale, left, right, layout, block_size, chunk_blocks = ctx.args
        dout = dout.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        with torch.autocast(q.device.type, enabled=False):
            for (qs, qe), (ks, ke) in _sequences(cu_seqlens_q, cu_seqlens_k):
                plan = _Plan(qe - qs, ke - ks, block_size, chunk_blocks, left, right, layout, q.device)
                _backward_seq(
                    q[qs:qe],
                    k[ks:ke],
                    v[ks:ke],
                    out[qs:qe],
                    dout[qs:qe],
                    lse[:, qs:qe],
                    scale,
                    plan,
                    dq[qs:qe],
                    dk[ks:ke],
                    dv[ks:ke],
                )
        return dq, dk, dv, *([None] * 9)


def _sequences(cu_seqlens_q, cu_seqlens_k):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [((cq[b], cq[b + 1]), (ck[b], ck[b + 1])) for b in range(len(cq) - 1)]


def varlen_attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    return_lse=False,
    layout: BlockSparseLayout | None = None,
    block_size: int | None = None,
    chunk_blocks: int = DEFAULT_CHUNK_BLOCKS,
    stats: dict | None = None,
):
    """THD layout: q (total_q, Hq, D), k/v (total_k, Hkv, D) -> (total_q, Hq, D) [, lse (Hq, total_q) fp32].

    layout: block-sparse pattern per sequence; block_size defaults to the layout's, else 128.
    stats: if given, the forward adds `visited_blocks` (key blocks computed) and `total_blocks`
    (key blocks a dense kernel would compute) to it.
    Inputs are taken as checked (`flash_attn_varlen_func` validates them once); only this backend's own
    block_size and chunk_blocks are checked here.
    """
    if layout is not None:
        if block_size is not None and block_size != layout.block_size:
            raise ValueError(
                f"block_size {block_size} differs from the layout's block size {layout.block_size}"
            )
        block_size = layout.block_size
    block_size = block_size or DEFAULT_BLOCK_SIZE
    if block_size < 1 or chunk_blocks < 1:
        raise ValueError(f"block_size ({block_size}) and chunk_blocks ({chunk_blocks}) must be >= 1")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = window_bounds(causal, window_size)
    out, lse = _TiledAttention.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, scale, left, right, layout, block_size, chunk_blocks, stats
    )
    return (out, lse) if return_lse else out


__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_CHUNK_BLOCKS", "varlen_attention"]
