"""Fixed-size KV blocks, reference counts and automatic prefix caching (vLLM v1's block pool and
KV-cache manager, nano-vllm's block manager).

- A block holds `block_size` tokens of K/V for every layer. A request owns a *block table*: the list of
  its blocks in token order.
- Every block is in exactly one state: **owned** (ref_cnt > 0, held by that many requests),
  **cached-and-free** (ref_cnt == 0 but it keeps its hash, so a later prompt can still hit it) or
  **free** (ref_cnt == 0, no hash). Free and cached-and-free blocks sit in one doubly linked free
  queue that doubles as the LRU order: allocation pops the head, a freed block goes to the tail, and a
  request frees its blocks in reverse so its tail is evicted before its (more shareable) head.
- A *full* block is identified by a chained hash `H(parent hash, its token ids, extra keys)`; the salt
  enters the first block only and then propagates through the chain. Only full blocks are shared, and
  they are immutable, so copy-on-write is never needed. A hit also compares the token ids (nano-vllm),
  so even a hash collision cannot return the wrong K/V.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int], salt: str | None = None) -> bytes:
    """Chained hash of one full block; deterministic across processes (tensor-parallel ranks agree)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash or b"\0")
    if salt is not None:
        h.update(b"salt:" + salt.encode())
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None  # the tokens a cached block holds (checked on a hit)
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)

    @property
    def is_in_free_queue(self) -> bool:
        return self.prev_free is not None


class FreeBlockQueue:
    """Doubly linked list of blocks with O(1) popleft / append / remove-from-the-middle (a prefix hit)."""

    def __init__(self, blocks: Iterable[KVBlock]):
        self._head, self._tail = KVBlock(-1), KVBlock(-1)  # sentinels
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        block = self._head.next_free
        while block is not self._tail:
            yield block
            block = block.next_free

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free, block.next_free, self._tail.prev_free = (
            block,
            last,
            self._tail,
            block,
        )
        self._len += 1

    def remove(self, block: KVBlock) -> None:
        block.prev_free.next_free, block.next_free.prev_free = block.next_free, block.prev_free
        block.prev_free = block.next_free = None
        self._len -= 1

    def popleft(self) -> KVBlock:
        if not self._len:
            raise RuntimeError("no free KV blocks")
        block = self._head.next_free
        self.remove(block)
        return block


class BlockPool:
    """All blocks of the cache, the free/LRU queue and the hash -> cached block map."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.enable_caching = enable_caching
        self.cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Pop `num_blocks` from the LRU head (evicting their cached hashes), each with ref_cnt 1."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} KV blocks but only {self.num_free_blocks} are free")
        out = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = block.token_ids = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def get_cached_block(self, block_hash: bytes, token_ids: Sequence[int]) -> KVBlock | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-hit blocks; a cached-and-free block leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        """Drop one reference per block; blocks reaching 0 join the free queue's tail in the given order."""
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed with ref_cnt={block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: KVBlock, block_hash: bytes, token_ids: Sequence[int]) -> bool:
        """Register a full, owned block under its hash; False (a no-op) if an equal block is already cached."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return False
        block.block_hash, block.token_ids = block_hash, tuple(token_ids)
        self.cached[block_hash] = block
        return True

    def uncache_block(self, block: KVBlock) -> None:
        """Forget a block's hash (its K/V was never written after all); it stays where it is otherwise."""
        if block.block_hash is not None and self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash = block.token_ids = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached-and-free block's hash (owned blocks keep theirs)."""
        for block in self.free_queue:
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = block.token_ids = None

    def check_invariants(self, owners: dict[str, list[KVBlock]] | None = None) -> None:
        """Raise AssertionError if the pool is inconsistent; with `owners` (request -> block table) also
        check every ref count equals the number of tables holding the block."""
        in_queue = list(self.free_queue)
        assert len(in_queue) == len(self.free_queue), "free queue length is stale"
        assert len({b.block_id for b in in_queue}) == len(in_queue), "a block is twice in the free queue"
        for block in self.blocks:
            assert block.ref_cnt >= 0, f"block {block.block_id} has ref_cnt {block.ref_cnt}"
            assert (block.ref_cnt == 0) == block.is_in_free_queue, (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} but in free queue = {block.is_in_free_queue}"
            )
            if block.block_hash is not None:
                assert self.cached.get(block.block_hash) is block, (
                    f"block {block.block_id} hash is not mapped"
                )
        for block_hash, block in self.cached.items():
            assert block.block_hash == block_hash, (
                f"cache map entry points at block {block.block_id} with another hash"
            )
        if owners is not None:
            counts = [0] * len(self.blocks)
            for table in owners.values():
                for block in table:
                    counts[block.block_id] += 1
            for block in self.blocks:
                assert block.ref_cnt == counts[block.block_id], (
                    f"block {block.block_id}: ref_cnt {block.ref_cnt} but held by {counts[block.block_id]} tables"
                )


class KVCacheManager:
    """Block tables of the running requests on top of a `BlockPool` (vLLM v1's KVCacheManager).

    The scheduler asks `get_computed_blocks` when a request starts (its prefix-cache hit), then
    `allocate_slots` before every step it schedules the request, and `free` when it finishes or is
    preempted. Full blocks are registered in the prefix cache as soon as their slots are allocated:
    their hash depends only on the (already known) token ids, and within one forward pass every layer
    writes the whole batch's K/V before any query reads, so a request admitted later in the same step
    may already hit them. Those registrations are provisional until the engine calls `commit` after the
    step's forward pass succeeded; if it failed, `rollback` forgets them, so a block whose K/V was never
    (or only partly) written can never be a hit.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.tables: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[bytes]] = {}
        self._num_cached: dict[str, int] = {}
        self.on_free = (
            None  # called with a request id whenever its blocks are released (per-request KV state)
        )
        self._uncommitted: list[KVBlock] = []  # registered this step, K/V not yet known to be written

    @property
    def num_blocks(self) -> int:
        return len(self.pool.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(
        self, request_id: str, token_ids: Sequence[int], num_tokens: int, salt: str | None
    ) -> list[bytes]:
        """Hashes of the full blocks among the first `num_tokens` tokens, extended lazily and kept."""
        hashes = self._hashes.setdefault(request_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            hashes.append(
                hash_block_tokens(
                    hashes[-1] if hashes else None, token_ids[i * bs : (i + 1) * bs], salt if i == 0 else None
                )
            )
        return hashes

    def get_computed_blocks(
        self, request_id: str, token_ids: Sequence[int], salt: str | None = None
    ) -> tuple[list[KVBlock], int]:
        """The longest run of cached full blocks at the start of `token_ids` and the tokens they cover.

        At least one token is always left to compute, since sampling needs the last position's logits."""
        if not self.pool.enable_caching:
            return [], 0
        bs = self.block_size
        num_tokens = len(token_ids) - 1
        hashes = self._block_hashes(request_id, token_ids, num_tokens, salt)[
            : num_tokens // bs
        ]  # may hold more
        hits = []
        for i, block_hash in enumerate(hashes):
            block = self.pool.get_cached_block(block_hash, token_ids[i * bs : (i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * bs

    def allocate_slots(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
        salt: str | None = None,
    ) -> bool:
        """Make room for `num_new_tokens` after `num_computed_tokens` (which counts any prefix hits passed
        in `new_computed_blocks`). Returns False, changing nothing, when too few blocks are free."""
        table = self.tables.get(request_id, [])
        num_total = num_computed_tokens + num_new_tokens
        num_needed = self.num_blocks_for(num_total) - len(table) - len(new_computed_blocks)
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if max(num_needed, 0) + num_evictable_hits > self.pool.num_free_blocks:
            return False
        self.tables[request_id] = table
        self.pool.touch(new_computed_blocks)  # before popping new blocks, so hits cannot be evicted
        table.extend(new_computed_blocks)
        table.extend(self.pool.get_new_blocks(max(num_needed, 0)))
        if self.pool.enable_caching:
            num_full = min(num_total, len(token_ids)) // self.block_size
            hashes = self._block_hashes(request_id, token_ids, num_full * self.block_size, salt)
            bs = self.block_size
            for i in range(self._num_cached.get(request_id, 0), num_full):
                if table[i] is not None and self.pool.cache_block(
                    table[i], hashes[i], token_ids[i * bs : (i + 1) * bs]
                ):
                    self._uncommitted.append(table[i])
            self._num_cached[request_id] = num_full
        return True

    def commit(self) -> None:
        """The step's forward pass wrote every block registered since the last commit: they are real hits now."""
        self._uncommitted.clear()

    def rollback(self) -> None:
        """The step failed: forget the hashes registered since the last commit (the scheduler must also reset
        the step's requests, whose computed counts may rest on those blocks)."""
        for block in self._uncommitted:
            self.pool.uncache_block(block)
        self._uncommitted.clear()

    def free(self, request_id: str) -> None:
        """Release a request's blocks, tail first (so its tail is evicted first). Idempotent."""
        table = self.tables.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if table is not None:
            self.pool.free_blocks(b for b in reversed(table) if b is not None)
        if self.on_free is not None:
            self.on_free(request_id)

    def evict_blocks(self, request_id: str, logical_blocks: Sequence[int]) -> None:
        """Release some blocks of a running request (an eviction policy dropped all their tokens). Their
        table entries become None, so logical block i still covers tokens [i * block_size, (i + 1) * block_size)."""
        table = self.tables[request_id]
        for i in logical_blocks:
            if not 0 <= i < len(table) or table[i] is None:
                raise ValueError(f"request {request_id!r} holds no logical block {i} (table of {len(table)})")
            self.pool.free_blocks([table[i]])
            table[i] = None

    def num_held_blocks(self, request_id: str) -> int:
        return sum(b is not None for b in self.tables.get(request_id, ()))

    def forget(self, request_id: str) -> None:
        """Drop the hashes kept for a finished request (a preempted one keeps them for its resumption)."""
        self.free(request_id)
        self._hashes.pop(request_id, None)

    def block_ids(self, request_id: str) -> list[int]:
        """Physical block ids of a request's table; an evicted block reads as 0 (never addressed: its tokens are gone)."""
        return [0 if b is None else b.block_id for b in self.tables.get(request_id, ())]

    def check_invariants(self) -> None:
        self.pool.check_invariants({r: [b for b in t if b is not None] for r, t in self.tables.items()})
