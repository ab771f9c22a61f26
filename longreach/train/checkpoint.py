"""Training checkpoints: a Hugging Face directory plus the state that makes resuming exact.

`output_dir/step-0000100/` holds config.json + model.safetensors (fp32 master weights, loadable by
`load_model`, `longreach generate` and transformers as is), the tokenizer files, and
`trainer_state.json` (step, tokens seen, LR-scheduler state, data cursor, config). The optimizer state is
`optimizer.safetensors` for one process (nothing pickled) or, under FSDP2, `sharded/`: model and
optimizer shards written by torch.distributed.checkpoint (torchtitan's format; any world size reads it).
Everything is written to `.step-0000100.tmp/` and renamed into place, then `latest` is replaced
atomically, so a run killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from longreach.model.llama import LlamaForCausalLM
from longreach.model.loader import load_state_dict, save_model
from longreach.train import parallel
from longreach.train.parallel import DistInfo

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
SHARDED_DIR = "sharded"
LATEST_FILE = "latest"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_hf(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Collective under FSDP: write the (gathered) model as one Hugging Face directory, on rank 0."""
    state = parallel.full_model_state(model)
    path = Path(path)
    if DistInfo.from_env().is_main:
        with torch.device("meta"):
            plain = LlamaForCausalLM(model.config)
        plain.load_state_dict(state, strict=False, assign=True)
        plain.tie_weights()
        save_model(plain, path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    parallel.barrier()
    return path


def _optimizer_to_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW state keyed by parameter name ("name::exp_avg"), plus the JSON-able param groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    index_names = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index_names[index]}::{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index_names[index]}::{key}"] = value
    groups = [{**g, "params": [index_names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_tensors(model, optimizer, tensors: dict, meta: dict) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    index_of = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, _, field = key.rpartition("::")
        if name not in index_of:
            raise ValueError(f"optimizer state names parameter {name!r}, which this model does not have")
        state.setdefault(index_of[name], {})[field] = value
    groups = [{**g, "params": [index_of[n] for n in g["params"]]} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    tokenizer=None,
    keep_last: int | None = None,
) -> Path:
    """Collective under FSDP. Writes output_dir/step-NNNNNNN atomically and points `latest` at it."""
    info = DistInfo.from_env()
    output_dir = Path(output_dir)
    final = output_dir / step_dir_name(step)
    tmp = output_dir / f".{final.name}.tmp"
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
    parallel.barrier()
    export_hf(model, tmp, tokenizer)  # creates tmp (HF layout at the top)
    if info.is_distributed:
        parallel.save_sharded(tmp / SHARDED_DIR, model, optimizer)
    else:
        tensors, meta = _optimizer_to_tensors(model, optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        state = {**state, "optimizer": meta}
    parallel.barrier()
    if info.is_main:
        (tmp / STATE_FILE).write_text(
            json.dumps({**state, "step": step, "world_size": info.world_size}, indent=1) + "\n"
        )
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _write_atomic(output_dir / LATEST_FILE, final.name + "\n")
        if keep_last is not None:
            for old in sorted(output_dir.glob("step-*"))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under output_dir (the one `latest` names), or None."""
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST_FILE
    if pointer.is_file():
        candidate = output_dir / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = [d for d in sorted(output_dir.glob("step-*")) if (d / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective under FSDP. Restores model + optimizer in place; returns the trainer state dict."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a training checkpoint (no {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text())
    info = DistInfo.from_env()
    if (path / SHARDED_DIR).is_dir():
        parallel.load_sharded(path / SHARDED_DIR, model, optimizer)
    elif info.is_distributed:
        raise ValueError(
            f"{str(path)!r} was written by a single process (no {SHARDED_DIR}/): resume it with one "
            f"process, or start a new FSDP run from it with model.path"
        )
    else:
        weights = load_state_dict(path, torch.float32, next(model.parameters()).device)
        result = model.load_state_dict(weights, strict=False)
        missing = [
            k for k in result.missing_keys if not (model.config.tie_word_embeddings and k == "lm_head.weight")
        ]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"checkpoint {str(path)!r} does not match the model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        _optimizer_from_tensors(
            model, optimizer, load_file(str(path / OPTIMIZER_FILE)), state.pop("optimizer")
        )
    return state
