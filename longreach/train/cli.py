"""`longreach train`: train or continue pretraining from a TOML config plus command-line overrides.

    longreach train --config recipes/demo.toml --set optimizer.lr=1e-4 --max-steps 200
    torchrun --nproc-per-node 2 -m longreach train --config recipes/demo.toml      # FSDP2 over 2 ranks
    torchrun --nproc-per-node 4 -m longreach train --config recipes/demo.toml --context-parallel 2
                                                    # 2 (data) x 2 (context): each sequence on 2 ranks

Every flag below is a shortcut for one `--set section.key=value`; `--set` reaches any key
(see longreach/train/config.py for the sections). Flags win over the file.
"""

from __future__ import annotations

import argparse
import sys

# flag dest -> config key
SHORTCUTS = {
    "model": "model.path",
    "data": "data.paths",
    "eval_data": "data.eval_paths",
    "tokenizer": "data.tokenizer",
    "seq_len": "data.seq_len",
    "packing": "data.packing",
    "max_steps": "schedule.max_steps",
    "warmup_steps": "schedule.warmup_steps",
    "lr": "optimizer.lr",
    "batch_size": "training.batch_size",
    "micro_batch_size": "training.micro_batch_size",
    "dtype": "training.dtype",
    "activation_checkpointing": "training.activation_checkpointing",
    "device": "training.device",
    "eval_every": "training.eval_every",
    "output": "checkpoint.output_dir",
    "save_every": "checkpoint.save_every",
    "resume": "checkpoint.resume",
    "context_parallel": "parallel.context",
}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The data / schedule / output flags shared by `train` and `extend`."""
    parser.add_argument(
        "--config",
        help="TOML file with [model] [data] [optimizer] [schedule] [training] [checkpoint] sections",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config key (value parsed as TOML), e.g. --set optimizer.lr=1e-4",
    )
    parser.add_argument("--data", nargs="+", help="text/JSONL files or directories")
    parser.add_argument("--eval-data", nargs="+", help="held-out text/JSONL for the periodic eval loss")
    parser.add_argument("--tokenizer", help="'byte' or a tokenizer directory (default: the model's)")
    parser.add_argument("--seq-len", type=int, help="tokens per training sequence")
    parser.add_argument(
        "--no-packing",
        dest="packing",
        action="store_const",
        const=False,
        help="one document per sequence, padded (for comparison; packing is the default)",
    )
    parser.add_argument("--max-steps", type=int, help="optimizer steps")
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, help="sequences per optimizer step, all ranks together")
    parser.add_argument("--micro-batch-size", type=int, help="sequences per forward pass per rank")
    parser.add_argument("--dtype", choices=["bf16", "fp32"])
    parser.add_argument(
        "--activation-checkpointing",
        action="store_const",
        const=True,
        help="recompute each block's activations in backward",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: this rank's GPU, else cpu)")
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--output", help="output directory (checkpoints, metrics.jsonl, final/)")
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        help="continue from the latest checkpoint in --output, or from the given one",
    )
    parser.add_argument(
        "--context-parallel",
        type=int,
        metavar="N",
        help="shard each sequence over N ranks (ring attention); the world size must be a multiple of N",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face checkpoint directory to start from")
    add_common_arguments(parser)


def collect_overrides(args: argparse.Namespace) -> list[str]:
    """--set items first, then the shortcut flags (so flags win), as TOML-literal overrides."""
    import json

    overrides = list(args.overrides)
    for dest, key in SHORTCUTS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (str, list)):
            value = json.dumps(value)  # a JSON string / list of strings is also a TOML literal
        overrides.append(f"{key}={value}")
    if getattr(args, "no_progress", False):
        overrides.append("training.progress=false")
    return overrides


def run_training(cfg) -> int:
    from longreach.train.trainer import Trainer  # lazy: CLI verb, keeps --help fast

    trainer = Trainer(cfg)
    records = trainer.train()
    if trainer.info.is_main:
        last = records[-1] if records else None
        summary = f"loss {last['loss']:.4f}, " if last else ""
        print(
            f"done: step {trainer.step}, {summary}{trainer.tokens_seen:,} tokens; "
            f"weights in {cfg.checkpoint.output_dir}/final"
        )
    return 0


def main(args: argparse.Namespace) -> int:
    from longreach.train.config import TrainConfig  # lazy: CLI verb, keeps --help fast

    try:
        if getattr(args, "model", None):  # a .gguf or Hub id: a directory with safetensors weights
            from longreach.model.gguf_convert import trainable_checkpoint  # lazy: CLI verb, keeps --help fast

            args.model = str(trainable_checkpoint(args.model))
        cfg = TrainConfig.from_toml(args.config, collect_overrides(args))
        return run_training(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"longreach train: error: {exc}", file=sys.stderr)
        return 2
