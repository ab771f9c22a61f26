"""KV eviction policies: exactly the promised tokens, whole blocks freed as a sequence grows, bounded memory."""

import pytest
import torch

from longreach.attention.reference import attention_one, visible_mask
from longreach.kvcache.policies import (
    POLICIES,
    H2OPolicy,
    NoEviction,
    SinksPolicy,
    WindowPolicy,
    accumulate_attention,
    key_attention_mass,
    make_policy,
)

HEAVY = (3, 17, 40)


def _crafted_attention(held: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """One decode query's probabilities over the held keys (the newest is the query's own): 0.3 on each heavy
    token present, the rest on the query's own token."""
    probs = torch.zeros(held.numel())
    probs[torch.isin(held, torch.tensor(HEAVY))] = 0.3
    probs[-1] += 1 - probs.sum()
    return probs[None, None, :]  # (Hq, Sq, K)


def _generate(policy, num_steps, block_size, attention=None):
    """An engine's bookkeeping for one sequence decoding token by token; asserts the bounds at every step."""
    held, scores = torch.empty(0, dtype=torch.long), torch.empty(0)
    held_blocks, num_allocated, ever_evicted = set(), 0, set()
    for length in range(1, num_steps + 1):
        new = length - 1
        if new % block_size == 0:  # the new token opens a block
            held_blocks.add(new // block_size)
            num_allocated += 1
        held = torch.cat([held, torch.tensor([new])])
        if attention is not None:
            scores = accumulate_attention(scores, attention(held, length))
        plan = policy.plan(length, block_size, held=held, scores=scores if attention is not None else None)
        for block in plan.free_blocks:
            assert block in held_blocks
            held_blocks.remove(block)
        ever_evicted |= set(held.tolist()) - set(plan.keep.tolist())
        assert not ever_evicted & set(plan.keep.tolist())  # evicted tokens never come back
        held, scores = plan.keep, (scores[plan.keep_index] if attention is not None else scores)
        assert set((held // block_size).tolist()) == held_blocks  # exactly the blocks still needed are held
        assert held.numel() <= policy.max_kept_tokens(block_size)
        assert len(held_blocks) <= policy.max_held_blocks(block_size)
    return held, held_blocks, num_allocated


def test_window_and_sinks_keep_exactly_their_tokens():
    plan = WindowPolicy(10).plan(50, block_size=8)
    assert plan.keep.tolist() == list(range(40, 50))
    assert plan.free_blocks == (0, 1, 2, 3, 4)  # block 5 (40..47) and 6 stay
    plan = SinksPolicy(window=10, num_sinks=4).plan(50, block_size=8)
    assert plan.keep.tolist() == [0, 1, 2, 3] + list(range(40, 50))
    assert plan.free_blocks == (1, 2, 3, 4)
    assert SinksPolicy(window=10, num_sinks=4).plan(12, 8).keep.tolist() == list(range(12))
    assert (
        NoEviction().plan(50, 8).keep.tolist() == list(range(50))
        and NoEviction().plan(50, 8).free_blocks == ()
    )
    # only held tokens are considered, and keep_index points into held
    held = torch.tensor([0, 1, 44, 45, 46, 47, 48, 49, 50])
    plan = SinksPolicy(window=4, num_sinks=1).plan(51, 8, held=held)
    assert plan.keep.tolist() == [0, 47, 48, 49, 50] and plan.keep_index.tolist() == [0, 5, 6, 7, 8]
    assert plan.free_blocks == ()  # 44..46 share block 5 with 47


@pytest.mark.parametrize("policy", [WindowPolicy(16), SinksPolicy(window=16, num_sinks=4)])
def test_eviction_without_rerotation_is_the_masked_attention(policy):
    """Decoding token by token over the kept keys (original rotations, query at its true position) gives exactly
    full attention under the policy's mask: window_size=(W, 0), plus the first S keys for sinks."""
    seqlen, gen = 80, torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(seqlen, 4, 32, generator=gen) for _ in range(3))
    visible = visible_mask(seqlen, seqlen, True, (policy.window, 0), "cpu")
    if isinstance(policy, SinksPolicy):
        visible |= visible_mask(seqlen, seqlen, True, (-1, -1), "cpu") & (torch.arange(seqlen) < 4)[None, :]
    want, _ = attention_one(q, k, v, mask=visible)
    held = torch.empty(0, dtype=torch.long)
    for pos in range(seqlen):
        keys = torch.cat([held, torch.tensor([pos])])  # kept keys + the new token
        out, _ = attention_one(q[pos : pos + 1], k[keys], v[keys])
        torch.testing.assert_close(out[0], want[pos], rtol=1e-5, atol=1e-6)
        held = policy.plan(pos + 1, 8, held=keys).keep


def test_h2o_keeps_the_heavy_hitters_of_a_crafted_pattern():
    held = torch.arange(64)
    scores = accumulate_attention(None, _crafted_attention(held, 64))
    for _ in range(4):  # more queries, same pattern
        scores = accumulate_attention(scores, _crafted_attention(held, 64))
    plan = H2OPolicy(heavy=3, recent=8).plan(64, 8, scores=scores)
    assert plan.keep.tolist() == [3, 17, 40] + list(range(56, 64))
    assert plan.free_blocks == (1, 3, 4, 6)


def test_h2o_block_unit_keeps_the_heaviest_blocks():
    scores = torch.zeros(64)
    scores[[3, 4]] = 1.0  # block 0: 2.0
    scores[41] = 1.5  # block 5: 1.5
    scores[17] = 0.5  # block 2: 0.5
    plan = H2OPolicy(heavy=16, recent=8, unit="block").plan(64, 8, scores=scores)
    assert plan.keep.tolist() == list(range(0, 8)) + list(range(40, 48)) + list(range(56, 64))
    assert plan.free_blocks == (1, 2, 3, 4, 6)
    plan = H2OPolicy(heavy=16, recent=8, unit="block").plan(
        67, 8, held=torch.arange(67), scores=torch.zeros(67)
    )
    assert plan.keep[-11:].tolist() == list(range(56, 67))  # the recent window in whole blocks


def test_h2o_generation_keeps_heavy_hitters_and_stays_bounded():
    """Token by token, 0.3 of every query's mass on each of tokens 3, 17, 40 once they exist: a budget of 3
    heavy hitters ends with exactly those and the recent window (40 displaces an earlier pick once it has
    outscored it)."""
    policy = H2OPolicy(heavy=3, recent=8)
    held, held_blocks, num_allocated = _generate(
        policy, num_steps=110, block_size=8, attention=_crafted_attention
    )
    assert held.tolist() == [3, 17, 40] + list(range(102, 110))
    assert held_blocks == {0, 2, 5, 12, 13} and num_allocated == 14


@pytest.mark.parametrize(
    "policy",
    [
        WindowPolicy(20),
        SinksPolicy(window=20, num_sinks=4),
        H2OPolicy(heavy=10, recent=10),
        H2OPolicy(heavy=16, recent=8, unit="block"),
    ],
)
def test_memory_stays_bounded_after_ten_times_the_budget(policy):
    budget = policy.max_kept_tokens(8)
    gen = torch.Generator().manual_seed(0)

    def random_attention(held, length):
        return torch.softmax(torch.randn(2, 1, held.numel(), generator=gen) * 3, dim=-1)

    attention = random_attention if isinstance(policy, H2OPolicy) else None
    held, held_blocks, num_allocated = _generate(
        policy, num_steps=10 * budget, block_size=8, attention=attention
    )
    assert held.numel() <= budget
    assert (
        num_allocated == -(-10 * budget // 8)
        and len(held_blocks) <= policy.max_held_blocks(8) < num_allocated
    )


def test_key_attention_mass():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, 16, generator=gen), torch.randn(10, 2, 16, generator=gen)
    k[6] = 4 * q[0, :2]  # key 6 matches query 0's heads 0 and 1
    mass = key_attention_mass(q, k, query_positions=torch.tensor([7, 8, 9]), key_positions=torch.arange(10))
    assert mass.shape == (10,) and mass.sum().item() == pytest.approx(3 * 4)
    assert mass.argmax().item() == 6
    # keys after a query's position receive nothing from it
    mass = key_attention_mass(q[:1], k, torch.tensor([4]), torch.arange(10))
    assert (mass[5:] == 0).all() and mass.sum().item() == pytest.approx(4)


def test_validation_names_bad_values():
    assert POLICIES == ("none", "window", "sinks", "h2o")
    assert isinstance(make_policy("sinks", window=64), SinksPolicy)
    assert make_policy("h2o", heavy=4, recent=4).max_kept_tokens(8) == 8
    assert H2OPolicy.from_ratio(1000, 0.1, 0.1).max_kept_tokens(8) == 200
    for call, match in [
        (lambda: make_policy("lru"), "'lru'"),
        (lambda: make_policy("window"), "window=<tokens>"),
        (lambda: WindowPolicy(0), "window=0"),
        (lambda: SinksPolicy(8, num_sinks=-1), "num_sinks=-1"),
        (lambda: H2OPolicy(4, 0), "recent=0"),
        (lambda: H2OPolicy(4, 4, unit="head"), "'head'"),
        (lambda: make_policy("h2o", heavy=4), "recent=None"),
        (lambda: WindowPolicy(4).plan(10, 0), "block_size=0"),
        (lambda: WindowPolicy(4).plan(10, 4, held=torch.tensor([3, 2])), "strictly increasing"),
        (lambda: WindowPolicy(4).plan(10, 4, held=torch.tensor([3, 12])), "last 12"),
        (lambda: H2OPolicy(2, 2).plan(10, 4, scores=torch.zeros(3)), r"\(3,\)"),
        (lambda: H2OPolicy.from_ratio(100, 1.5), "heavy_ratio=1.5"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
