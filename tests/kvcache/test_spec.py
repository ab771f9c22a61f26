"""The one KV-size calculator (`kvcache.spec`) and its eviction-policy variant (`kvcache.spec_policies`)."""

import pytest

from longreach.config import ModelConfig
from longreach.kvcache.codecs import INT4_GROUP_SIZE, SCALE_DTYPE
from longreach.kvcache.policies import H2OPolicy, NoEviction, SinksPolicy, WindowPolicy
from longreach.kvcache.presets import PRESETS
from longreach.kvcache.quant import Int4KV, make_kv_quantizer
from longreach.kvcache.spec import (
    KV_DTYPES,
    GiB,
    KiB,
    KVBytes,
    kv_bytes_per_request,
    kv_bytes_per_request_without_gqa,
    kv_bytes_per_token,
    without_gqa,
)
from longreach.kvcache.spec_policies import kv_bytes_per_request_under_policy, tokens_under_policy

LLAMA_70B = PRESETS["meta-llama/Llama-3.1-70B"].config
N_128K = 131_072


def _config(**overrides) -> ModelConfig:
    config = {
        "model_type": "llama",
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_size": 256,
        "intermediate_size": 512,
        "vocab_size": 1000,
    }
    return ModelConfig.from_hf_dict(config | overrides)


def test_llama_70b_at_128k():
    gib = {dtype: kv_bytes_per_request(LLAMA_70B, N_128K, dtype) for dtype in KV_DTYPES}
    assert gib["bf16"] == gib["fp16"] == KVBytes(40 * GiB, 0)
    assert gib["fp8"] == gib["int8"]  # e4m3 codes with int8's per-(token, KV head) fp16 scales
    assert gib["int8"].data == 20 * GiB and gib["int8"].total / GiB == 20.3125
    assert gib["int4"] == KVBytes(10 * GiB, 2.5 * GiB) and gib["int4"].total == 12.5 * GiB
    assert kv_bytes_per_request_without_gqa(LLAMA_70B, N_128K, "bf16").total == 320 * GiB


def test_scales_follow_the_codecs():
    """int8: one scale per (token, KV head) for K and V; int4: a scale and a minimum per group of values."""
    config = _config()
    num_values = 2 * 3 * 2 * 64
    assert kv_bytes_per_token(config, "int8") == (num_values, 2 * 3 * 2 * SCALE_DTYPE.itemsize)
    assert kv_bytes_per_token(config, "int4") == (num_values / 2, num_values / INT4_GROUP_SIZE * 2 * 2)
    assert Int4KV().group_size == INT4_GROUP_SIZE


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8", "fp8", "int4"])
def test_calculator_matches_what_the_cache_stores(dtype):
    """A paged block of the quantized cache holds exactly block_size tokens of the calculator's bytes."""
    for config in (_config(), *(preset.config for preset in PRESETS.values())):
        block_bytes = make_kv_quantizer(dtype).block_bytes(64, config.num_key_value_heads, config.head_dim)
        assert config.num_hidden_layers * block_bytes == 64 * kv_bytes_per_token(config, dtype).total


def test_without_gqa_changes_only_the_kv_heads():
    mha = without_gqa(LLAMA_70B)
    assert (mha.num_key_value_heads, mha.num_attention_heads, mha.num_hidden_layers) == (64, 64, 80)
    assert kv_bytes_per_token(mha, "bf16").data == 8 * kv_bytes_per_token(LLAMA_70B, "bf16").data


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="'int2'.*bf16, fp16, fp8, int8, int4"):
        kv_bytes_per_token(LLAMA_70B, "int2")


@pytest.mark.parametrize(
    "policy, context_len, kept, held",
    [
        (NoEviction(), N_128K, N_128K, N_128K),
        (WindowPolicy(4096), N_128K, 4096, 4096 + 16),  # whole blocks: one partly evicted block more
        (WindowPolicy(4096), 1000, 1000, 1000),  # a short request keeps everything
        (SinksPolicy(4096, num_sinks=4), N_128K, 4100, 16 + 4096 + 16),
        (
            H2OPolicy(heavy=512, recent=1536),
            N_128K,
            2048,
            9744,
        ),  # token-unit heavy hitters may pin a block each
    ],
)
def test_tokens_under_policy(policy, context_len, kept, held):
    assert tokens_under_policy(policy, context_len, block_size=16) == (kept, held)


def test_bytes_under_policy_are_bounded():
    window = kv_bytes_per_request_under_policy(LLAMA_70B, N_128K, "bf16", WindowPolicy(4096))
    assert window == KVBytes(4112 * 320 * KiB, 0) and round(window.total / GiB, 2) == 1.25
    none = kv_bytes_per_request_under_policy(LLAMA_70B, N_128K, "int4", NoEviction())
    assert none == kv_bytes_per_request(LLAMA_70B, N_128K, "int4")
