"""inv_freq / attention_factor against transformers' ROPE_INIT_FUNCTIONS, config parsing and validation."""

import math

import pytest
import torch

from longreach.rope import ROPE_FUNCTIONS, RopeConfig, RotaryEmbedding, compute_inv_freq, rope_config_from_hf

BASE = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 1,
    "intermediate_size": 64,
    "vocab_size": 32,
    "max_position_embeddings": 4096,
}
CASES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 8.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "yarn_mscale_ratio": {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
    },
    "yarn_notrunc": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
        "truncate": False,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "longrope": {
        "rope_type": "longrope",
        "original_max_position_embeddings": 1024,
        "factor": 4.0,
        "short_factor": [1.0 + i / 64 for i in range(32)],
        "long_factor": [1.0 + i / 4 for i in range(32)],
    },
}


def _hf_config(params, theta=500000.0, partial=None):
    import transformers

    d = {k: v for k, v in BASE.items() if k != "model_type"}
    rope = {**params, "rope_theta": theta}
    if partial is not None:
        rope["partial_rotary_factor"] = partial
    return transformers.LlamaConfig(**d, rope_parameters=rope)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seq_len", [None, 8192])
@pytest.mark.parametrize("partial", [None, 0.5])
def test_inv_freq_matches_transformers(case, seq_len, partial):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(CASES[case])
    if partial and case == "longrope":
        params["short_factor"], params["long_factor"] = (
            params["short_factor"][:16],
            params["long_factor"][:16],
        )
    hf = _hf_config(params, partial=partial)
    rope_type = params["rope_type"]
    fn = ROPE_INIT_FUNCTIONS[rope_type] if rope_type != "default" else None
    if fn is None:
        dim = int(64 * (partial or 1.0))
        expected, expected_factor = 1.0 / (500000.0 ** (torch.arange(0, dim, 2).float() / dim)), 1.0
    else:
        expected, expected_factor = fn(hf, "cpu", seq_len=seq_len)
    ours = rope_config_from_hf(
        {
            **BASE,
            "rope_parameters": {
                **params,
                "rope_theta": 500000.0,
                **({"partial_rotary_factor": partial} if partial else {}),
            },
        }
    )
    got, factor = compute_inv_freq(ours, seq_len)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=0)
    assert math.isclose(factor, expected_factor, rel_tol=1e-6)


def test_static_ntk_is_default_with_larger_base():
    cfg = RopeConfig(head_dim=128, theta=10000.0, rope_type="ntk", scaling={"factor": 8.0})
    inv_freq, factor = compute_inv_freq(cfg)
    base = 10000.0 * 8.0 ** (128 / 126)
    torch.testing.assert_close(
        inv_freq, 1.0 / base ** (torch.arange(0, 128, 2).float() / 128), rtol=1e-6, atol=0
    )
    assert factor == 1.0
    assert inv_freq[0] == 1.0  # the highest frequency is untouched: the "NTK-aware" point


def test_dynamic_grows_only_past_max_position():
    cfg = rope_config_from_hf({**BASE, "rope_scaling": {"type": "dynamic", "factor": 4.0}})
    short, _ = compute_inv_freq(cfg, 100)
    default, _ = compute_inv_freq(RopeConfig(head_dim=64, theta=10000.0))
    torch.testing.assert_close(short, default)
    long, _ = compute_inv_freq(cfg, 4 * 4096)
    assert (long[1:] < default[1:]).all()


def test_4x_and_5x_dicts_agree():
    v4 = rope_config_from_hf(
        {
            **BASE,
            "rope_theta": 500000.0,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
        }
    )
    v5 = rope_config_from_hf(
        {
            **BASE,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 500000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        }
    )
    assert v4 == v5 and v4.theta == 500000.0 and v4.rope_type == "yarn"


def test_original_length_defaults_to_max_position():
    cfg = rope_config_from_hf({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 1.0}})
    assert cfg.original_max_position_embeddings == 4096


def test_registry_covers_every_type():
    assert set(ROPE_FUNCTIONS) == {"default", "linear", "dynamic", "ntk", "yarn", "llama3", "longrope"}


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"rope_type": "warp", "factor": 2.0}, "unknown rope_type 'warp'"),
        ({"rope_type": "linear"}, "needs ['factor']"),
        ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 1024}, "low_freq_factor"),
        ({"rope_type": "linear", "factor": 0.5}, "factor=0.5"),
        (
            {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 32},
            "short_factor has 3 entries",
        ),
        (
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
            "high_freq_factor",
        ),
    ],
)
def test_bad_rope_config_names_the_value(scaling, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        rope_config_from_hf({**BASE, "rope_scaling": scaling})


def test_unknown_keys_warn_and_load_as_in_transformers(tmp_path):
    """transformers loads a rope dict with keys it does not know (with a warning), so we must load it too."""
    scaling = {"rope_type": "linear", "factor": 2.0, "beta_fast": 32, "finetuned": True}
    with pytest.warns(UserWarning, match=r"ignores unknown keys \['beta_fast', 'finetuned'\]"):
        cfg = rope_config_from_hf({**BASE, "rope_scaling": scaling})
    assert cfg.rope_type == "linear" and cfg.scaling["factor"] == 2.0
    assert torch.equal(
        compute_inv_freq(cfg)[0],
        compute_inv_freq(
            rope_config_from_hf({**BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
        )[0],
    )


def test_per_token_lengths_give_each_token_its_own_table():
    """RotaryEmbedding(seq_len=(T,) tensor): each token rotates with its own request's tables (longrope short vs
    long, dynamic NTK's base), exactly as if its request ran alone with that length."""
    for scaling in (
        {"rope_type": "dynamic", "factor": 4.0},
        {
            "rope_type": "longrope",
            "original_max_position_embeddings": 1024,
            "short_factor": [1.0 + 0.01 * i for i in range(32)],
            "long_factor": [2.0 + 0.1 * i for i in range(32)],
        },
    ):
        rope = RotaryEmbedding(rope_config_from_hf({**BASE, "rope_scaling": scaling}))
        positions = torch.tensor([0, 5, 9, 0, 3, 700])
        lengths = torch.tensor([10, 10, 10, 9000, 9000, 5000])
        cos, sin = rope(positions, lengths)
        for idx, length in (([0, 1, 2], 10), ([3, 4], 9000), ([5], 5000)):
            c, s = rope(positions[idx], length)
            assert torch.equal(cos[idx], c) and torch.equal(sin[idx], s)
        assert not torch.equal(cos[1:2], rope(positions[1:2], 9000)[0])  # position 5: short vs long differ


@pytest.mark.parametrize(
    "scaling, max_pos, expected",
    [
        ({}, 4096, 4096),
        ({"rope_type": "linear", "factor": 4.0}, 4096, 16384),
        ({"rope_type": "dynamic", "factor": 2.0}, 4096, 8192),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, 16384, 16384),
        ({"rope_type": "yarn", "factor": 4.0}, 8192, 32768),  # an override on an 8K checkpoint
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            131072,
            131072,
        ),  # Llama 3.1's own config
    ],
)
def test_max_supported_length_as_vllm_derives_it(scaling, max_pos, expected):
    cfg = rope_config_from_hf({**BASE, "max_position_embeddings": max_pos, "rope_scaling": scaling or None})
    assert cfg.max_supported_length == expected


def test_yarn_factor_mismatch_warns():
    with pytest.warns(UserWarning, match="differs from max_position_embeddings"):
        rope_config_from_hf(
            {
                **BASE,
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 2048,
                },
            }
        )
