"""Training configuration: one small frozen dataclass per concern, read from TOML.

Sections follow torchtitan's job config ([model], [data], [optimizer], [schedule], [training],
[checkpoint]); each component receives only its own section. `TrainConfig.from_toml(path, overrides)`
reads a file and applies `section.key=value` overrides (values parsed as TOML literals), so
`longreach train --config run.toml --set optimizer.lr=1e-4` needs no per-key flag.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("bf16", "fp32")
DECAYS = ("cosine", "linear", "constant")


def _positive_int(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{owner}.{name}={value!r} must be a positive integer{' or absent' if allow_none else ''}"
        )


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a Hugging Face checkpoint `path`, or an inline config.json dict
    (`config`) for a model trained from scratch. `overrides` replaces config.json keys before the model
    is built (context extension rewrites `rope_parameters` and `max_position_embeddings` this way)."""

    path: str | None = None
    config: dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0

    def __post_init__(self):
        if (self.path is None) == (self.config is None):
            raise ValueError(
                f"[model] needs exactly one of path (a checkpoint directory) or config (an inline "
                f"config.json table); got path={self.path!r}, config={'set' if self.config else None}"
            )
        if self.path is not None and not Path(self.path).is_dir():
            raise ValueError(
                f"model.path={self.path!r} is not a directory (expected a Hugging Face checkpoint)"
            )


@dataclass(frozen=True)
class DataConfig:
    """Text (.txt/.md: one document per file) and JSONL (one document per line, `text_field`) files or
    directories, tokenized as they are read and cut into `seq_len`-token sequences."""

    paths: tuple[str, ...] = ()
    seq_len: int = 2048
    packing: bool = True  # False: one document chunk per sequence, padded to seq_len
    text_field: str = "text"
    tokenizer: str | None = None  # "byte", or a directory; None: the model directory's, else "byte"
    shuffle: bool = True  # shuffle the file order each epoch (seeded); a file's documents keep their order
    seed: int = 0
    add_bos: bool = True  # when the tokenizer has a bos token
    add_eos: bool = True  # when the tokenizer has an eos token
    eval_paths: tuple[str, ...] = ()
    eval_sequences: int = 8

    def __post_init__(self):
        object.__setattr__(self, "paths", tuple(str(p) for p in _as_list("data.paths", self.paths)))
        object.__setattr__(
            self, "eval_paths", tuple(str(p) for p in _as_list("data.eval_paths", self.eval_paths))
        )
        if not self.paths:
            raise ValueError("data.paths is empty: give at least one text/JSONL file or directory")
        for p in self.paths + self.eval_paths:
            if not Path(p).exists():
                raise ValueError(f"data path {p!r} does not exist")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(
                f"data.seq_len={self.seq_len!r} must be an integer >= 2 (a token and its target)"
            )
        _positive_int("data", "eval_sequences", self.eval_sequences)
        if not self.text_field:
            raise ValueError(
                "data.text_field must name the JSONL field holding the text, got an empty string"
            )


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW. Weight decay applies to matrices only (not norms or biases), as in GPT-2/nanoGPT."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm; None disables clipping

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optimizer.lr={self.lr!r} must be a positive number")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas={self.betas!r} must be two numbers in [0, 1)")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"optimizer.eps={self.eps!r} must be > 0 and weight_decay={self.weight_decay!r} >= 0"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(
                f"optimizer.grad_clip={self.grad_clip!r} must be > 0 (or absent to disable clipping)"
            )


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup for `warmup_steps`, then `decay` to lr * min_lr_ratio at `max_steps` (torchtitan's shape)."""

    max_steps: int = 100
    warmup_steps: int = 0
    decay: str = "cosine"
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        _positive_int("schedule", "max_steps", self.max_steps)
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(
                f"schedule.warmup_steps={self.warmup_steps!r} must be in [0, max_steps={self.max_steps}]"
            )
        if self.decay not in DECAYS:
            raise ValueError(f"schedule.decay={self.decay!r}; choose one of {list(DECAYS)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")


@dataclass(frozen=True)
class LoopConfig:
    """The step: `batch_size` sequences per optimizer step across all ranks, `micro_batch_size` per
    forward pass per rank; accumulation steps follow (batch_size / (micro_batch_size * world_size))."""

    batch_size: int = 8
    micro_batch_size: int = 1
    dtype: str = "bf16"  # bf16: autocast (one process) or FSDP2 param_dtype; master weights stay fp32
    activation_checkpointing: bool = False
    device: str | None = None  # None: cuda when available (LOCAL_RANK's device), else cpu
    log_every: int = 1
    eval_every: int | None = None
    progress: bool = True
    # tokens per chunk of the chunked cross-entropy (train/loss.py); 0 or None: the full (T, V) logits
    loss_chunk_size: int | None = 1024

    def __post_init__(self):
        _positive_int("training", "batch_size", self.batch_size)
        if self.loss_chunk_size != 0:
            _positive_int("training", "loss_chunk_size", self.loss_chunk_size, allow_none=True)
        _positive_int("training", "micro_batch_size", self.micro_batch_size)
        _positive_int("training", "log_every", self.log_every)
        _positive_int("training", "eval_every", self.eval_every, allow_none=True)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"training.batch_size={self.batch_size} must be a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"training.dtype={self.dtype!r}; choose one of {list(DTYPES)}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints `output_dir/step-NNNNNNN/` (a Hugging Face directory plus training state), written
    atomically; `output_dir/final/` at the end. `resume`: False, True (the latest in output_dir) or a path."""

    output_dir: str = "runs/train"
    save_every: int | None = None
    keep_last: int | None = 2
    resume: bool | str = False

    def __post_init__(self):
        _positive_int("checkpoint", "save_every", self.save_every, allow_none=True)
        _positive_int("checkpoint", "keep_last", self.keep_last, allow_none=True)
        if isinstance(self.resume, str) and not Path(self.resume).is_dir():
            raise ValueError(f"checkpoint.resume={self.resume!r} is not a checkpoint directory")


@dataclass(frozen=True)
class ParallelConfig:
    """`context`: ranks that share one sequence (context parallelism, ring attention); the remaining
    factor of the world size is data parallelism. FSDP2 shards the parameters over all ranks."""

    context: int = 1

    def __post_init__(self):
        _positive_int("parallel", "context", self.context)


_SECTIONS = {
    "model": ModelSource,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "training": LoopConfig,
    "checkpoint": CheckpointConfig,
    "parallel": ParallelConfig,
}


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSource
    data: DataConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    training: LoopConfig = LoopConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    parallel: ParallelConfig = ParallelConfig()

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "TrainConfig":
        unknown = sorted(set(d) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; sections: {list(_SECTIONS)}")
        for required in ("model", "data"):
            if required not in d:
                raise ValueError(f"the config has no [{required}] section")
        return TrainConfig(**{name: _build(cls, name, d.get(name, {})) for name, cls in _SECTIONS.items()})

    @staticmethod
    def from_toml(path: str | Path | None, overrides: list[str] = ()) -> "TrainConfig":
        """Read a TOML file (or start empty with path=None) and apply `section.key=value` overrides."""
        d: dict[str, Any] = {}
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"config file {str(path)!r} does not exist")
            try:
                d = tomllib.loads(Path(path).read_text())
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path} is not valid TOML: {exc}") from exc
        return TrainConfig.from_dict(apply_overrides(d, overrides))

    def replace(self, **sections: dict[str, Any]) -> "TrainConfig":
        """A copy with fields of the named sections replaced, e.g. replace(schedule={"max_steps": 5})."""
        return TrainConfig(
            **{name: dataclasses.replace(getattr(self, name), **sections.get(name, {})) for name in _SECTIONS}
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, name: str, values: Any):
    if not isinstance(values, dict):
        raise ValueError(f"[{name}] must be a table, got {values!r}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{name}]; allowed: {allowed}")
    return cls(**values)


def _as_list(name: str, value: Any) -> list:
    if isinstance(value, (str, Path)):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}={value!r} must be a path or a list of paths")
    return list(value)


def parse_value(text: str) -> Any:
    """A TOML literal (1e-4, true, [1, 2], "x", {a = 1}) or, failing that, the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` (or deeper, `model.overrides.max_position_embeddings=8192`) into a nested dict."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. optimizer.lr=1e-4)")
        node = d
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = parse_value(text.strip())
    return d
