"""`longreach extend`: the context-extension recipe — rewrite the rope config, continue pretraining.

    longreach extend --model llama-4k --rope yarn --factor 8 --seq-len 32768 --data books/ --output llama-32k

How production long-context models are made (Position Interpolation, Chen et al. 2023; YaRN, Peng et al.
2023, arXiv 2309.00071): keep the weights, stretch RoPE by `factor` relative to the pretraining length, and
train briefly on long documents. The rope dict is Hugging Face's (`rope_parameters` / `rope_scaling`), so
the result loads in transformers as well:

- `original_max_position_embeddings` is kept: the checkpoint's own value if it was already scaled, else
  its `max_position_embeddings`; `factor` is always relative to it.
- yarn / llama3 / longrope / linear / ntk: `max_position_embeddings = factor * original`. dynamic keeps
  `max_position_embeddings` (dynamic NTK reads it as the original length and scales past it on the fly).
- llama3 defaults to Llama 3.1's low/high frequency factors (1, 4); longrope defaults to uniform factors
  (short 1.0, long `factor`, i.e. interpolation beyond the original length) — pass searched factors with
  --rope-params. Extra keys (beta_fast, mscale, ...) go through --rope-params as JSON.

Training defaults follow YaRN's: AdamW lr 2e-5, betas (0.9, 0.95), no weight decay, 20 warmup steps then
a constant rate, 400 steps of 64 sequences. `--max-steps 0` only rewrites the config (extension
without training). The new checkpoint is `OUTPUT/final`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from longreach.model.loader import read_config
from longreach.rope import rope_config_from_hf
from longreach.train.cli import add_common_arguments, collect_overrides, run_training
from longreach.train.config import TrainConfig, apply_overrides

ROPE_TYPES = ("linear", "dynamic", "ntk", "yarn", "llama3", "longrope")
RECIPE_DEFAULTS: dict[str, Any] = {
    "optimizer": {"lr": 2e-5, "betas": [0.9, 0.95], "weight_decay": 0.0, "grad_clip": 1.0},
    "schedule": {"max_steps": 400, "decay": "constant"},  # warmup: 20 steps, at most 5% of the run
    "training": {"batch_size": 64, "micro_batch_size": 1, "dtype": "bf16", "activation_checkpointing": True},
}


def extended_rope(
    hf_config: dict[str, Any], rope_type: str, factor: float, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """config.json overrides (`rope_parameters`, `max_position_embeddings`) stretching RoPE by `factor`."""

    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unknown rope type {rope_type!r}; choose one of {list(ROPE_TYPES)}")
    if not isinstance(factor, (int, float)) or factor <= 1:
        raise ValueError(f"factor={factor!r} must be > 1 (the new context length / the original one)")
    current = rope_config_from_hf(hf_config)
    original = current.original_max_position_embeddings
    half = current.rotary_dim // 2
    rope: dict[str, Any] = {"rope_type": rope_type, "rope_theta": current.theta, "factor": float(factor)}
    if rope_type in ("yarn", "llama3", "longrope"):
        rope["original_max_position_embeddings"] = original
    if rope_type == "llama3":
        rope.update(low_freq_factor=1.0, high_freq_factor=4.0)
    if rope_type == "longrope":
        rope.update(short_factor=[1.0] * half, long_factor=[float(factor)] * half)
    if current.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = current.partial_rotary_factor
    rope.update(params or {})
    max_positions = original if rope_type == "dynamic" else int(round(factor * original))
    return {"rope_parameters": rope, "max_position_embeddings": max_positions}


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def _rewrite(args: argparse.Namespace) -> dict[str, Any]:

    try:
        params = json.loads(args.rope_params) if args.rope_params else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--rope-params is not JSON: {exc}") from exc
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"--rope-params must be a JSON object, got {args.rope_params!r}")
    return extended_rope(read_config(args.model), args.rope, args.factor, params)


def _default_output(args: argparse.Namespace) -> str:
    return args.output or f"runs/extend-{args.rope}-{args.factor:g}x"


def extend_config(args: argparse.Namespace) -> TrainConfig:
    """Recipe defaults < --config file < --set < flags; the rope rewrite always applies."""
    rewrite = _rewrite(args)
    d = RECIPE_DEFAULTS
    if args.config:
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"config file {args.config!r} does not exist")
        d = _deep_merge(d, tomllib.loads(Path(args.config).read_text()))
    d = apply_overrides(d, collect_overrides(args))
    schedule = d.setdefault("schedule", {})
    schedule.setdefault("warmup_steps", min(20, schedule.get("max_steps", 400) // 20))
    model = d.setdefault("model", {})
    model.pop("config", None)
    model.update(path=str(args.model), overrides={**model.get("overrides", {}), **rewrite})
    data = d.setdefault("data", {})
    data.setdefault("seq_len", rewrite["max_position_embeddings"])
    if data["seq_len"] > rewrite["max_position_embeddings"]:
        raise ValueError(
            f"--seq-len {data['seq_len']} exceeds the extended context "
            f"max_position_embeddings={rewrite['max_position_embeddings']} (factor {args.factor:g})"
        )
    d.setdefault("checkpoint", {}).setdefault("output_dir", _default_output(args))
    return TrainConfig.from_dict(d)


def rewrite_only(args: argparse.Namespace) -> Path:
    """--max-steps 0: the checkpoint with its new rope config and unchanged weights (stored dtype kept)."""
    from longreach.model.loader import resolve_dtype, save_model  # lazy: CLI verb, keeps --help fast
    from longreach.train.config import ModelSource  # lazy: CLI verb, keeps --help fast
    from longreach.train.parallel import DistInfo  # lazy: CLI verb, keeps --help fast
    from longreach.train.trainer import (  # lazy: CLI verb, keeps --help fast
        build_training_model,
        resolve_tokenizer,
    )

    out = Path(_default_output(args)) / "final"
    if not DistInfo.from_env().is_main:  # under torchrun, one writer is enough
        return out
    model = build_training_model(ModelSource(path=str(args.model), overrides=_rewrite(args)), "cpu")
    stored = model.config.hf_config.get("torch_dtype") or model.config.hf_config.get("dtype")
    if stored in ("float16", "bfloat16"):
        model = model.to(resolve_dtype(stored))
    save_model(model, out)
    try:
        resolve_tokenizer(args.tokenizer, str(args.model)).save_pretrained(out)
    except ValueError:
        pass  # a checkpoint without a tokenizer stays without one
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory to extend")
    parser.add_argument("--rope", required=True, choices=ROPE_TYPES, help="rope scaling to switch to")
    parser.add_argument("--factor", required=True, type=float, help="new context / original context, e.g. 8")
    parser.add_argument("--rope-params", help="extra rope keys as JSON, e.g. '{\"beta_fast\": 32}'")
    add_common_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from longreach.model.gguf_convert import trainable_checkpoint  # lazy: CLI verb, keeps --help fast

    try:
        args.model = str(trainable_checkpoint(args.model))  # a .gguf or Hub id: a directory with weights
        if args.max_steps == 0:
            print(f"rope rewritten, weights unchanged: {rewrite_only(args)}")
            return 0
        if not args.data and not args.config:
            raise ValueError(
                "--data is required to continue pretraining (or --max-steps 0 to only rewrite the rope)"
            )
        return run_training(extend_config(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"longreach extend: error: {exc}", file=sys.stderr)
        return 2
