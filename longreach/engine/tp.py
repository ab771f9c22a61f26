"""Tensor parallelism for serving, applied from outside the model (Megatron-LM's layout, gpt-fast's style).

Each of `world_size` processes keeps 1/world_size of every attention and MLP block:
- column-parallel (output features split): q_proj, k_proj, v_proj by whole heads, gate_proj and up_proj;
- row-parallel (input features split): o_proj and down_proj, whose partial outputs are summed with one
  all-reduce per block (the bias, if any, is added once, after the sum).
Embeddings, norms and the LM head stay replicated, so every rank ends a step with the same logits.
The attention modules are told their local head counts, so each rank's paged KV cache holds only its
own KV heads: the cache is split across ranks too.

Every rank runs the same engine loop on the same requests (SPMD). To keep the ranks' schedulers in
lock-step they agree on the KV block count (the minimum) and take rank 0's sampled tokens each step.

Launch with `torchrun --nproc-per-node N script.py` and pass `tensor_parallel_size=N` to `LLM`; on CPU
the gloo backend is used, on GPUs NCCL with one device per rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from longreach.train.parallel import join_process_group


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: the local slice of a linear layer split along its inputs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


def ensure_initialized(world_size: int) -> tuple[int, int]:
    """(rank, world_size) of the default process group, initialising it from torchrun's environment."""
    if not dist.is_available():
        raise RuntimeError("tensor parallelism needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                f"tensor_parallel_size={world_size} needs {world_size} processes: launch with "
                f"`torchrun --nproc-per-node {world_size} ...` or call "
                "torch.distributed.init_process_group first"
            )

        join_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_world_size() != world_size:
        raise ValueError(
            f"tensor_parallel_size={world_size} but the process group has {dist.get_world_size()} processes"
        )
    return dist.get_rank(), world_size


def _split_rows(linear: nn.Linear, rank: int, world_size: int) -> None:
    """Column parallel: keep this rank's block of output features (rows of the weight)."""
    size = linear.out_features // world_size
    rows = slice(rank * size, (rank + 1) * size)
    linear.weight = nn.Parameter(linear.weight.data[rows].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rows].clone(), requires_grad=False)
    linear.out_features = size


def _split_cols(linear: nn.Linear, rank: int, world_size: int) -> RowParallelLinear:
    size = linear.in_features // world_size
    weight = linear.weight.data[:, rank * size : (rank + 1) * size].clone()
    return RowParallelLinear(weight, None if linear.bias is None else linear.bias.data.clone())


def shard_model(model: nn.Module, world_size: int) -> nn.Module:
    """Shard a LlamaForCausalLM in place for this rank; the process group must span `world_size` ranks."""
    rank, world_size = ensure_initialized(world_size)
    cfg = model.config
    for name, value in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("intermediate_size", cfg.intermediate_size),
    ):
        if value % world_size:
            raise ValueError(f"{name}={value} is not divisible by tensor_parallel_size={world_size}")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _split_rows(proj, rank, world_size)
        attn.o_proj = _split_cols(attn.o_proj, rank, world_size)
        mlp.down_proj = _split_cols(mlp.down_proj, rank, world_size)
        attn.num_heads //= world_size
        attn.num_kv_heads //= world_size
    return model


class TensorParallel:
    """The engine's hooks that keep the ranks in lock-step (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.world_size = dist.get_world_size()

    def agree_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def sync_tokens(self, token_ids: list[int]) -> list[int]:
        if not token_ids:  # a step of prefill chunks only: the same on every rank, nothing to send
            return token_ids
        t = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()
