"""The scheduler alone (no model): token budget, mixed prefill/decode steps, FCFS, preemption newest-first;
with the output processor deciding stops (as the engine wires them)."""

import pytest

from longreach.config import SchedulerConfig
from longreach.engine.output import OutputProcessor
from longreach.engine.sampling_params import SamplingParams
from longreach.engine.scheduler import Scheduler
from longreach.engine.sequence import RequestStatus, Sequence
from longreach.kvcache.block_pool import KVCacheManager


def make(num_blocks=64, block_size=4, **cfg):
    kv = KVCacheManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_model_len=cfg.pop("max_model_len", 256), **cfg), kv)
    sched.output = OutputProcessor(None, [0], sched.cfg.max_model_len, sched.finish)  # stops, as the engine
    return sched


def submit(sched, seq):
    sched.add(seq)
    sched.output.add(seq)
    return seq


def add(sched, rid, prompt_len, max_tokens=8, first=1):
    return submit(
        sched,
        Sequence(str(rid), list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens)),
    )


def update(sched, batch, tokens):
    sampling = batch.sampling_seqs
    sched.update(batch, sampling, tokens, [None] * len(sampling))
    sched.output.process(sampling)


def step(sched, token=5):
    batch = sched.schedule()
    update(sched, batch, [token] * len(batch.sampling_seqs))
    sched.kv.check_invariants()
    return batch


def test_budget_chunks_long_prompts_and_mixes_them_with_decodes():
    sched = make(max_num_batched_tokens=10)
    short = add(sched, "short", 3)
    long = add(sched, "long", 25, first=100)
    batch = step(sched)  # short's whole prompt + 7 tokens of long's
    assert batch.num_new_tokens == [3, 7] and short.num_output_tokens == 1 and long.num_computed_tokens == 7
    batch = step(sched)  # short decodes (1 token) alongside long's next chunk (9)
    assert [s.request_id for s in batch.seqs] == ["short", "long"] and batch.num_new_tokens == [1, 9]
    while long.num_output_tokens == 0:
        assert step(sched).num_batched_tokens <= 10
    assert long.num_computed_tokens == 25 and long.metrics.first_token_time is not None


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched = make(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    add(sched, "a", 10)
    add(sched, "b", 10, first=50)
    assert step(sched).num_new_tokens == [10]  # b does not fit in the 6 tokens left
    assert step(sched).num_new_tokens == [1, 10]


def test_fcfs_and_max_num_seqs():
    sched = make(max_num_seqs=2)
    seqs = [add(sched, i, 4, max_tokens=2 if i == 0 else 8, first=10 * i + 1) for i in range(4)]
    assert [s.request_id for s in step(sched).seqs] == ["0", "1"]
    while not seqs[0].is_finished:
        step(sched)
    assert [s.request_id for s in step(sched).seqs] == ["1", "2"]
    while sched.has_unfinished():
        step(sched)
    assert [s.finish_reason for s in seqs] == ["length"] * 4
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_preemption_recomputes_the_newest_and_loses_nothing():
    sched = make(num_blocks=8, block_size=4)  # 32 token slots
    old = add(sched, "old", 8, max_tokens=12)
    new = add(sched, "new", 8, max_tokens=12, first=40)
    step(sched)
    preempted_at = None
    for i in range(40):
        batch = step(sched)
        if batch.preempted and preempted_at is None:
            preempted_at = i
            assert batch.preempted == [new] and new.status is RequestStatus.WAITING
            assert new.num_computed_tokens == 0 and sched.waiting[0] is new
        if not sched.has_unfinished():
            break
    assert preempted_at is not None
    assert old.num_output_tokens == new.num_output_tokens == 12
    assert new.metrics.num_preemptions >= 1 and old.metrics.num_preemptions == 0
    assert sched.kv.num_free_blocks == 8


def test_stop_conditions():
    sched = make(max_model_len=12)
    by_eos = add(sched, "eos", 4)
    by_id = Sequence("id", [1, 2], SamplingParams(stop_token_ids=[5]))
    ignoring = Sequence("ign", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
    by_len = add(sched, "len", 10, max_tokens=None, first=60)
    submit(sched, by_id)
    submit(sched, ignoring)
    batch = sched.schedule()
    tokens = {"eos": 0, "id": 5, "ign": 0, "len": 7}
    update(sched, batch, [tokens[s.request_id] for s in batch.sampling_seqs])
    assert (by_eos.finish_reason, by_eos.stop_reason) == ("stop", None)
    assert (by_id.finish_reason, by_id.stop_reason) == ("stop", 5)
    assert not ignoring.is_finished
    while not by_len.is_finished:
        step(sched, token=7)
    assert by_len.finish_reason == "length" and by_len.num_tokens == 12


def test_abort_frees_blocks_of_waiting_and_running_requests():
    sched = make()
    running = add(sched, "r", 9)
    step(sched)
    waiting = add(sched, "w", 5, first=30)
    sched.output.abort(running)
    sched.output.abort(waiting)
    sched.output.abort(waiting)  # idempotent
    assert not sched.has_unfinished() and sched.kv.num_free_blocks == sched.kv.num_blocks
    assert running.finish_reason == waiting.finish_reason == "abort"


def test_config_errors_name_the_values():
    with pytest.raises(ValueError, match="max_num_batched_tokens=8 must be >= max_model_len=16"):
        SchedulerConfig(max_model_len=16, max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        SchedulerConfig(max_model_len=16, max_num_seqs=0)
