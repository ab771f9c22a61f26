"""Every rope type under every schedule: a request's greedy tokens equal its solo run whether it is batched with
others, prefilled in chunks or served from the prefix cache; and equal transformers' greedy `generate` wherever
the engine's semantics says they must (docs/serving.md, "RoPE that depends on length"):
length-independent types always; dynamic NTK and LongRoPE when the request's positions stay on one side of the
original length (transformers switches tables per forward pass, so a request crossing it mixes two).
Also: max_model_len is checked against what the rope supports, and a rope override sets its default."""

import logging

import pytest
import torch

from longreach import LLM, SamplingParams
from tests.engine.test_parity import _hf_greedy
from tests.model.conftest import make_hf_model
from tests.model.test_llama import ORIG, ROPES

MAX_NEW = 12
TYPES = ["default", "linear", "dynamic", "yarn", "llama3", "longrope"]


def _rope_model(rope, tmp_path_factory):
    max_pos = ORIG if rope in ("linear", "dynamic") else 4 * ORIG  # HF's meaning: the original for these two
    # initializer_range 0.15, not 0.02: with tiny weights q.k is ~0, attention is uniform and the rotation
    # (hence the rope choice) barely moves a greedy token; these weights make attention sharp enough to tell
    model = make_hf_model(
        "llama", ROPES[rope], max_position_embeddings=max_pos, head_dim=16, initializer_range=0.15
    )
    path = tmp_path_factory.mktemp(f"rope-{rope}")
    model.save_pretrained(path)
    return path, model


def _prompts():
    g = torch.Generator().manual_seed(7)
    rand = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    long_prefix = rand(44)
    return [
        rand(5),
        rand(14),  # stay below ORIG (32) with their new tokens: short side
        rand(25),  # crosses ORIG while generating
        long_prefix + rand(6),
        long_prefix + rand(25),
        rand(70),
    ]  # beyond ORIG from the start


def _side(rope, prompt):
    """'short' / 'long' when the request's positions stay on one side of the original length, else 'cross'."""
    last = len(prompt) + MAX_NEW - 1  # the most positions a forward pass sees
    if last <= ORIG:
        return "short"
    return "long" if len(prompt) > ORIG else "cross"


def _must_match_transformers(rope, prompt):
    side = _side(rope, prompt)
    if rope == "dynamic":
        return side == "short"  # beyond, transformers grows the base every decode step
    if rope == "longrope":
        return side != "cross"
    return True


SCHEDULES = {
    "batched": dict(),
    "chunked_7": dict(max_num_batched_tokens=7, block_size=4),
    "chunked_13_no_cache": dict(max_num_batched_tokens=13, block_size=4, enable_prefix_caching=False),
    "tight_kv_preemption": dict(num_kv_blocks=20, block_size=8, max_num_batched_tokens=40),
}


@pytest.fixture(scope="module", params=TYPES)
def rope_case(request, tmp_path_factory):
    path, theirs = _rope_model(request.param, tmp_path_factory)
    prompts = _prompts()
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    solo = []
    for p in prompts:  # each alone in a fresh engine: no neighbours, no chunks, no cache
        llm = LLM(path, dtype="fp32", enable_prefix_caching=False, num_kv_blocks=8, block_size=16)
        solo.append(llm.generate([p], params, use_tqdm=False)[0].token_ids)
    return request.param, path, theirs, prompts, solo, params


def test_solo_matches_transformers_where_the_semantics_says(rope_case):
    rope, _, theirs, prompts, solo, _ = rope_case
    checked = [i for i, p in enumerate(prompts) if _must_match_transformers(rope, p)]
    expected = _hf_greedy(theirs, [prompts[i] for i in checked], max_new=MAX_NEW)
    for i, ref in zip(checked, expected):
        assert solo[i] == ref, (
            f"{rope}: prompt {i} ({_side(rope, prompts[i])} side) differs from transformers"
        )
    assert len(checked) >= (2 if rope == "dynamic" else 5)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_any_schedule_gives_the_solo_tokens(rope_case, schedule):
    rope, path, _, prompts, solo, params = rope_case
    llm = LLM(path, dtype="fp32", **{"num_kv_blocks": 64, **SCHEDULES[schedule]})
    order = [5, 0, 3, 2, 4, 1]  # shorts and longs interleaved in one batch
    outs = llm.generate([prompts[i] for i in order], params, use_tqdm=False)
    for i, out in zip(order, outs):
        assert out.token_ids == solo[i], (
            f"{rope} / {schedule}: prompt {i} ({_side(rope, prompts[i])}) changed"
        )
    if schedule == "tight_kv_preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.num_kv_blocks


def test_prefix_cache_never_mixes_rope_tables(tmp_path_factory):
    """A block written with LongRoPE's short factors must not serve a request that uses the long ones."""
    path, _ = _rope_model("longrope", tmp_path_factory)
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(3, 128, (16,), generator=g).tolist()
    short, long = prefix + [5, 6], prefix + torch.randint(3, 128, (30,), generator=g).tolist()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm = LLM(path, dtype="fp32", block_size=4, num_kv_blocks=32)
    llm.generate([short], params, use_tqdm=False)
    out = llm.generate([long], params, use_tqdm=False)[0]
    assert out.metrics.num_cached_tokens == 0
    assert (
        out.token_ids
        == LLM(path, dtype="fp32", enable_prefix_caching=False, num_kv_blocks=16)
        .generate([long], params, use_tqdm=False)[0]
        .token_ids
    )
    again = llm.generate([long[:-1] + [9]], params, use_tqdm=False)[0]  # same table: hits
    assert again.metrics.num_cached_tokens >= 16


def test_max_model_len_is_checked_against_the_rope(tiny_llama, monkeypatch, caplog):
    path = tiny_llama[0]  # default rope, max_position_embeddings 512
    assert LLM(path, dtype="fp32").engine.scheduler_config.max_model_len == 512
    with pytest.raises(
        ValueError, match=r"max_model_len=1024 exceeds the 512 tokens .*allow_long_max_model_len"
    ):
        LLM(path, dtype="fp32", max_model_len=1024)
    with caplog.at_level(logging.WARNING, logger="longreach"):
        llm = LLM(path, dtype="fp32", max_model_len=1024, allow_long_max_model_len=True)
    assert llm.engine.scheduler_config.max_model_len == 1024 and "exceeds the 512 tokens" in caplog.text
    monkeypatch.setenv("LONGREACH_ALLOW_LONG_MAX_MODEL_LEN", "1")
    assert LLM(path, dtype="fp32", max_model_len=1024).engine.scheduler_config.max_model_len == 1024


@pytest.mark.parametrize(
    "rope, expected",
    [
        ({"rope_type": "yarn", "factor": 4.0}, 2048),  # original = the checkpoint's 512
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, 1024),
        ({"rope_type": "linear", "factor": 2.0}, 1024),
        ({"rope_type": "dynamic", "factor": 3.0}, 1536),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 4096),
    ],
)
def test_a_rope_override_sets_the_default_max_model_len(tiny_llama, rope, expected):
    llm = LLM(tiny_llama[0], dtype="fp32", rope_scaling=rope, num_kv_blocks=8)
    assert llm.engine.scheduler_config.max_model_len == expected


def test_contiguous_generator_keeps_each_prompt_on_its_own_tables(tmp_path_factory):
    """`longreach generate`'s batched generator (the engine's reference) follows the same per-request rule."""
    from longreach.model.generate import generate
    from longreach.model.loader import load_model

    path, _ = _rope_model("longrope", tmp_path_factory)
    model = load_model(path, dtype="fp32")
    prompts = _prompts()
    batched = generate(model, prompts, max_tokens=MAX_NEW)
    alone = [generate(model, [p], max_tokens=MAX_NEW)[0] for p in prompts]
    assert batched == alone
