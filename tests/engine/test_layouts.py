"""KV layouts and the runner, without sampling: the inputs a layout builds for a mixed step (row order, slots,
which keys each sequence sees), per-token RoPE lengths, and each layout's after_step bookkeeping."""

import pytest
import torch

from longreach import LLM, SamplingParams
from longreach.engine.layouts import EvictionLayout, Int4Layout, PagedLayout
from longreach.kvcache.paged_cache import PagedBatch
from longreach.kvcache.paged_gather import GatheredBatch


def _mixed_step(engine):
    """One step holding a decode, a fresh prefill and a continued chunk (budget 12, block_size 4)."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request(list(range(3, 9)), params, request_id="dec")  # 6 tokens: prefilled, then decodes
    engine.step()
    engine.add_request(list(range(10, 30)), params, request_id="long")  # 20 tokens: 11 now, 9 later
    batch = engine.scheduler.schedule()
    return batch


def test_paged_layout_orders_decodes_fresh_then_continued(tiny_llama):
    llm = LLM(tiny_llama[0], dtype="fp32", block_size=4, num_kv_blocks=32, max_num_batched_tokens=12)
    engine = llm.engine
    assert isinstance(engine.runner.layout, PagedLayout)
    batch = _mixed_step(engine)
    step = engine.runner.prepare(batch)
    paged = step.kwargs["kv_cache"].batch
    assert isinstance(paged, PagedBatch)
    assert [s.request_id for s in step.seqs] == ["dec", "long"] and step.counts == [1, 11]
    assert paged.num_decodes == 1 and paged.num_fresh_tokens == 11 and paged.continued_meta is None
    assert paged.decode_seqlens.tolist() == [7]
    assert step.kwargs["positions"].tolist() == [6] + list(range(11))
    assert [s.request_id for s in step.sampling] == ["dec"]  # "long" is mid-prompt: no sample
    table = engine.kv_manager.block_ids("long")
    assert paged.slot_mapping[1:].tolist() == [table[p // 4] * 4 + p % 4 for p in range(11)]
    engine.scheduler.requeue(batch)
    while engine.has_unfinished_requests():  # the next chunk is "continued"
        batch = engine.scheduler.schedule()
        step = engine.runner.prepare(batch)
        engine.scheduler.requeue(batch)
        if step.kwargs["kv_cache"].batch.continued_meta is not None:
            break
        engine.step()
    assert step.kwargs["kv_cache"].batch.continued_meta is not None


def test_rope_lengths_are_per_token_and_per_request(tmp_path_factory):
    from tests.engine.test_rope_schedule import _rope_model

    path, _ = _rope_model("longrope", tmp_path_factory)
    llm = LLM(path, dtype="fp32", block_size=4, num_kv_blocks=64)
    engine = llm.engine
    engine.add_request(list(range(3, 8)), SamplingParams(max_tokens=4), request_id="short")
    engine.add_request(list(range(3, 53)), SamplingParams(max_tokens=4), request_id="long")
    step = engine.runner.prepare(engine.scheduler.schedule())
    lengths = step.kwargs["rope_seq_len"].tolist()
    original = llm.engine.model.config.rope.original_max_position_embeddings
    assert lengths == [original] * 5 + [original + 1] * 50  # short table vs long table, per token


@pytest.mark.parametrize(
    "options, layout",
    [
        (dict(kv_cache_dtype="int4", block_size=32), Int4Layout),
        (dict(kv_policy="window", kv_policy_args={"window": 8}, block_size=4), EvictionLayout),
        (dict(kv_policy="h2o", kv_policy_args={"heavy": 4, "recent": 4}, block_size=4), EvictionLayout),
    ],
)
def test_gathered_layouts_keep_their_state_across_steps(tiny_llama, options, layout):
    from tests.model.conftest import make_hf_model

    path = tiny_llama[0]
    if "int4" in options.values():  # int4's value groups run along head_dim: 32 dims at least
        path = tiny_llama[0].parent / "wide"
        make_hf_model("llama", head_dim=32, max_position_embeddings=512).save_pretrained(path)
    llm = LLM(path, dtype="fp32", num_kv_blocks=32, **options)
    engine = llm.engine
    assert isinstance(engine.runner.layout, layout)
    engine.add_request(
        list(range(3, 43)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), request_id="r"
    )
    batch = engine.scheduler.schedule()
    step = engine.runner.prepare(batch)
    assert isinstance(step.kwargs["kv_cache"].batch, GatheredBatch)
    engine.scheduler.requeue(batch)
    while engine.has_unfinished_requests():
        engine.step()
        state = engine.kv_states.states.get("r")
        if state is None:
            break
        if layout is Int4Layout:
            assert state.num_quantized % 32 == 0 and state.window_slot is not None
        else:
            assert state.held is not None and state.held.numel() <= 8 + 4
            if options["kv_policy"] == "h2o":
                assert state.scores is not None and state.scores.shape == state.held.shape
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks and not engine.kv_states.states
    assert torch.is_tensor(step.kwargs["input_ids"])
