"""CUDA-graph decode (engine/cuda_graphs.py) without CUDA: buckets, padding, when graphs are refused, and the
static-buffer path run eagerly giving the eager engine's tokens. Graph replay itself: test_cuda_graphs_gpu.py."""

import logging

import pytest
import torch

from longreach import LLM, SamplingParams
from longreach.engine import cuda_graphs
from longreach.engine.cuda_graphs import DecodeGraphs, batch_buckets, bucket_for, graph_support, width_bucket

CUDA = torch.device("cuda")  # only its type is read by graph_support


def test_batch_buckets_are_powers_of_two_then_the_maximum():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError, match="max_batch=0"):
        batch_buckets(0)


def test_bucket_for_picks_the_smallest_bucket_that_holds_the_batch():
    buckets = batch_buckets(20)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 16, 17, 20)] == [1, 2, 4, 8, 16, 20, 20]
    assert bucket_for(21, buckets) is None  # larger than every bucket: eager
    with pytest.raises(ValueError, match="got 0"):
        bucket_for(0, buckets)


def test_width_buckets_double_from_the_minimum_and_stop_at_the_table_capacity():
    assert width_bucket(1, 10_000) == cuda_graphs.MIN_WIDTH
    assert width_bucket(cuda_graphs.MIN_WIDTH + 1, 10_000) == 2 * cuda_graphs.MIN_WIDTH
    assert width_bucket(300, 300) == 300
    with pytest.raises(ValueError, match="width 301"):
        width_bucket(301, 300)


def _engine(path, **kwargs):
    return LLM(path, dtype="fp32", block_size=4, num_kv_blocks=400, **kwargs).engine


def test_the_cpu_engine_never_captures_and_says_why(tiny_llama, caplog):
    with caplog.at_level(logging.INFO, logger="longreach.engine.cuda_graphs"):
        engine = _engine(tiny_llama[0])
    assert engine.runner.graphs is None
    assert "CUDA-graph decode off: the model runs on cpu" in caplog.text
    with caplog.at_level(logging.INFO, logger="longreach.engine.cuda_graphs"):
        assert _engine(tiny_llama[0], enforce_eager=True).runner.graphs is None
    assert "enforce_eager=True" in caplog.text


def test_graph_support_refuses_what_a_graph_cannot_replay_exactly(tiny_llama):
    path = tiny_llama[0]
    engine = _engine(path)
    assert graph_support(engine.model, engine.runner.layout, engine.cache, CUDA) is None
    window = LLM(path, dtype="fp32", kv_policy="window", kv_policy_args={"window": 16}).engine
    assert "EvictionLayout" in graph_support(window.model, window.runner.layout, window.cache, CUDA)
    fp32_pages_bf16_model = LLM(path, dtype="bf16", kv_cache_dtype="fp32", num_kv_blocks=40).engine
    reason = graph_support(
        fp32_pages_bf16_model.model, fp32_pages_bf16_model.runner.layout, fp32_pages_bf16_model.cache, CUDA
    )
    assert "fp32 KV pages are converted" in reason
    yarn = LLM(path, dtype="fp32", rope_scaling={"rope_type": "dynamic", "factor": 2.0}).engine
    assert "per request length" in graph_support(yarn.model, yarn.runner.layout, yarn.cache, CUDA)
    assert "tensor parallelism" in graph_support(
        engine.model, engine.runner.layout, engine.cache, CUDA, parallel=object()
    )


def _prompts():
    return [[(13 * i + 7 * j) % 120 + 1 for j in range(3 + 5 * i)] for i in range(7)]


class _Counting(DecodeGraphs):
    def run(self, step):
        self.num_runs = getattr(self, "num_runs", 0) + 1
        self.sizes = getattr(self, "sizes", set()) | {len(step.seqs)}
        return super().run(step)


@pytest.mark.parametrize("max_batch", [8, 4])
def test_static_buffers_run_eagerly_give_the_eager_tokens(tiny_llama, max_batch):
    """Decode steps of 7 (padded to 8; or, with max_batch 4, too many: eager), then fewer as requests finish
    (padded to 4 and 2), through the static buffers: the same greedy tokens as the plain eager engine."""
    path = tiny_llama[0]
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0, ignore_eos=True) for i in range(7)]
    eager = LLM(path, dtype="fp32", block_size=4, num_kv_blocks=400)
    expected = [o.token_ids for o in eager.generate(_prompts(), params, use_tqdm=False)]
    llm = LLM(path, dtype="fp32", block_size=4, num_kv_blocks=400)
    engine = llm.engine
    graphs = _Counting(engine.model, engine.cache, max_batch, max_width=64, device="cpu", capture=False)
    engine.runner.graphs = graphs
    got = [o.token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]
    assert got == expected
    assert graphs.num_runs > 10 and max(graphs.sizes) <= max_batch and {3, 5} & graphs.sizes


def test_load_pads_rows_past_the_batch_as_empty_sequences(tiny_llama):
    llm = LLM(tiny_llama[0], dtype="fp32", block_size=4, num_kv_blocks=400)
    engine = llm.engine
    graphs = DecodeGraphs(engine.model, engine.cache, 8, max_width=64, device="cpu", capture=False)
    graphs.slots.fill_(99)
    graphs.lens.fill_(99)
    for prompt in _prompts()[:3]:
        engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while not all(s.num_output_tokens for s in engine.requests.values()):
        engine.step()
    step = engine.runner.prepare(engine.scheduler.schedule())
    bucket, columns = graphs.load(step)
    paged = step.kwargs["kv_cache"].batch
    assert (bucket, columns) == (4, cuda_graphs.MIN_WIDTH)
    assert graphs.slots[:3].tolist() == paged.slot_mapping.tolist() and graphs.slots[3] == -1
    assert graphs.lens[:3].tolist() == paged.decode_seqlens.tolist() and graphs.lens[3] == 0
    assert graphs.cu_k[:5].tolist() == [
        0,
        *paged.decode_seqlens.cumsum(0).tolist(),
        int(paged.decode_seqlens.sum()),
    ]
    width = paged.decode_block_table.shape[1]
    assert torch.equal(graphs.table[:3, :width], paged.decode_block_table)
