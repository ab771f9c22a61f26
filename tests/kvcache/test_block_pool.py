"""Block pool and KV-cache manager: LRU order, chained hashes, and hypothesis-driven invariants."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from longreach.kvcache.block_pool import BlockPool, KVCacheManager, hash_block_tokens

BS = 4


def test_chained_hash_depends_on_parent_tokens_and_salt():
    a = hash_block_tokens(None, [1, 2, 3, 4])
    assert a == hash_block_tokens(None, [1, 2, 3, 4])
    assert a != hash_block_tokens(None, [1, 2, 3, 5])
    assert a != hash_block_tokens(None, [1, 2, 3, 4], salt="user-a")
    assert hash_block_tokens(a, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])


def test_free_queue_is_lru_and_a_request_frees_its_tail_first():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    tokens = list(range(12))
    assert kv.allocate_slots("a", tokens, 0, 12)
    table = kv.tables["a"]
    kv.forget("a")
    kv.check_invariants()
    # three untouched blocks first, then a's blocks tail-first: its last block is evicted before its first
    order = [b.block_id for b in kv.pool.free_queue]
    assert order[-3:] == [table[2].block_id, table[1].block_id, table[0].block_id]
    hits, num = kv.get_computed_blocks("b", tokens + [99])
    assert [b.block_id for b in hits] == [b.block_id for b in table] and num == 12
    kv.pool.get_new_blocks(4)  # evicts the 3 never-used blocks and a's tail block
    hits, num = kv.get_computed_blocks("c", tokens + [99])
    assert num == 8 and [b.block_id for b in hits] == [table[0].block_id, table[1].block_id]


def test_prefix_hit_leaves_one_token_to_compute_and_shares_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    prompt = list(range(8))
    assert kv.allocate_slots("a", prompt, 0, 8)
    hits, num = kv.get_computed_blocks("b", prompt)  # identical prompt: the last block is recomputed
    assert num == 4 and hits[0] is kv.tables["a"][0]
    assert kv.allocate_slots("b", prompt, num, 4, hits)
    assert kv.tables["b"][0].ref_cnt == 2 and kv.tables["b"][1] is not kv.tables["a"][1]
    kv.check_invariants()
    kv.free("b")
    kv.free("b")  # idempotent
    assert kv.tables["a"][0].ref_cnt == 1
    kv.check_invariants()


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    assert kv.allocate_slots("a", list(range(8)), 0, 8)
    assert not kv.allocate_slots("b", list(range(100, 108)), 0, 8)
    assert "b" not in kv.tables and kv.num_free_blocks == 1
    kv.check_invariants()


def test_pool_rejects_over_allocation_and_double_free():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="only 2 are free"):
        pool.get_new_blocks(3)
    block = pool.get_new_blocks(1)[0]
    pool.free_blocks([block])
    with pytest.raises(RuntimeError, match="ref_cnt=0"):
        pool.free_blocks([block])


PREFIXES = [[7, 7, 7, 7, 1, 2, 3, 4], [7, 7, 7, 7, 5, 6], [9, 8, 7, 6, 5, 4, 3, 2, 1]]


class BlockPoolMachine(RuleBasedStateMachine):
    """Random interleavings of admit (with prefix hits) / append / preempt / finish on a small pool."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(num_blocks=12, block_size=BS)
        self.tokens: dict[str, list[int]] = {}  # every live request's tokens
        self.computed: dict[str, int] = {}  # running requests' allocated-token counts
        self.next_id = 0

    @rule(
        prefix=st.sampled_from(PREFIXES),
        tail=st.lists(st.integers(0, 3), min_size=1, max_size=10),
        chunk=st.integers(1, 16),
    )
    def admit_new(self, prefix, tail, chunk):
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.tokens[rid] = prefix + tail
        self._admit(rid, chunk)

    @precondition(lambda self: any(r not in self.computed for r in self.tokens))
    @rule(data=st.data(), chunk=st.integers(1, 16))
    def resume_preempted(self, data, chunk):
        rid = data.draw(st.sampled_from(sorted(r for r in self.tokens if r not in self.computed)))
        self._admit(rid, chunk)

    def _admit(self, rid, chunk):
        tokens = self.tokens[rid]
        hits, num_hit = self.kv.get_computed_blocks(rid, tokens)
        assert num_hit < len(tokens)
        for i, block in enumerate(hits):  # a hit always holds exactly these tokens
            assert block.token_ids == tuple(tokens[i * BS : (i + 1) * BS])
        num_new = min(chunk, len(tokens) - num_hit)
        if self.kv.allocate_slots(rid, tokens, num_hit, num_new, hits):
            self.computed[rid] = num_hit + num_new

    @precondition(lambda self: bool(self.computed))
    @rule(data=st.data(), num=st.integers(1, 6), new_token=st.integers(0, 3))
    def append(self, data, num, new_token):
        """Compute more of the request; once caught up, it 'samples' a token first (a decode step)."""
        rid = data.draw(st.sampled_from(sorted(self.computed)))
        tokens = self.tokens[rid]
        if self.computed[rid] == len(tokens):
            tokens.append(new_token)
        num = min(num, len(tokens) - self.computed[rid])
        if self.kv.allocate_slots(rid, tokens, self.computed[rid], num):
            self.computed[rid] += num

    @precondition(lambda self: bool(self.computed))
    @rule(data=st.data())
    def preempt(self, data):
        rid = data.draw(st.sampled_from(sorted(self.computed)))
        self.kv.free(rid)
        self.kv.free(rid)  # freeing twice is a no-op
        del self.computed[rid]

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.forget(rid)
        self.computed.pop(rid, None)
        del self.tokens[rid]

    @invariant()
    def pool_is_consistent(self):
        self.kv.check_invariants()
        owned = {b.block_id for table in self.kv.tables.values() for b in table}
        assert len(owned) + self.kv.num_free_blocks == self.kv.num_blocks
        for rid, table in self.kv.tables.items():
            assert len(table) == self.kv.num_blocks_for(self.computed[rid])

    def teardown(self):
        for rid in list(self.tokens):
            self.kv.forget(rid)
        self.kv.check_invariants()
        assert self.kv.num_free_blocks == self.kv.num_blocks, "blocks leaked after every request finished"
        assert all(b.ref_cnt == 0 for b in self.kv.pool.blocks)


BlockPoolMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_block_pool_invariants = BlockPoolMachine.TestCase
