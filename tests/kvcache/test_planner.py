"""The KV planner alone: block and window bytes per storage scheme, block counts from each budget, TP agreement,
prefix caching only where it can be honoured, and the errors it names."""

import logging

import pytest
import torch

from longreach.config import CacheConfig, ModelConfig, SchedulerConfig
from longreach.kvcache.planner import plan_kv_cache
from longreach.rope import RopeConfig

CFG = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rope=RopeConfig(head_dim=32),
)
SC = SchedulerConfig(max_model_len=256, max_num_seqs=4)
CPU = torch.device("cpu")


def plan(dtype=torch.float32, **cache):
    return plan_kv_cache(CFG, CacheConfig(**cache), SC, dtype, CPU)


def test_block_bytes_per_storage_scheme():
    # 2 layers x 2 KV heads x 32 dims x 16 tokens x (K and V)
    assert plan(num_blocks=8).block_bytes == 2 * 2 * 32 * 16 * 2 * 4
    assert plan(torch.bfloat16, num_blocks=8).block_bytes == 2 * 2 * 32 * 16 * 2 * 2
    int8 = plan(num_blocks=8, kv_cache_dtype="int8")
    assert (
        int8.block_bytes == 2 * 2 * 32 * 16 * 2 + 2 * 2 * 16 * 2 * 2
    )  # codes + one fp16 scale per token/head
    int4 = plan(num_blocks=8, block_size=32, kv_cache_dtype="int4")
    assert int4.num_window_slots == SC.max_num_seqs and int4.window_slot_bytes > 0
    assert int4.total_bytes == 8 * int4.block_bytes + 4 * int4.window_slot_bytes
    assert plan(num_blocks=8).window_slot_bytes == 0


def test_block_count_from_each_budget_and_tp_agreement():
    per_block = plan(num_blocks=1).block_bytes
    assert plan(kv_cache_memory=per_block * 10 + 5).num_blocks == 10
    assert plan(memory_fraction=0.5).num_blocks == SC.max_num_seqs * 256 // 16  # capped at what is usable
    agreed = plan_kv_cache(
        CFG, CacheConfig(num_blocks=50), SC, torch.float32, CPU, tp_size=2, agree_min=lambda n: min(n, 7)
    )
    assert agreed.num_blocks == 7 and agreed.num_kv_heads == 1
    int4 = plan(kv_cache_memory=10**6, block_size=32, kv_cache_dtype="int4")
    assert int4.total_bytes <= 10**6  # the window slots come out of the budget first


def test_prefix_caching_only_where_it_holds(caplog):
    assert plan(num_blocks=8).enable_prefix_caching
    assert not plan(num_blocks=8, enable_prefix_caching=False).enable_prefix_caching
    with caplog.at_level(logging.INFO, logger="longreach"):
        assert not plan(num_blocks=8, block_size=32, kv_cache_dtype="int4").enable_prefix_caching
        assert not plan(num_blocks=8, kv_policy="window", kv_policy_args={"window": 32}).enable_prefix_caching
    assert "int4 KV keeps recent tokens" in caplog.text and "kv_policy 'window'" in caplog.text


def test_policy_bounds_what_a_request_holds():
    windowed = plan(num_blocks=64, kv_policy="window", kv_policy_args={"window": 32})
    assert windowed.max_held_tokens(longest=10_000, step_tokens=16) < 100
    assert plan(num_blocks=64).max_held_tokens(longest=10_000, step_tokens=16) == 10_000


@pytest.mark.parametrize(
    "cache, message",
    [
        (dict(num_blocks=8, block_size=16, kv_cache_dtype="int4"), "block_size=32"),
        (
            dict(
                num_blocks=8,
                block_size=32,
                kv_cache_dtype="int4",
                kv_policy="window",
                kv_policy_args={"window": 32},
            ),
            "cannot evict from an int4",
        ),
        (
            dict(num_blocks=8, kv_policy="window", kv_policy_args={"size": 3}),
            "are not budgets of kv_policy 'window'",
        ),
        (
            dict(kv_cache_memory=100, block_size=32, kv_cache_dtype="int4"),
            "does not hold int4's window slots",
        ),
    ],
)
def test_errors_name_the_bad_values(cache, message):
    with pytest.raises(ValueError, match=message):
        plan(**cache)
