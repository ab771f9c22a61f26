"""Persistent step inputs (engine/step_buffers.py): block-table rows that grow in place, staging buffers."""

import torch

from longreach import LLM, SamplingParams
from longreach.engine.step_buffers import BlockTableRows, Staging
from longreach.kvcache.block_pool import KVCacheManager


def _allocate(kv: KVCacheManager, request_id: str, num_tokens: int, start: int = 0) -> None:
    assert kv.allocate_slots(request_id, list(range(num_tokens)), start, num_tokens - start)


def test_rows_mirror_the_block_tables_as_they_grow_and_are_freed():
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_caching=False)
    rows = BlockTableRows(kv, num_rows=2)
    _allocate(kv, "a", 5)  # 2 blocks
    _allocate(kv, "b", 3)
    (row_a, row_b), width = rows.sync(["a", "b"])
    assert width == 2 and row_a != row_b
    assert rows.table[row_a, :2].tolist() == kv.block_ids("a")
    _allocate(kv, "a", 70, start=5)  # 18 blocks: past the initial 16 columns
    (row,), width = rows.sync(["a"])
    assert row == row_a and width == 18 and rows.table[row, :18].tolist() == kv.block_ids("a")
    kv.free("a")  # the hook frees the row; a new request reuses it, rebuilt from its own table
    assert "a" not in rows.row_of
    _allocate(kv, "c", 2)
    _allocate(kv, "d", 2)  # a third live request: the table grows rows
    (row_c, row_d), _ = rows.sync(["c", "d"])
    assert rows.table[row_c, :1].tolist() == kv.block_ids("c")
    assert rows.table[row_d, :1].tolist() == kv.block_ids("d")
    assert len({row_b, row_c, row_d}) == 3 and rows.table.shape[0] == 4


def test_a_replaced_table_is_rebuilt_even_without_the_hook():
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_caching=False)
    rows = BlockTableRows(kv)
    kv.on_free = None  # as if freed behind our back
    _allocate(kv, "a", 8)
    rows.sync(["a"])
    kv.free("a")
    kv.pool.get_new_blocks(3)  # the next allocation gets other blocks
    _allocate(kv, "a", 8)
    (row,), _ = rows.sync(["a"])
    assert rows.table[row, :2].tolist() == kv.block_ids("a")


def test_staging_on_cpu_hands_out_the_host_view_itself():
    staging = Staging(torch.device("cpu"))
    staging.begin()
    staging.array("ids", 5, torch.long)[:] = range(5)
    tensor = staging.tensor("ids", (5,))
    assert tensor.tolist() == [0, 1, 2, 3, 4]
    assert tensor.data_ptr() == staging.host_view("ids", (5,), torch.long).data_ptr()  # no copy
    again = staging.host_view("ids", (40,), torch.long)  # grows
    assert again.shape == (40,)
    staging.end()


def test_preempting_engine_matches_an_unconstrained_one(tiny_llama):
    """Rows freed and reused across preemptions still address the right blocks: greedy outputs agree with an
    engine that never preempts."""
    path, _ = tiny_llama
    prompts = [[(11 * i + j) % 100 + 1 for j in range(5 + 3 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    roomy = LLM(path, dtype="fp32", block_size=4, num_kv_blocks=200)
    tight = LLM(path, dtype="fp32", block_size=4, num_kv_blocks=16)
    expected = [o.token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    got = [o.token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert not tight.engine.runner.layout.rows.row_of  # every row released


def test_the_staged_step_metadata_equals_the_one_built_from_lengths(tiny_llama):
    """Decodes, a fresh prefill and a continued chunk in one step: the model-level metadata written into the
    staged buffer is what `AttentionMetadata.from_seqlens` builds from the step's lengths."""
    from longreach.attention import AttentionMetadata

    llm = LLM(tiny_llama[0], dtype="fp32", block_size=4, num_kv_blocks=64, max_num_batched_tokens=14)
    engine = llm.engine
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for i, n in enumerate((5, 9)):
        engine.add_request(list(range(1 + i, 1 + i + n)), params)
    engine.step()  # both prefilled: they decode from now on
    engine.add_request(list(range(40, 70)), params)  # 30 tokens: chunks of 12, the second continued
    seen = set()
    while engine.has_unfinished_requests():
        batch = engine.scheduler.schedule()
        step = engine.runner.prepare(batch)
        paged = step.kwargs["kv_cache"].batch
        computed = [s.num_computed_tokens for s in step.seqs]
        engine.scheduler.requeue(batch)
        expected = AttentionMetadata.from_seqlens(step.counts, [c + n for c, n in zip(computed, step.counts)])
        meta = step.kwargs["meta"]
        assert meta.cu_seqlens_q.tolist() == expected.cu_seqlens_q.tolist()
        assert meta.cu_seqlens_k.tolist() == expected.cu_seqlens_k.tolist()
        assert (meta.max_seqlen_q, meta.max_seqlen_k) == (expected.max_seqlen_q, expected.max_seqlen_k)
        seen.add((paged.num_decodes > 0, paged.fresh_meta is not None, paged.continued_meta is not None))
        engine.step()
    assert (True, True, False) in seen and (True, False, True) in seen  # both mixes were checked
