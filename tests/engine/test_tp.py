"""Tensor parallelism on CPU: 2 processes over gloo give the single-process outputs, token for token."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longreach import LLM, SamplingParams

CONFIGS = [
    dict(block_size=4, max_num_batched_tokens=32),
    dict(block_size=4, num_kv_blocks=40),
]  # chunked; preempting


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (7, 30, 61, 90)]


def _run(path, **config):
    llm = LLM(path, dtype="fp32", **config)
    outs = llm.generate(_prompts(), SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
    return [o.token_ids for o in outs], llm.engine.scheduler.num_preemptions


def _worker(rank, path, store, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        results = [_run(path, tensor_parallel_size=2, **config) for config in CONFIGS]
        attn = LLM(path, dtype="fp32", tensor_parallel_size=2).engine.model.model.layers[0].self_attn
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump({"results": results, "heads": [attn.num_heads, attn.num_kv_heads]}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
def test_two_rank_tensor_parallel_equals_single_process(tiny_llama, tmp_path):
    path = tiny_llama[0]
    mp.start_processes(
        _worker,
        args=(str(path), str(tmp_path / "store"), str(tmp_path / "out.json")),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["heads"] == [2, 1]  # each rank holds half the heads of a 4/2-head model
    for config, (tokens, preemptions) in zip(CONFIGS, got["results"]):
        expected, expected_preemptions = _run(path, **config)
        assert tokens == expected
        assert preemptions == expected_preemptions
    assert got["results"][1][1] > 0  # the small cache did force preemption


def test_tensor_parallel_needs_a_process_group(tiny_llama, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    if dist.is_initialized():
        pytest.skip("a process group already exists")
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2"):
        LLM(tiny_llama[0], tensor_parallel_size=2)
