"""Context parallelism: one packed sequence sharded over `parallel.context` ranks (torchtitan's cp mesh
dimension), for sequences whose activations one device cannot hold.

The ranks form a 2-D `DeviceMesh` (data x context). FSDP2 shards the parameters over both dimensions
flattened (as torchtitan's `dp_shard_cp`): the ranks of a context group see different tokens of the same
sequences, so their gradients add up like those of data-parallel ranks, and the trainer's
`world_size / num_targets` loss scale still yields the global token mean. Each micro-batch is collated as
usual, padded to a multiple of 2 x context, and cut into 2 x context chunks; ring rank r keeps chunks r and
2 x context - 1 - r (ring_attention.py), with their original positions, so RoPE and document masks are
those of the whole sequence. The model is untouched: attention reaches the other shards through the
model's K/V provider argument (`kv_cache`, whose `attend` here runs ring attention), everything else in a
decoder block is per token. Checkpoints are the usual sharded FSDP checkpoints (any world size reads them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longreach.attention import AttentionMetadata
from longreach.train import parallel
from longreach.train.data import IGNORE_INDEX, Batch
from longreach.train.parallel import DistInfo
from longreach.train.ring_attention import RingLayout, chunk_ids, ring_attention, ring_layout


@dataclass(frozen=True)
class ParallelPlan:
    """Where this rank sits: its data-parallel slot (which samples it reads) and its ring slot."""

    fsdp_mesh: object | None  # the mesh FSDP2 shards over (None in one process)
    cp_group: object | None  # the context-parallel ProcessGroup (None without context parallelism)
    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1


def plan_parallelism(info: DistInfo, device: torch.device, context: int = 1) -> ParallelPlan:
    """Join the process group and build the meshes: 1-D (data) or 2-D (data x context)."""
    if info.world_size % context:
        raise ValueError(
            f"parallel.context={context} must divide the number of ranks ({info.world_size}): "
            f"the ranks form a (data x context) mesh"
        )
    if context == 1:
        mesh = parallel.init_distributed(info, device)
        return ParallelPlan(mesh, None, info.rank, info.world_size)
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel.join_process_group("nccl" if device.type == "cuda" else "gloo")
    data = info.world_size // context
    mesh = init_device_mesh(device.type, (data, context), mesh_dim_names=("dp", "cp"))
    return ParallelPlan(
        mesh._flatten("dp_cp"),  # torchtitan's dp_shard_cp: FSDP over every rank
        mesh["cp"].get_group(),
        mesh.get_local_rank("dp"),
        data,
        mesh.get_local_rank("cp"),
        context,
    )


@dataclass(frozen=True)
class ContextShard:
    """The model's K/V provider for one micro-batch shard: attention over the whole ring's tokens."""

    layout: RingLayout

    def attend(self, layer_idx, q, k, v, meta, window_size) -> torch.Tensor:
        if tuple(window_size) != (-1, -1):
            raise ValueError(
                f"context parallelism supports full causal attention only; layer {layer_idx} has "
                f"window_size={tuple(window_size)} (a sliding-window model)"
            )
        return ring_attention(q, k, v, self.layout)


def _pad(x: torch.Tensor, count: int, value) -> torch.Tensor:
    return F.pad(x, (0, count), value=value) if count else x


def shard_batch(batch: Batch, plan: ParallelPlan) -> Batch:
    """This rank's two chunks of a collated micro-batch (all documents of the batch as one sequence).

    The batch is padded to 2 x cp_size x C tokens (a padding document, no targets). num_targets counts the
    shard's own targets (they add up to the batch's over the ring); num_tokens, the batch's real tokens,
    is reported by ring rank 0 alone for the same reason.
    """
    size, rank = plan.cp_size, plan.cp_rank
    total = batch.input_ids.shape[0]
    chunk_len = -(-total // (2 * size))
    pad = 2 * size * chunk_len - total
    boundaries = batch.meta.cu_seqlens_q.tolist() + ([2 * size * chunk_len] if pad else [])
    device = batch.input_ids.device
    first, second = chunk_ids(rank, size)

    def mine(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [x[first * chunk_len : (first + 1) * chunk_len], x[second * chunk_len : (second + 1) * chunk_len]]
        )

    labels = mine(_pad(batch.labels, pad, IGNORE_INDEX))
    positions = torch.cat([batch.positions, torch.arange(pad, device=device, dtype=batch.positions.dtype)])
    layout = ring_layout(boundaries, chunk_len, rank, size, plan.cp_group, device)
    # each chunk's own document pieces: plain attention over the shard alone would respect documents
    pieces = [p.cu_q[i + 1] - p.cu_q[i] for p in layout.steps[0] if p.causal for i in range(len(p.cu_q) - 1)]
    return Batch(
        mine(_pad(batch.input_ids, pad, 0)),
        labels,
        mine(positions),
        AttentionMetadata.from_seqlens(pieces, device=device),
        batch.num_tokens if rank == 0 else 0,
        int((labels != IGNORE_INDEX).sum()),
        kv_cache=ContextShard(layout),
    )


__all__ = ["ContextShard", "ParallelPlan", "plan_parallelism", "shard_batch"]
