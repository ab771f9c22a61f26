"""Eviction policies in the engine: memory stays bounded however long a request generates, blocks are
freed as tokens fall out (no leak), `window` is exactly sliding-window attention, sinks keep the first
tokens, h2o keeps its budget of heavy hitters."""

import json
import shutil

import pytest

from longreach import LLM, SamplingParams
from tests.engine.test_kv_storage import _compare, _prompts, _run

BS = 8


def _generate_stepwise(llm, prompts, max_tokens):
    """Step the engine by hand; returns (outputs, the most blocks any request held, held positions per step)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    outs, most, held = {}, 0, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        for rid in ids:
            if rid in engine.kv_manager.tables:
                most = max(most, engine.kv_manager.num_held_blocks(rid))
                held.append(engine.kv_states.get(rid).held)
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks, "blocks leaked"
    assert engine.kv_states.states == {}
    engine.kv_manager.check_invariants()
    return [outs[i] for i in ids], most, held


def test_window_bounds_memory_over_a_long_generation(tiny_llama):
    window = 24
    llm = LLM(
        tiny_llama[0],
        dtype="fp32",
        device="cpu",
        block_size=BS,
        num_kv_blocks=16,
        max_model_len=512,
        max_num_batched_tokens=32,
        kv_policy="window",
        kv_policy_args={"window": window},
    )
    policy = llm.engine.policy
    # 2 x 440 tokens would need 2 x 55 blocks without eviction; the cache has 16
    outs, most, held = _generate_stepwise(llm, _prompts((40, 90)), max_tokens=350)
    assert all(len(o.token_ids) == 350 for o in outs)
    assert most <= policy.max_held_blocks(BS)  # between steps
    assert (
        max(o.metrics.max_kv_blocks for o in outs) <= policy.max_held_blocks(BS) + 32 // BS
    )  # during a step
    assert all(h is None or h.numel() <= window for h in held)
    assert llm.engine.kv_manager.pool.enable_caching is False


def test_window_policy_is_sliding_window_attention(tiny_llama, tmp_path):
    """The same weights as a Mistral whose sliding_window sees W + 1 keys (the query and W before it)."""
    window = 20
    mistral = tmp_path / "mistral"
    shutil.copytree(tiny_llama[0], mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(
        json.dumps({**config, "model_type": "mistral", "sliding_window": window + 1})
    )
    lengths = (37, 70, 5)
    ref = _run(mistral, max_tokens=40, lengths=lengths, block_size=BS, max_num_batched_tokens=32)
    got = _run(
        tiny_llama[0],
        max_tokens=40,
        lengths=lengths,
        block_size=BS,
        max_num_batched_tokens=32,
        kv_policy="window",
        kv_policy_args={"window": window},
    )
    identical, worst = _compare(ref, got)
    assert identical == 1.0 and worst < 1e-4, (identical, worst)
    full = _run(tiny_llama[0], max_tokens=40, lengths=lengths, block_size=BS, max_num_batched_tokens=32)
    assert _compare(full, got)[1] > 1e-3  # and it is not full attention


def test_sinks_keep_the_first_tokens(tiny_llama):
    llm = LLM(
        tiny_llama[0],
        dtype="fp32",
        device="cpu",
        block_size=BS,
        num_kv_blocks=16,
        max_model_len=512,
        max_num_batched_tokens=32,
        kv_policy="sinks",
        kv_policy_args={"window": 16, "num_sinks": 4},
        kv_cache_dtype="int8",
    )
    outs, most, held = _generate_stepwise(llm, _prompts((30,)), max_tokens=200)
    assert len(outs[0].token_ids) == 200 and most <= llm.engine.policy.max_held_blocks(BS)
    late = [h for h in held if h is not None and h[-1] > 100]
    assert late and all(h[:4].tolist() == [0, 1, 2, 3] and h.numel() == 20 for h in late)


def test_h2o_keeps_heavy_hitters_and_recent_tokens(tiny_llama):
    heavy, recent = 8, 16
    llm = LLM(
        tiny_llama[0],
        dtype="fp32",
        device="cpu",
        block_size=BS,
        num_kv_blocks=40,
        max_model_len=512,
        kv_policy="h2o",
        kv_policy_args={"heavy": heavy, "recent": recent},
    )
    outs, most, held = _generate_stepwise(llm, _prompts((30, 50)), max_tokens=120)
    assert all(len(o.token_ids) == 120 for o in outs)
    assert most <= llm.engine.policy.max_held_blocks(BS)
    late = [h for h in held if h is not None and h[-1] > 100]
    assert late and all(h.numel() == heavy + recent for h in late)
    assert any(h[0] < h[-1] - recent - BS for h in late)  # some old heavy hitters survive


def test_policy_errors_name_the_values(tiny_llama):
    with pytest.raises(ValueError, match="unknown kv_policy 'lru'"):
        LLM(tiny_llama[0], dtype="fp32", num_kv_blocks=8, kv_policy="lru")
    with pytest.raises(ValueError, match="KV policy 'window' needs window=<tokens>"):
        LLM(tiny_llama[0], dtype="fp32", num_kv_blocks=8, kv_policy="window")
    with pytest.raises(ValueError, match=r"kv_policy_args \['size'\] are not budgets"):
        LLM(tiny_llama[0], dtype="fp32", num_kv_blocks=8, kv_policy="window", kv_policy_args={"size": 4})
