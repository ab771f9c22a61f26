"""Hugging Face checkpoint files: config.json and safetensors (single or sharded), read without unpickling
and written atomically (a temporary directory renamed into place, so a crash never leaves a partial
checkpoint). `loader.py` builds models from these; `quant.py` writes and reads quantized ones with them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longreach.model.llama import LlamaForCausalLM

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not a Hugging Face checkpoint directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files holding this checkpoint's weights, each checked to exist."""
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"checkpoint {str(path)!r} is missing shard(s) {missing} listed in {INDEX_FILE}"
            )
        return [path / n for n in names]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(
            f"{str(path)!r} holds only pickled weights (.bin/.pt); longreach loads safetensors only "
            "(convert with transformers: save_pretrained(..., safe_serialization=True))"
        )
    raise FileNotFoundError(f"{str(path)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def load_state_dict(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    state = {}
    for file in _weight_files(Path(path)):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def assign_checked(model: LlamaForCausalLM, state: dict[str, torch.Tensor], where: str) -> None:
    """Assign `state` to a meta-device model after checking names and shapes; errors name the tensor."""
    cfg = model.config
    expected = {
        name: p
        for name, p in model.state_dict().items()
        if not (cfg.tie_word_embeddings and name == "lm_head.weight")
    }
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{where} lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(
            f"{where} has tensor(s) this {cfg.model_type} config does not use: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} in the {where}, "
                f"but the config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()


def _plain_modes(directory: Path) -> None:
    """Give a finished scratch directory and its files the modes a plain mkdir / open would (the umask's):
    mkdtemp makes the directory 0700 and safetensors writes its files 0600, which would leave a saved
    checkpoint readable by its writer alone (not by a server account or a colleague)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def _publish(tmp: Path, path: Path) -> None:
    """The finished scratch directory takes `path`'s place (a previous checkpoint there is replaced)."""
    _plain_modes(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def save_model(
    model: LlamaForCausalLM,
    path: str | os.PathLike,
    max_shard_bytes: int = 5 * 1024**3,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a Hugging Face directory (config.json + safetensors, sharded past max_shard_bytes), atomically.

    extra_files: name -> text of further files (e.g. tokenizer_config.json) written alongside.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        cfg = model.config
        state = {
            name: t.detach().contiguous().cpu()
            for name, t in model.state_dict().items()
            if not (cfg.tie_word_embeddings and name == "lm_head.weight")
        }
        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_bytes = 0
        for name, tensor in state.items():
            size = tensor.numel() * tensor.element_size()
            if shards[-1] and shard_bytes + size > max_shard_bytes:
                shards.append({})
                shard_bytes = 0
            shards[-1][name] = tensor
            shard_bytes += size
        hf = cfg.to_hf_dict()
        hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({key: name for key in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_FILE).write_text(
                json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True
                )
                + "\n"
            )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
