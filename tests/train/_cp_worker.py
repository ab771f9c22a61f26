"""Run under `torchrun --nproc-per-node 4`: context parallelism equals one process.

1. The model alone: a tiny Llama (fp32, seeded) and one packed micro-batch of two 48-token rows whose
documents cross the shard boundaries. Every rank computes the one-process loss and gradients, then the
same with the batch sharded over rings of 2 ({0,1}, {2,3}) and of 4, gradients summed over the ring;
rank 0 writes the largest relative differences to workdir/model.json.
2. The CLI on the same process group: `--context-parallel 2` (2 data x 2 context ranks, FSDP2 over all
four), 4 steps with a sharded checkpoint at step 2; a resume of that checkpoint; `--context-parallel 4`
with activation checkpointing; 2 bf16 steps at CP = 2 with an eval.
argv: config.toml workdir
"""

import json
import sys

import torch
import torch.distributed as dist

from longreach.cli import main
from longreach.config import ModelConfig
from longreach.model.llama import LlamaForCausalLM
from longreach.model.loader import init_weights
from longreach.train.context_parallel import ParallelPlan, shard_batch
from longreach.train.data import IGNORE_INDEX, Sample, collate
from longreach.train.loss import chunked_cross_entropy
from tests.train.conftest import TINY_MODEL


def packed_batch(seqlens_rows, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for seqlens in seqlens_rows:
        ids = torch.randint(0, vocab, (sum(seqlens),), generator=g)
        labels = torch.roll(ids, -1).clone()
        labels[torch.tensor(seqlens).cumsum(0) - 1] = IGNORE_INDEX  # a document's last token has no target
        positions = torch.cat([torch.arange(s) for s in seqlens])
        samples.append(Sample(ids, labels, positions, tuple(seqlens), len(ids)))
    return collate(samples)


def loss_and_grads(model, batch, group):
    model.zero_grad(set_to_none=True)
    inputs = dict(meta=batch.meta, kv_cache=batch.kv_cache, return_hidden=True)
    loss = chunked_cross_entropy(
        model(batch.input_ids, batch.positions, **inputs), model.lm_head.weight, batch.labels, 16
    )
    loss.backward()
    loss = loss.detach().clone()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if group is not None:  # the ring's shards add up to the whole batch
        for t in (loss, *grads.values()):
            dist.all_reduce(t, group=group)
    return loss.item(), grads


def compare_model(work):
    rank = dist.get_rank()
    cfg = ModelConfig.from_hf_dict(dict(TINY_MODEL))
    model = LlamaForCausalLM(cfg)
    init_weights(model, seed=0)
    batch = packed_batch([(5, 30, 13), (20, 1, 27)], cfg.vocab_size)
    ref_loss, ref_grads = loss_and_grads(model, batch, None)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    results = {}
    for size, group in ((2, pairs[rank // 2]), (4, dist.new_group([0, 1, 2, 3]))):
        plan = ParallelPlan(None, group, cp_rank=dist.get_rank(group), cp_size=size)
        loss, grads = loss_and_grads(model, shard_batch(batch, plan), group)
        worst = max((grads[n] - g).norm().item() / g.norm().item() for n, g in ref_grads.items())
        results[f"cp{size}"] = {"loss_rel": abs(loss - ref_loss) / ref_loss, "grad_rel": worst}
    if rank == 0:
        with open(f"{work}/model.json", "w") as f:
            json.dump(results, f)


config, work = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
compare_model(work)
common = ["train", "--config", config, "--max-steps", "4"]
assert main([*common, "--output", f"{work}/cp2", "--context-parallel", "2", "--save-every", "2"]) == 0
resume = ["--resume", f"{work}/cp2/step-0000002", "--context-parallel", "2"]
assert main([*common, "--output", f"{work}/cp2_resumed", *resume]) == 0
# activation checkpointing recomputes each block, ring exchange included, in backward: same losses
cp4 = ["--context-parallel", "4", "--activation-checkpointing"]
assert main([*common, "--output", f"{work}/cp4", *cp4]) == 0
# bf16 (FSDP2 mixed precision) with the periodic eval loss, also sharded over the ring
bf16 = ["--context-parallel", "2", "--dtype", "bf16", "--max-steps", "2", "--eval-every", "2"]
assert main(["train", "--config", config, "--output", f"{work}/bf16", *bf16]) == 0
dist.destroy_process_group()
