"""Attention whose every query row is reduced in one fixed order, whatever the batch, the step or the chunking.

The batch-invariant mode (`longreach.batch_invariant`) needs each token's attention output to be bitwise the
same whether it is computed as a decode, inside a fresh prefill, inside a later prefill chunk of any size, or
next to any other requests. The usual paths differ in exactly that: decode pads its keys to its group's
longest sequence, prefill goes through SDPA's blocked kernel, a continued chunk through two calls merged by
log-sum-exp. Following the batch-invariant attention of "Defeating nondeterminism in LLM inference"
(Thinking Machines, 2025) and vLLM's VLLM_BATCH_INVARIANT (a fixed KV split size instead of one chosen from
the batch), this path has one order for everything:

- queries are cut into tiles of `QUERY_TILE` positions aligned to absolute positions (tile t holds positions
  [t * QUERY_TILE, (t + 1) * QUERY_TILE) of one sequence); rows of the tile not computed in this step are
  zero padding. A token therefore always sits in the same tile row, whatever chunk brought it.
- keys are read from the paged cache in splits of `KV_SPLIT` keys aligned to absolute positions, and a tile
  visits the splits from its first to its last in order, with an fp32 online softmax (FlashAttention's
  running max and sum). Which splits a tile visits depends only on its index and the window.
- every product is a `bmm` of the same per-matrix shape, (QUERY_TILE * G, D) x (D, KV_SPLIT) and
  (QUERY_TILE * G, KV_SPLIT) x (KV_SPLIT, D), in fp32; only the number of matrices changes with the batch.
  Keys past a query (or outside its window) are masked to -inf, so they add exact zeros.

It trades speed for that: a decode computes a whole tile of queries, and keys are re-read per tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

QUERY_TILE = 16  # query positions per tile (aligned to absolute positions)
KV_SPLIT = 128  # keys per split (aligned to absolute positions): the fixed reduction split of the softmax

ReadKV = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # slots (S,) -> keys, values (S, Hkv, D)


@dataclass(frozen=True)
class SeqQueries:
    """One sequence's part of a step: its query rows [row, row + end - start) in the step's (T,) batch are
    positions [start, end), and `slots` (end,) int64 are the cache slots of its keys, positions [0, end)."""

    row: int
    start: int
    end: int
    slots: torch.Tensor


@dataclass
class TilePlan:
    """The step's query tiles and, per KV split index, which tiles visit it (built once, used by every layer).

    query_rows: (num_tiles, QUERY_TILE) int64 rows of q per tile row (`num_rows` for padding: a zero row);
    tile_index: (num_tiles,) int64 each tile's index t along its sequence; the per-window schedules
    (split -> tiles, key slots, masks) are built on first use for each window size."""

    query_rows: torch.Tensor
    tile_index: torch.Tensor
    tile_seq: torch.Tensor  # (num_tiles,) int64 the sequence each tile belongs to
    key_slots: torch.Tensor  # (num_seqs, num_splits * KV_SPLIT) int64 key slots, slot 0 past the keys
    key_limit: torch.Tensor  # (num_tiles,) int64 keys the tile's sequence has in the cache this step
    num_rows: int
    schedules: dict[int, list] = field(default_factory=dict)
    on_device: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def build(seqs: list[SeqQueries], num_rows: int, device: torch.device) -> "TilePlan":
        rows, index, limits, owners = [], [], [], []
        num_splits = max(-(-(-(-s.end // QUERY_TILE) * QUERY_TILE) // KV_SPLIT) for s in seqs)
        key_slots = torch.zeros(len(seqs), num_splits * KV_SPLIT, dtype=torch.long)
        for i, s in enumerate(seqs):
            key_slots[i, : s.end] = s.slots.to("cpu", torch.long)
            first, last = s.start // QUERY_TILE, (s.end - 1) // QUERY_TILE
            pos = torch.arange(first * QUERY_TILE, (last + 1) * QUERY_TILE)
            inside = (pos >= s.start) & (pos < s.end)
            rows.append(torch.where(inside, s.row + pos - s.start, num_rows).view(-1, QUERY_TILE))
            index.append(torch.arange(first, last + 1))
            limits += [s.end] * (last + 1 - first)
            owners += [i] * (last + 1 - first)
        return TilePlan(
            query_rows=torch.cat(rows).to(device),
            tile_index=torch.cat(index),
            tile_seq=torch.tensor(owners, dtype=torch.long, device=device),
            key_slots=key_slots.to(device),
            key_limit=torch.tensor(limits, dtype=torch.long),
            num_rows=num_rows,
        )

    def tile_index_and_key_limit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`tile_index` and `key_limit` on the plan's device (copied once, for the Triton kernel)."""
        if not self.on_device:
            device = self.query_rows.device
            self.on_device.update(index=self.tile_index.to(device), limit=self.key_limit.to(device))
        return self.on_device["index"], self.on_device["limit"]

    def schedule(self, window_left: int | None) -> list:
        """Per KV split c: (tile ids visiting c (A,), their key slots (A * KV_SPLIT,), hidden mask
        (A, 1, QUERY_TILE, 1, KV_SPLIT)). A tile visits splits from the first its window reaches to the one
        holding its last position, a function of its index alone."""
        key = -1 if window_left is None else window_left
        if key in self.schedules:
            return self.schedules[key]
        device = self.query_rows.device
        first_pos = self.tile_index * QUERY_TILE
        last_pos = first_pos + QUERY_TILE - 1
        first = torch.zeros_like(first_pos) if window_left is None else (first_pos - window_left).clamp(min=0)
        first, last = first // KV_SPLIT, last_pos // KV_SPLIT
        q_pos = first_pos[:, None] + torch.arange(QUERY_TILE)  # (num_tiles, QUERY_TILE)
        out = []
        for c in range(int(last.max()) + 1):
            tiles = torch.nonzero((first <= c) & (last >= c)).flatten()
            if not tiles.numel():
                continue  # every tile's window starts past this split
            k_pos = c * KV_SPLIT + torch.arange(KV_SPLIT)  # (S,)
            hidden = k_pos[None, None, :] > q_pos[tiles][:, :, None]  # (A, QT, S)
            hidden |= k_pos[None, None, :] >= self.key_limit[tiles][:, None, None]
            if window_left is not None:
                hidden |= k_pos[None, None, :] < q_pos[tiles][:, :, None] - window_left
            tiles_dev = tiles.to(device)
            owners = self.tile_seq.index_select(0, tiles_dev)
            slots = self.key_slots[:, c * KV_SPLIT : (c + 1) * KV_SPLIT].index_select(0, owners)
            out.append((tiles_dev, slots.reshape(-1), hidden[:, None, :, None, :].to(device)))
        self.schedules[key] = out
        return out


def fixed_split_attention(
    q: torch.Tensor,
    read_kv: ReadKV,
    plan: TilePlan,
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of the step's queries q (T, Hq, D) over their sequences' cached keys -> (T, Hq, D)
    in q's dtype. `read_kv(slots)` returns keys and values (S, Hkv, D) at cache slots (S,); the step's own
    K/V must already be written. window_size (left, right): left >= 0 keeps keys within `left` positions."""
    num_rows, num_heads, head_dim = q.shape
    if num_rows != plan.num_rows:
        raise ValueError(f"q has {num_rows} rows but the tile plan was built for {plan.num_rows}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    window_left = window_size[0] if window_size[0] >= 0 else None
    num_tiles = plan.query_rows.shape[0]
    q_pad = torch.cat([q.float(), q.new_zeros(1, num_heads, head_dim, dtype=torch.float32)])
    tiles_q = q_pad.index_select(0, plan.query_rows.flatten())  # (num_tiles * QT, Hq, D)
    state = None
    for tiles, slots, hidden in plan.schedule(window_left):
        keys, values = read_kv(slots)  # (A * S, Hkv, D)
        num_kv_heads = keys.shape[1]
        group = num_heads // num_kv_heads
        if state is None:
            # (num_tiles, Hkv, QT * G, D): each KV head's queries, tile rows outer, group heads inner
            tiles_q = tiles_q.view(num_tiles, QUERY_TILE, num_kv_heads, group, head_dim)
            tiles_q = tiles_q.permute(0, 2, 1, 3, 4).reshape(num_tiles, num_kv_heads, -1, head_dim)
            state = _OnlineSoftmax(num_tiles, num_kv_heads, QUERY_TILE * group, head_dim, q.device)
        state.update(tiles, tiles_q.index_select(0, tiles), keys, values, hidden, scale)
    if state is None:
        return torch.zeros_like(q)
    out = state.result()  # (num_tiles, Hkv, QT * G, D)
    num_kv_heads = out.shape[1]
    out = out.view(num_tiles, num_kv_heads, QUERY_TILE, num_heads // num_kv_heads, head_dim)
    out = out.permute(0, 2, 1, 3, 4).reshape(num_tiles * QUERY_TILE, num_heads, head_dim)
    result = torch.empty(num_rows + 1, num_heads, head_dim, dtype=torch.float32, device=q.device)
    result.index_copy_(0, plan.query_rows.flatten(), out)  # padding rows all land on the extra row
    return result[:num_rows].to(q.dtype)


class _OnlineSoftmax:
    """Running max m, sum l and output acc per (tile, KV head, tile row x group head), all fp32."""

    def __init__(self, num_tiles: int, num_kv_heads: int, rows: int, head_dim: int, device):
        self.m = torch.full((num_tiles, num_kv_heads, rows), float("-inf"), device=device)
        self.l = torch.zeros(num_tiles, num_kv_heads, rows, device=device)
        self.acc = torch.zeros(num_tiles, num_kv_heads, rows, head_dim, device=device)

    def update(self, tiles, q, keys, values, hidden, scale: float) -> None:
        """q (A, Hkv, R, D) of tiles (A,); keys/values (A * S, Hkv, D); hidden (A, 1, QT, 1, S)."""
        num, num_kv_heads, rows, head_dim = q.shape
        # (A * Hkv, D, S) and (A * Hkv, S, D): one fixed-shape product per (tile, KV head)
        k = keys.float().view(num, KV_SPLIT, num_kv_heads, head_dim).permute(0, 2, 3, 1)
        v = values.float().view(num, KV_SPLIT, num_kv_heads, head_dim).transpose(1, 2)
        scores = torch.bmm(q.reshape(-1, rows, head_dim), k.reshape(-1, head_dim, KV_SPLIT)) * scale
        scores = scores.view(num, num_kv_heads, QUERY_TILE, rows // QUERY_TILE, KV_SPLIT)
        scores = scores.masked_fill(hidden, float("-inf")).view(num, num_kv_heads, rows, KV_SPLIT)
        m_old = self.m.index_select(0, tiles)
        m_new = torch.maximum(m_old, scores.amax(-1))
        m_safe = torch.where(
            torch.isinf(m_new), torch.zeros_like(m_new), m_new
        )  # a row that sees nothing yet
        probs = torch.exp(scores - m_safe[..., None])
        alpha = torch.exp(m_old - m_safe)
        pv = torch.bmm(probs.view(-1, rows, KV_SPLIT), v.reshape(-1, KV_SPLIT, head_dim))
        self.l.index_copy_(0, tiles, self.l.index_select(0, tiles) * alpha + probs.sum(-1))
        acc = self.acc.index_select(0, tiles) * alpha[..., None] + pv.view(num, num_kv_heads, rows, head_dim)
        self.acc.index_copy_(0, tiles, acc)
        self.m.index_copy_(0, tiles, m_new)

    def result(self) -> torch.Tensor:
        safe = torch.where(self.l > 0, self.l, torch.ones_like(self.l))
        return self.acc / safe[..., None]
