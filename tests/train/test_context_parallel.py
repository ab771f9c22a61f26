"""Context parallelism: the ring's block plan covers exactly the document-causal mask, ring attention in
one process equals the reference, and 2 / 4 gloo ranks reproduce one process (loss, gradients, training
with FSDP2 on the data dimension, a sharded checkpoint's resume)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from longreach.attention import flash_attn_varlen_func
from longreach.model.loader import load_model
from longreach.train.config import ParallelConfig, TrainConfig
from longreach.train.context_parallel import ParallelPlan, plan_parallelism, shard_batch
from longreach.train.data import Sample, collate
from longreach.train.parallel import DistInfo
from longreach.train.ring_attention import chunk_ids, ring_attention, ring_layout
from longreach.train.trainer import Trainer
from tests.train.conftest import TINY_MODEL, tiny_config_dict, to_toml

BOUNDARIES = [0, 7, 25, 26, 33, 60]  # documents of 7, 18, 1, 7 and 27 tokens; 60 = 2 x 3 ranks x 10


def _doc_causal_mask(boundaries):
    total = boundaries[-1]
    doc = torch.zeros(total, dtype=torch.long)
    for start in boundaries[1:-1]:
        doc[start:] += 1
    i = torch.arange(total)
    return (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None])


@pytest.mark.parametrize("size", [1, 2, 3])
def test_block_plan_covers_the_document_causal_mask_exactly_once(size):
    chunk = BOUNDARIES[-1] // (2 * size)
    covered = torch.zeros(BOUNDARIES[-1], BOUNDARIES[-1], dtype=torch.long)
    for rank in range(size):
        layout = ring_layout(BOUNDARIES, chunk, rank, size)
        mine = [t for c in chunk_ids(rank, size) for t in range(c * chunk, (c + 1) * chunk)]
        for step, pairs in enumerate(layout.steps):
            theirs = [
                t for c in chunk_ids((rank - step) % size, size) for t in range(c * chunk, (c + 1) * chunk)
            ]
            for p in pairs:
                for b in range(len(p.cu_q) - 1):
                    for i in range(p.cu_q[b], p.cu_q[b + 1]):
                        for j in range(p.cu_k[b], p.cu_k[b + 1]):
                            if not p.causal or j - p.cu_k[b] <= i - p.cu_q[b]:
                                covered[mine[p.q_start + i], theirs[p.k_start + j]] += 1
    assert torch.equal(covered, _doc_causal_mask(BOUNDARIES).long())


def test_ring_attention_in_one_process_matches_the_reference():
    torch.manual_seed(0)
    q = torch.randn(60, 4, 8, requires_grad=True)
    k, v = (torch.randn(60, 2, 8, requires_grad=True) for _ in range(2))
    cu = torch.tensor(BOUNDARIES, dtype=torch.int32)
    ref = flash_attn_varlen_func(q, k, v, cu, cu, None, None, causal=True, backend="reference")
    grad = torch.randn_like(ref)
    out = ring_attention(q, k, v, ring_layout(BOUNDARIES, 30, 0, 1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(
        torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_shards_partition_the_padded_batch_with_original_positions():
    samples = [
        Sample(torch.arange(s), torch.arange(s), torch.arange(s) % 5, (5,) * (s // 5), s) for s in (20, 15)
    ]
    batch = collate(samples)  # 35 tokens: 3 ranks pad them to 36
    shards = [shard_batch(batch, ParallelPlan(None, None, cp_rank=r, cp_size=3)) for r in range(3)]
    assert sorted(torch.cat([s.input_ids[s.labels != -100] for s in shards]).tolist()) == sorted(
        batch.input_ids.tolist()
    )
    assert sum(s.num_targets for s in shards) == batch.num_targets
    assert sum(s.num_tokens for s in shards) == batch.num_tokens
    first = shards[0]  # chunks 0 and 5: tokens 0..5 and 30..34 plus one padding token
    assert first.positions.tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 0]
    assert first.meta.cu_seqlens_q.tolist() == [0, 5, 6, 11, 12]


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match="from 0 to 2 x 2 ranks x 10 = 40"):
        ring_layout([0, 30], 10, 0, 2)
    with pytest.raises(ValueError, match="parallel.context=3 must divide the number of ranks"):
        plan_parallelism(DistInfo(0, 4, 0), torch.device("cpu"), 3)
    with pytest.raises(ValueError, match="parallel.context=0"):
        ParallelConfig(context=0)


def _records(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def _curve(directory: Path) -> list[float]:
    return [r["loss"] for r in _records(directory) if "loss" in r]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_context_parallel_ranks_reproduce_one_process(corpus, tmp_path):
    d = tiny_config_dict(corpus, tmp_path / "unused", training={"loss_chunk_size": 16})
    d["data"]["eval_paths"] = [str(corpus)]  # read only by the bf16 run, the one with an eval_every
    (tmp_path / "c.toml").write_text(to_toml(d))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "4",
            str(Path(__file__).with_name("_cp_worker.py")),
            str(tmp_path / "c.toml"),
            str(tmp_path),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for size, figures in json.loads((tmp_path / "model.json").read_text()).items():
        assert figures["loss_rel"] <= 1e-5 and figures["grad_rel"] <= 1e-5, (size, figures)
    single_dir = tmp_path / "single"
    cfg = TrainConfig.from_dict(
        {**d, "schedule": {**d["schedule"], "max_steps": 4}, "checkpoint": {"output_dir": str(single_dir)}}
    )
    single = [r["loss"] for r in Trainer(cfg).train()]
    assert _curve(tmp_path / "cp2") == pytest.approx(single, rel=1e-5)
    assert _curve(tmp_path / "cp4") == pytest.approx(single, rel=1e-5)
    assert _curve(tmp_path / "cp2_resumed") == pytest.approx(single[2:], rel=1e-5)
    bf16 = _records(tmp_path / "bf16")
    one_bf16 = cfg.replace(
        schedule={"max_steps": 2},
        training={"dtype": "bf16", "eval_every": 2},
        checkpoint={"output_dir": str(tmp_path / "single_bf16")},
    )
    expected = Trainer(one_bf16).train()  # autocast in one process vs FSDP2's bf16 parameters: bf16 rounding
    assert [r["loss"] for r in bf16 if "loss" in r] == pytest.approx([r["loss"] for r in expected], rel=1e-2)
    eval_losses = [r["eval_loss"] for r in bf16 if "eval_loss" in r]
    assert eval_losses == pytest.approx([expected[-1]["eval_loss"]], rel=1e-2)
    reference = load_model(single_dir / "final").state_dict()
    for run in ("cp2", "cp2_resumed", "cp4"):
        exported = load_model(tmp_path / run / "final").state_dict()
        for name, tensor in reference.items():
            torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-5)


def test_train_and_extend_flags_set_parallel_context(corpus, tmp_path):
    from longreach.train import cli, extend  # lazy: only this test parses the verbs' flags

    for module, extra in ((cli, []), (extend, ["--model", str(tmp_path), "--rope", "yarn", "--factor", "2"])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args = parser.parse_args([*extra, "--data", str(corpus), "--context-parallel", "2"])
        assert "parallel.context=2" in cli.collect_overrides(args)
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY_MODEL)))
    assert extend.extend_config(args).parallel.context == 2
