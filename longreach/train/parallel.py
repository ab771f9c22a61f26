"""Parallelism applied from outside the model, torchtitan style: the model files never import
torch.distributed.

- `apply_activation_checkpointing(model)`: per decoder block, with the composable
  `torch.distributed._composable.checkpoint` (non-reentrant), which keeps Hugging Face parameter names
  (no `_checkpoint_wrapped_module.` prefix), so checkpoints load anywhere unchanged.
- `apply_fsdp(model, mesh)`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder block, then on
  the root (embeddings, final norm, LM head), with a `MixedPrecisionPolicy` (bf16 params, fp32 gradient
  reduction). Parameters become DTensors sharded on dim 0; the optimizer steps on the local shards.
- `save_sharded` / `load_sharded`: model + optimizer through torch.distributed.checkpoint (each rank
  writes its shards; a different world size can load them). `full_model_state` gathers one
  unsharded state dict for export as a Hugging Face directory.

Launch: `torchrun --nproc-per-node N -m longreach train ...` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import atexit
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def from_env() -> "DistInfo":
        return DistInfo(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )


def pick_device(info: DistInfo, device: str | None = None) -> torch.device:
    """The requested device, else this rank's GPU when CUDA is there, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def init_distributed(info: DistInfo, device: torch.device):
    """Join the process group (nccl on GPU, gloo on CPU) and return a 1-D device mesh, or None alone."""
    if not info.is_distributed:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device)
    join_process_group("nccl" if device.type == "cuda" else "gloo")
    return init_device_mesh(device.type, (info.world_size,))


def join_process_group(backend: str) -> None:
    """Initialise the default process group from torchrun's environment, once, and destroy it at exit.

    A group left alive at interpreter exit can abort the process (gloo's worker threads die with
    "terminate called without an active exception"): the atexit hook tears it down while Python is whole.
    """
    if not dist.is_initialized():
        dist.init_process_group(backend)
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: not a Llama-family model")
    return list(layers)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder block's activations in backward: memory per block drops to its input."""
    from torch.distributed._composable import checkpoint

    for block in decoder_blocks(model):
        checkpoint(block)
    return model


def apply_fsdp(
    model: nn.Module,
    mesh,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` with FSDP2 over `mesh`: each block is one all-gather unit, the root holds the rest.

    param_dtype: the dtype compute runs in (None keeps fp32); sharded master weights stay in their dtype.
    reshard_after_forward: for the blocks; the root always stays gathered from forward to backward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward and i < len(blocks) - 1,
        )
    # the root (embeddings, norm, LM head) stays gathered after forward, as FSDP2 defaults for roots: the
    # chunked loss reads lm_head.weight after the forward, and backward needs it first anyway
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model


def save_sharded(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank writes its shards of model and optimizer state to `directory`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory))


def load_sharded(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: read shards written by `save_sharded` (at any world size) into model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not Path(directory).is_dir():
        raise FileNotFoundError(f"sharded checkpoint {str(directory)!r} does not exist")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with (
        warnings.catch_warnings()
    ):  # one process reading shards is intended: no "assuming single process" noise
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded state dict on CPU (filled on rank 0, empty on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (a no-op alone); fp64 so token counts stay exact."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
