"""Train the bundled demo model from scratch (`recipes/demo.toml`) and extend it (YaRN + continued pretraining).

Both steps write their corpus first (seeded, longreach/demo/corpus.py), then run the ordinary trainer
and `longreach extend`: nothing here is special to the demo but the data and the recipe.
"""

from __future__ import annotations

from pathlib import Path

import torch

from longreach.cli import main as cli
from longreach.demo.corpus import write_corpus
from longreach.model.loader import load_model, save_model
from longreach.model.tokenizer import load_tokenizer
from longreach.train.config import TrainConfig
from longreach.train.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.toml"
BASE_SEQ_LEN = 512
EXTEND_SEQ_LEN = 4096  # continued pretraining of the YaRN x8 model at its full new length (8x)


def corpus_for(
    run_dir: Path, seq_len: int, num_docs: int, seed: int, mix: str = "base", min_bytes: int = 64
) -> Path:
    """A corpus whose documents fit in seq_len tokens (byte tokenizer: one token per byte, plus bos/eos)."""
    path = Path(run_dir) / f"corpus-{mix}-{seq_len}.jsonl"
    if not path.is_file():
        write_corpus(path, num_docs=num_docs, seed=seed, max_bytes=seq_len - 8, mix=mix, min_bytes=min_bytes)
    return path


def export_bf16(src: str | Path, dst: str | Path) -> Path:
    """Re-save a checkpoint in bf16 with its tokenizer: the form the package ships (half the bytes)."""

    model = load_model(src, dtype=torch.bfloat16)
    out = save_model(model, dst)
    load_tokenizer(src).save_pretrained(out)
    return out


def train_base(
    run_dir: str | Path = "runs/demo",
    max_steps: int | None = None,
    num_docs: int = 200_000,
    overrides: list[str] = (),
) -> Path:
    """Train the base model at 512 tokens; returns the exported (fp32) Hugging Face directory."""

    run_dir = Path(run_dir)
    corpus = corpus_for(run_dir, BASE_SEQ_LEN, num_docs, seed=0)
    extra = [f'data.paths=["{corpus}"]', f'checkpoint.output_dir="{run_dir / "base"}"']
    if max_steps is not None:
        extra += [f"schedule.max_steps={max_steps}", f"schedule.warmup_steps={min(150, max_steps // 10)}"]
    Trainer(TrainConfig.from_toml(RECIPE, extra + list(overrides))).train()
    return run_dir / "base" / "final"


def _retrieval_phase(model: str | Path, out: Path, corpus: Path, max_steps: int, lr: float) -> Path:

    cfg = TrainConfig.from_dict(
        {
            "model": {"path": str(model)},
            "data": {"paths": [str(corpus)], "seq_len": BASE_SEQ_LEN, "tokenizer": "byte", "add_bos": False},
            "optimizer": {"lr": lr, "weight_decay": 0.1},
            "schedule": {"max_steps": max_steps, "warmup_steps": min(10, max_steps), "decay": "constant"},
            "training": {"batch_size": 16, "micro_batch_size": 16, "dtype": "fp32", "log_every": 10},
            "checkpoint": {"output_dir": str(out), "save_every": 50, "keep_last": 40},
        }
    )
    Trainer(cfg).train()
    return out / "final"


def train_retrieval(
    base: str | Path,
    run_dir: str | Path = "runs/demo",
    max_steps: int = 450,
    prompt_steps: int = 150,
    num_docs: int = 60_000,
    lr: float = 1e-3,
    prompt_lr: float = 5e-4,
    min_bytes: int = 80,
    max_bytes: int = 320,
) -> Path:
    """Stage 2: continue the base model on passkey documents only, fp32, batch 16 x 512, constant rates.

    The base run learns the text but can stop part-way into forming the copy ("induction") circuit.
    Phase 1 (`max_steps`, lr 1e-3) finishes it on short documents (min-max bytes: many answers per
    512-token sequence); measured on CPU, answer-digit loss 1.58 -> 0.60 nats at step 200 -> 0.01 at 450.
    Phase 2 (`prompt_steps`, lr 5e-4) spreads it over the whole 512 positions and teaches the evaluation
    prompt's layout (instruction line, needle on its own line): documents of 100-512 bytes, half of them
    laid out as `longreach eval passkey` asks; measured, `eval passkey` at 512 tokens goes 15% -> 95% at
    step 50 -> 100% at 100. max_steps=0 skips phase 1 (base is then a phase-1 result).
    Constant rates: stopping at any saved step equals a run with that many steps."""
    run_dir = Path(run_dir)
    model = Path(base)
    if max_steps:
        corpus = run_dir / f"corpus-passkey-{min_bytes}-{max_bytes}.jsonl"
        if not corpus.is_file():
            write_corpus(
                corpus, num_docs=num_docs, seed=11, max_bytes=max_bytes, mix="passkey", min_bytes=min_bytes
            )
        model = _retrieval_phase(model, run_dir / "retrieval", corpus, max_steps, lr)
    if not prompt_steps:
        return model
    corpus = run_dir / f"corpus-passkey-prompt-{BASE_SEQ_LEN}.jsonl"
    if not corpus.is_file():
        write_corpus(
            corpus,
            num_docs=num_docs // 2,
            seed=12,
            max_bytes=BASE_SEQ_LEN,
            mix="passkey-prompt",
            min_bytes=100,
        )
    return _retrieval_phase(model, run_dir / "retrieval-prompt", corpus, prompt_steps, prompt_lr)


def extend_base(
    base: str | Path,
    run_dir: str | Path = "runs/demo",
    factor: float = 8.0,
    seq_len: int = EXTEND_SEQ_LEN,
    max_steps: int = 200,
    num_docs: int = 40_000,
    lr: float = 5e-4,
    batch_size: int = 32,
    mix: str = "base",
    dtype: str = "bf16",
    overrides: list[str] = (),
) -> Path:
    """YaRN x factor on the base model, then continued pretraining at seq_len through `longreach extend`."""

    run_dir = Path(run_dir)
    corpus = corpus_for(run_dir, seq_len, num_docs, seed=1, mix=mix, min_bytes=100)
    out = run_dir / f"yarn-{factor:g}x"
    argv = [
        "extend",
        "--model",
        str(base),
        "--rope",
        "yarn",
        "--factor",
        f"{factor:g}",
        "--seq-len",
        str(seq_len),
        "--data",
        str(corpus),
        "--max-steps",
        str(max_steps),
        "--lr",
        str(lr),
        "--batch-size",
        str(batch_size),
        "--micro-batch-size",
        str(batch_size),
        "--dtype",
        dtype,
        "--output",
        str(out),
        "--tokenizer",
        "byte",
        "--set",
        "training.activation_checkpointing=false",
        "--set",
        "training.log_every=10",
        "--set",
        "data.add_bos=false",
    ]
    for item in overrides:
        argv += ["--set", item]
    if cli(argv) != 0:
        raise RuntimeError(f"longreach extend failed: {' '.join(argv)}")
    return out / "final"
