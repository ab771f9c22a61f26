"""Attention masks as data: causal, sliding window, document (cu_seqlens) and block-sparse layouts.

Token-level conventions are FlashAttention's: causal is bottom-right aligned, so query i of a
(seqlen_q, seqlen_k) pair sits at key position `i + seqlen_k - seqlen_q`; `window_size=(left, right)`
with -1 unbounded lets it see keys `[pos - left, pos + right]`.

Sparse patterns are `BlockSparseLayout`s: a `(num_q_blocks, num_k_blocks)` bool table of square
blocks that may hold visible pairs, plus a bool tile per *partial* block (one that is only partly
visible: a window edge, a Longformer global token). Empty blocks are never visited, full blocks need no
mask, partial blocks are masked with their tile. That is the format of the block-sparse kernels in
BigBird (Zaheer et al. 2020), Longformer (Beltagy et al. 2020) and FlexAttention's BlockMask, and a
Triton kernel consumes it as is: walk a row's nonzero blocks, load `tiles[tile_index[i, j]]` when >= 0.
A layout is indexed by positions *within* a sequence, so one layout serves every sequence of a packed
batch; the reference densifies it, the tiled backend and the Triton kernels skip its empty blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (q_idx, k_idx) broadcastable -> bool


def window_bounds(causal: bool, window_size=(-1, -1)) -> tuple[int | None, int | None]:
    """FlashAttention's (causal, window_size) as (left, right) key offsets; None = unbounded."""
    left, right = window_size
    if causal:  # FlashAttention: causal=True is window (left, 0)
        right = 0
    return (None if left < 0 else left), (None if right < 0 else right)


def visible_mask(
    seqlen_q: int, seqlen_k: int, causal: bool, window_size=(-1, -1), device=None
) -> torch.Tensor:
    """(Sq, Sk) bool: which keys each query may see (bottom-right aligned)."""
    left, right = window_bounds(causal, window_size)
    q_pos = torch.arange(seqlen_q, device=device)[:, None] + (
        seqlen_k - seqlen_q
    )  # query i's aligned key index
    k_idx = torch.arange(seqlen_k, device=device)[None, :]
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right is not None:
        mask &= k_idx <= q_pos + right
    if left is not None:
        mask &= k_idx >= q_pos - left
    return mask


def document_ids(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """(total,) int64: index of the sequence each packed token belongs to."""
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    if total is not None and total > ids.numel():  # padding after the last sequence belongs to none
        ids = torch.cat([ids, ids.new_full((total - ids.numel(),), -1)])
    return ids


def document_mask(
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool = False, window_size=(-1, -1)
) -> torch.Tensor:
    """(total_q, total_k) bool mask of a packed batch: same sequence and, per sequence, FlashAttention's
    bottom-right causal / window rule. What an explicit-mask backend (SDPA) needs for varlen input."""
    doc_q, doc_k = document_ids(cu_seqlens_q), document_ids(cu_seqlens_k)
    start_q, start_k = cu_seqlens_q.long()[doc_q], cu_seqlens_k.long()[doc_k]
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()[doc_q]
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()[doc_q]
    q_pos = (torch.arange(len(doc_q), device=doc_q.device) - start_q + len_k - len_q)[
        :, None
    ]  # aligned position
    k_pos = (torch.arange(len(doc_k), device=doc_k.device) - start_k)[None, :]
    mask = doc_q[:, None] == doc_k[None, :]
    left, right = window_bounds(causal, window_size)
    if right is not None:
        mask &= k_pos <= q_pos + right
    if left is not None:
        mask &= k_pos >= q_pos - left
    return mask


@dataclass(frozen=True, eq=False)
class BlockSparseLayout:
    """Which (block_size x block_size) blocks of a (seqlen_q, seqlen_k) score matrix hold visible pairs.

    blocks:     (num_q_blocks, num_k_blocks) bool, True where the block may hold a visible pair.
    tile_index: (num_q_blocks, num_k_blocks) int32, >= 0 for partial blocks (index into `tiles`), -1 otherwise.
    tiles:      (num_partial, block_size, block_size) bool token masks of the partial blocks.
    Blocks with `blocks` True and `tile_index` -1 are fully visible.
    """

    block_size: int
    blocks: torch.Tensor
    tile_index: torch.Tensor
    tiles: torch.Tensor

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.blocks.dim() != 2 or self.blocks.dtype != torch.bool:
            raise ValueError(
                f"blocks must be a 2-D bool tensor, got {tuple(self.blocks.shape)} {self.blocks.dtype}"
            )
        if self.tile_index.shape != self.blocks.shape:
            raise ValueError(
                f"tile_index shape {tuple(self.tile_index.shape)} != blocks shape {tuple(self.blocks.shape)}"
            )
        if self.tiles.dim() != 3 or tuple(self.tiles.shape[1:]) != (self.block_size, self.block_size):
            raise ValueError(
                f"tiles must be (num_partial, {self.block_size}, {self.block_size}), "
                f"got {tuple(self.tiles.shape)}"
            )

    @property
    def num_q_blocks(self) -> int:
        return self.blocks.shape[0]

    @property
    def num_k_blocks(self) -> int:
        return self.blocks.shape[1]

    @property
    def num_blocks(self) -> int:
        """Blocks a block-sparse kernel visits (full + partial)."""
        return int(self.blocks.sum())

    def density(self) -> float:
        return self.num_blocks / max(1, self.blocks.numel())

    def row_blocks(self) -> list[list[int]]:
        """For each query block, the sorted key blocks it visits."""
        rows: list[list[int]] = [[] for _ in range(self.num_q_blocks)]
        for i, j in self.blocks.nonzero().tolist():
            rows[i].append(j)
        return rows

    def to_dense(self, seqlen_q: int | None = None, seqlen_k: int | None = None) -> torch.Tensor:
        """(seqlen_q, seqlen_k) bool token mask (defaults to the whole layout)."""
        bs = self.block_size
        seqlen_q = self.num_q_blocks * bs if seqlen_q is None else seqlen_q
        seqlen_k = self.num_k_blocks * bs if seqlen_k is None else seqlen_k
        num_q, num_k = -(-seqlen_q // bs), -(-seqlen_k // bs)
        if num_q > self.num_q_blocks or num_k > self.num_k_blocks:
            raise ValueError(
                f"layout of {self.num_q_blocks}x{self.num_k_blocks} blocks of {bs} cannot cover "
                f"a {seqlen_q}x{seqlen_k} score matrix"
            )
        blocks, index = self.blocks[:num_q, :num_k], self.tile_index[:num_q, :num_k]
        dense = blocks[:, None, :, None].expand(num_q, bs, num_k, bs).clone()  # (nq, bs, nk, bs)
        partial = index >= 0
        if partial.any():
            qi, kj = partial.nonzero(as_tuple=True)
            dense[qi, :, kj, :] = self.tiles[index[qi, kj].long()]
        return dense.reshape(num_q * bs, num_k * bs)[:seqlen_q, :seqlen_k]

    @staticmethod
    def from_dense(mask: torch.Tensor, block_size: int) -> "BlockSparseLayout":
        """Layout of an arbitrary (Sq, Sk) bool mask. O(Sq * Sk): for tests and small inputs."""
        seqlen_q, seqlen_k = mask.shape
        candidates = torch.ones(
            -(-seqlen_q // block_size), -(-seqlen_k // block_size), dtype=torch.bool, device=mask.device
        )
        return layout_from_mask_fn(
            lambda qi, kj: mask[qi.clamp(max=seqlen_q - 1), kj.clamp(max=seqlen_k - 1)],
            seqlen_q,
            seqlen_k,
            block_size,
            candidates,
        )


def layout_from_mask_fn(
    mask_fn: MaskFn,
    seqlen_q: int,
    seqlen_k: int,
    block_size: int,
    candidates: torch.Tensor,
    chunk: int = 4096,
) -> BlockSparseLayout:
    """Classify the `candidates` blocks (bool (nq, nk), a superset of the non-empty ones) as empty, full or
    partial by evaluating `mask_fn(q_idx, k_idx)` on their tiles only, so building costs O(visited area)."""
    bs = block_size
    device = candidates.device
    qi_all, kj_all = candidates.nonzero(as_tuple=True)
    offsets = torch.arange(bs, device=device)
    keep_q, keep_k, is_partial, tiles = [], [], [], []
    for start in range(0, len(qi_all), chunk):
        qi, kj = qi_all[start : start + chunk], kj_all[start : start + chunk]
        q_idx = (qi[:, None] * bs + offsets)[:, :, None]  # (n, bs, 1)
        k_idx = (kj[:, None] * bs + offsets)[:, None, :]  # (n, 1, bs)
        tile = mask_fn(q_idx, k_idx).expand(len(qi), bs, bs)  # (n, bs, bs)
        in_range = (q_idx < seqlen_q) & (k_idx < seqlen_k)
        tile = tile & in_range
        any_visible = tile.flatten(1).any(1)
        full = (tile | ~in_range).flatten(1).all(1)
        keep_q.append(qi[any_visible])
        keep_k.append(kj[any_visible])
        is_partial.append(~full[any_visible])
        tiles.append(tile[any_visible & ~full])
    blocks = torch.zeros_like(candidates)
    tile_index = torch.full(candidates.shape, -1, dtype=torch.int32, device=device)
    if keep_q:
        qi, kj, partial = torch.cat(keep_q), torch.cat(keep_k), torch.cat(is_partial)
        blocks[qi, kj] = True
        tile_index[qi[partial], kj[partial]] = torch.arange(
            int(partial.sum()), dtype=torch.int32, device=device
        )
        tiles_t = torch.cat(tiles)
    else:
        tiles_t = torch.zeros(0, bs, bs, dtype=torch.bool, device=device)
    return BlockSparseLayout(bs, blocks, tile_index, tiles_t)


def _check_block_size(block_size: int):
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def sliding_window_layout(
    seqlen_q: int, seqlen_k: int, window_size, causal: bool = False, block_size: int = 64, device=None
) -> BlockSparseLayout:
    """FlashAttention's causal / window band as a layout: band blocks full, edge blocks partial."""
    _check_block_size(block_size)
    left, right = window_bounds(causal, window_size)
    offset = seqlen_k - seqlen_q
    num_q, num_k = -(-seqlen_q // block_size), -(-seqlen_k // block_size)
    q_lo = torch.arange(num_q, device=device)[:, None] * block_size + offset  # first aligned position
    q_hi = q_lo + block_size - 1
    k_lo = torch.arange(num_k, device=device)[None, :] * block_size
    k_hi = k_lo + block_size - 1
    candidates = torch.ones(num_q, num_k, dtype=torch.bool, device=device)
    if right is not None:
        candidates &= k_lo <= q_hi + right
    if left is not None:
        candidates &= k_hi >= q_lo - left

    def band(q_idx, k_idx):
        ok = torch.ones((), dtype=torch.bool, device=q_idx.device)
        if right is not None:
            ok = ok & (k_idx <= q_idx + offset + right)
        if left is not None:
            ok = ok & (k_idx >= q_idx + offset - left)
        return ok

    return layout_from_mask_fn(band, seqlen_q, seqlen_k, block_size, candidates)


def document_layout(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    causal: bool = False,
    block_size: int = 64,
) -> BlockSparseLayout:
    """A packed batch seen as one long sequence: blocks that straddle two documents are partial,
    blocks pairing different documents are empty (`document_mask` token by token)."""
    _check_block_size(block_size)
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    total_q, total_k = int(cu_seqlens_q[-1]), int(cu_seqlens_k[-1])
    doc_q, doc_k = document_ids(cu_seqlens_q), document_ids(cu_seqlens_k)
    start_q, start_k = cu_seqlens_q.long()[doc_q], cu_seqlens_k.long()[doc_k]
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()[doc_q]
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()[doc_q]
    q_pos = torch.arange(total_q, device=doc_q.device) - start_q + len_k - len_q  # bottom-right aligned
    k_pos = torch.arange(total_k, device=doc_k.device) - start_k
    num_q, num_k = -(-total_q // block_size), -(-total_k // block_size)
    pad_q, pad_k = num_q * block_size - total_q, num_k * block_size - total_k
    # a block pair can only be visible if the document ranges of its rows and columns overlap
    dq = torch.nn.functional.pad(doc_q, (0, pad_q), value=int(doc_q[-1]) if total_q else 0).view(
        num_q, block_size
    )
    dk = torch.nn.functional.pad(doc_k, (0, pad_k), value=int(doc_k[-1]) if total_k else 0).view(
        num_k, block_size
    )
    candidates = (dq.min(1).values[:, None] <= dk.max(1).values[None, :]) & (
        dk.min(1).values[None, :] <= dq.max(1).values[:, None]
    )

    def same_doc(q_idx, k_idx):
        qc, kc = q_idx.clamp(max=max(total_q - 1, 0)), k_idx.clamp(max=max(total_k - 1, 0))
        ok = doc_q[qc] == doc_k[kc]
        if causal:
            ok = ok & (k_pos[kc] <= q_pos[qc])
        return ok

    return layout_from_mask_fn(same_doc, total_q, total_k, block_size, candidates)


def bigbird_layout(
    seqlen: int,
    block_size: int = 16,
    num_random_blocks: int = 3,
    num_window_blocks: int = 3,
    num_global_blocks: int = 1,
    seed: int = 0,
    device=None,
) -> BlockSparseLayout:
    """BigBird-ITC (Zaheer et al. 2020): each query block sees `num_window_blocks` neighbouring blocks, the
    first and last `num_global_blocks` blocks (which in turn see everything), and `num_random_blocks` random
    blocks drawn from the rest with a seeded generator. Purely block-level, so no partial tiles."""
    _check_block_size(block_size)
    for name, value in (("num_random_blocks", num_random_blocks), ("num_global_blocks", num_global_blocks)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if num_window_blocks < 1 or num_window_blocks % 2 == 0:
        raise ValueError(f"num_window_blocks must be odd and >= 1, got {num_window_blocks}")
    num = -(-seqlen // block_size)
    idx = torch.arange(num)
    blocks = (idx[:, None] - idx[None, :]).abs() <= num_window_blocks // 2
    is_global = (idx < num_global_blocks) | (idx >= num - num_global_blocks)
    blocks |= is_global[:, None] | is_global[None, :]
    generator = torch.Generator().manual_seed(seed)
    for row in range(num):
        if is_global[row]:
            continue
        free = (~blocks[row]).nonzero().flatten()
        take = free[torch.randperm(len(free), generator=generator)[:num_random_blocks]]
        blocks[row, take] = True
    return BlockSparseLayout(
        block_size,
        blocks.to(device),
        torch.full((num, num), -1, dtype=torch.int32, device=device),
        torch.zeros(0, block_size, block_size, dtype=torch.bool, device=device),
    )


def longformer_layout(
    seqlen: int, window: int, global_tokens=(), block_size: int = 64, device=None
) -> BlockSparseLayout:
    """Longformer (Beltagy et al. 2020): token i sees keys within `window` on either side (2w+1 keys), and
    each global token attends to, and is attended by, every token. Window edges and the rows/columns of
    global tokens are partial blocks with exact token tiles."""
    _check_block_size(block_size)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    is_global = torch.zeros(seqlen, dtype=torch.bool, device=device)
    if len(global_tokens):
        g = torch.as_tensor(list(global_tokens), dtype=torch.long, device=device)
        if int(g.min()) < 0 or int(g.max()) >= seqlen:
            raise ValueError(f"global token indices must lie in [0, {seqlen}), got {sorted(set(g.tolist()))}")
        is_global[g] = True
    num = -(-seqlen // block_size)
    idx = torch.arange(num, device=device)
    # blocks whose index distance fits the window, plus the rows and columns of blocks holding a global token
    candidates = (idx[:, None] - idx[None, :]).abs() <= -(-window // block_size)
    global_block = (
        torch.nn.functional.pad(is_global, (0, num * block_size - seqlen)).view(num, block_size).any(1)
    )
    candidates |= global_block[:, None] | global_block[None, :]

    def pattern(q_idx, k_idx):
        gq, gk = is_global[q_idx.clamp(max=seqlen - 1)], is_global[k_idx.clamp(max=seqlen - 1)]
        return ((q_idx - k_idx).abs() <= window) | gq | gk

    return layout_from_mask_fn(pattern, seqlen, seqlen, block_size, candidates)


__all__ = [
    "BlockSparseLayout",
    "MaskFn",
    "bigbird_layout",
    "document_ids",
    "document_layout",
    "document_mask",
    "layout_from_mask_fn",
    "longformer_layout",
    "sliding_window_layout",
    "visible_mask",
    "window_bounds",
]
