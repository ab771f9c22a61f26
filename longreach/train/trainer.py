"""The training loop (torchtitan's shape, on our flat varlen layout).

One optimizer step takes `batch_size` sequences from the data stream; every rank reads the same
stream and keeps every data-parallel-size-th sequence, so the data cursor is identical everywhere and needs
no coordination; with context parallelism (`parallel.context`, context_parallel.py) the ranks of a ring
share their sequences, each holding a shard of every micro-batch. Each rank runs its share as
`micro_batch_size`-sequence forward/backward passes (gradient accumulation). The loss is the token-level mean cross-entropy over the *whole* step (summed
in fp32, divided by the step's target count across ranks), so any split into micro-batches or ranks
gives the same gradient: 2 FSDP ranks reproduce one process.

bf16: one process runs under `torch.autocast` with fp32 master weights; under FSDP2 the mixed-precision
policy casts the all-gathered parameters to bf16 and reduces gradients in fp32. AdamW (decay on
matrices only), linear warmup then cosine/linear decay, global-norm clipping. Progress on a tqdm bar
(loss, tokens/s), metrics in output_dir/metrics.jsonl (and TensorBoard when installed).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longreach.config import ModelConfig
from longreach.model.llama import LlamaForCausalLM
from longreach.model.loader import init_weights, load_state_dict, read_config
from longreach.model.tokenizer import ByteTokenizer, load_tokenizer
from longreach.train import checkpoint as ckpt
from longreach.train import context_parallel, parallel
from longreach.train.config import ModelSource, ScheduleConfig, TrainConfig
from longreach.train.data import IGNORE_INDEX, Batch, SequenceStream, collate, take_samples, trim_padding
from longreach.train.loss import chunked_cross_entropy
from longreach.train.parallel import DistInfo

METRICS_FILE = "metrics.jsonl"


def model_config(source: ModelSource) -> ModelConfig:
    d = dict(read_config(source.path) if source.path is not None else source.config)
    d.update(source.overrides)
    if "rope_parameters" in source.overrides or "rope_scaling" in source.overrides:
        # an override replaces the whole rope description; stale keys of the other spelling must not merge in
        d.pop("rope_scaling" if "rope_parameters" in source.overrides else "rope_parameters", None)
    return ModelConfig.from_hf_dict(d)


def build_training_model(source: ModelSource, device: torch.device) -> LlamaForCausalLM:
    """fp32 weights (the master copy) from a checkpoint or a seeded random init."""
    cfg = model_config(source)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if source.path is None:
        model = model.to_empty(device=device)
        model.tie_weights()
        init_weights(model, seed=source.init_seed)
        return model
    state = load_state_dict(source.path, torch.float32, device)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {source.path!r} does not match its config: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.tie_weights()
    return model


def resolve_tokenizer(spec: str | None, model_path: str | None):
    """'byte' -> ByteTokenizer; a directory -> its tokenizer; None -> the model directory's (bytes from scratch)."""
    if spec == "byte" or (spec is None and model_path is None):
        return ByteTokenizer()
    try:
        return load_tokenizer(spec or model_path)
    except FileNotFoundError as exc:
        raise ValueError(
            f"no tokenizer for training: {exc}. Set data.tokenizer to 'byte' or a tokenizer directory"
        ) from exc


def lr_multiplier(step: int, sched: ScheduleConfig) -> float:
    """torchtitan's warmup ((step+1)/(warmup+1)) then decay to min_lr_ratio at max_steps."""
    if step < sched.warmup_steps:
        return (step + 1) / (sched.warmup_steps + 1)
    if sched.decay == "constant":
        return 1.0
    progress = min(1.0, (step - sched.warmup_steps) / max(1, sched.max_steps - sched.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if sched.decay == "cosine" else 1 - progress
    return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * shape


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


class MetricsLog:
    """JSON lines on rank 0 (+ TensorBoard when installed). Resuming drops records past the resumed step.

    The TensorBoard writer opens at the first record and buffers its events: `close()` (which
    `Trainer.train` calls when it ends, normally or by an exception) flushes them to disk. A record
    written after `close()` opens a new writer.
    """

    def __init__(self, output_dir: str | Path, enabled: bool):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled, self.tensorboard = enabled, None
        self._tensorboard_missing = False
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _writer(self):
        """The TensorBoard SummaryWriter (opened on first use), or None without tensorboard."""
        if self.tensorboard is None and self.enabled and not self._tensorboard_missing:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard_missing = True
                return None
            self.tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))
        return self.tensorboard

    def truncate_after(self, step: int) -> None:
        if self.enabled and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            ckpt._write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._writer()
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush and close the TensorBoard writer (if one is open)."""
        writer, self.tensorboard = self.tensorboard, None
        if writer is not None:
            writer.close()


class Trainer:
    """`Trainer(config).train()`; `tokenizer` and `model` may be given to skip loading them."""

    def __init__(self, cfg: TrainConfig, tokenizer=None, model: LlamaForCausalLM | None = None):
        self.cfg, self.info = cfg, DistInfo.from_env()
        self.device = parallel.pick_device(self.info, cfg.training.device)
        self.plan = context_parallel.plan_parallelism(self.info, self.device, cfg.parallel.context)
        self.mesh = self.plan.fsdp_mesh
        per_pass = cfg.training.micro_batch_size * self.plan.dp_size
        if cfg.training.batch_size % per_pass:
            raise ValueError(
                f"training.batch_size={cfg.training.batch_size} must be a multiple of micro_batch_size "
                f"x data-parallel ranks = {cfg.training.micro_batch_size} x {self.plan.dp_size}"
            )
        self.grad_accum = cfg.training.batch_size // per_pass
        self.tokenizer = tokenizer or resolve_tokenizer(cfg.data.tokenizer, cfg.model.path)
        self.model = model if model is not None else build_training_model(cfg.model, self.device)
        vocab = self.model.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {vocab}"
            )
        self.is_bf16 = cfg.training.dtype == "bf16"
        if cfg.training.activation_checkpointing:
            parallel.apply_activation_checkpointing(self.model)
        if self.mesh is not None:
            parallel.apply_fsdp(self.model, self.mesh, param_dtype=torch.bfloat16 if self.is_bf16 else None)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.schedule)
        )
        d = cfg.data
        self.data = SequenceStream(
            d.paths,
            self.tokenizer,
            d.seq_len,
            d.packing,
            d.text_field,
            d.shuffle,
            d.seed,
            d.add_bos,
            d.add_eos,
        )
        self._eval_samples = None
        self.step, self.tokens_seen = 0, 0
        self.log = MetricsLog(cfg.checkpoint.output_dir, self.info.is_main)
        resume = cfg.checkpoint.resume
        if resume:
            path = (
                Path(resume) if isinstance(resume, str) else ckpt.latest_checkpoint(cfg.checkpoint.output_dir)
            )
            if path is not None:
                self.load(path)
        self.log.truncate_after(self.step)  # a fresh run, or records past the checkpoint, start over

    # ---------------------------------------------------------------- one step

    def _autocast(self):
        if self.is_bf16 and self.mesh is None:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_sum(self, batch: Batch) -> torch.Tensor:
        """Summed fp32 cross-entropy over the batch's targets (document-masked by construction)."""
        chunk_size = self.cfg.training.loss_chunk_size
        with self._autocast():
            inputs = dict(meta=batch.meta, kv_cache=batch.kv_cache)
            if not chunk_size:
                logits = self.model(batch.input_ids, batch.positions, **inputs)  # (T, V)
                return F.cross_entropy(
                    logits.float(), batch.labels, ignore_index=IGNORE_INDEX, reduction="sum"
                )
            hidden = self.model(batch.input_ids, batch.positions, return_hidden=True, **inputs)
            # the head's weight after the root forward: FSDP keeps the root unsharded until backward
            return chunked_cross_entropy(hidden, self.model.lm_head.weight, batch.labels, chunk_size)

    def micro_batches(self, samples) -> list[Batch]:
        """This rank's micro-batches of a step's samples: its data-parallel share, its ring shard."""
        plan, mb = self.plan, self.cfg.training.micro_batch_size
        mine = samples[plan.dp_rank :: plan.dp_size]
        batches = [collate(trim_padding(mine[i : i + mb]), self.device) for i in range(0, len(mine), mb)]
        if plan.cp_size > 1:
            batches = [context_parallel.shard_batch(b, plan) for b in batches]
        return batches

    def train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        world = self.info.world_size
        batches = self.micro_batches(take_samples(self.data, self.cfg.training.batch_size))
        num_targets, num_tokens, num_computed = parallel.all_reduce_sum(
            [
                sum(b.num_targets for b in batches),
                sum(b.num_tokens for b in batches),
                sum(b.input_ids.numel() for b in batches),
            ],
            self.device,
        )
        if num_targets == 0:
            raise ValueError(
                f"step {self.step + 1}: no token has a target (every document is one token long?)"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in batches:
            loss = self.loss_sum(batch)
            # FSDP averages gradients over all ranks (data x context): scale by world_size for sum / num_targets
            (loss * (world / num_targets)).backward()
            total += loss.detach()
        clip = self.cfg.optimizer.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip is not None else math.inf
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = parallel.all_reduce_sum([total.item()], self.device)[0] / num_targets
        self.step += 1
        self.tokens_seen += int(num_tokens)
        elapsed = time.perf_counter() - start
        return {
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": self.tokens_seen,
            "tokens_per_s": num_tokens / elapsed,
            "computed_tokens": int(num_computed),  # this step's tokens through the model, padding included
            "step_time_s": elapsed,
        }

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the first eval_sequences rows of data.eval_paths (None without eval data)."""
        d, data_ranks = self.cfg.data, self.plan.dp_size
        if not d.eval_paths:
            return None
        if self._eval_samples is None:
            stream = SequenceStream(
                d.eval_paths,
                self.tokenizer,
                d.seq_len,
                d.packing,
                d.text_field,
                shuffle=False,
                add_bos=d.add_bos,
                add_eos=d.add_eos,
            )
            # every rank must run the same number of forwards (FSDP all-gathers are collective)
            self._eval_samples = take_samples(stream, -(-d.eval_sequences // data_ranks) * data_ranks)
        total, count = 0.0, 0
        for batch in self.micro_batches(self._eval_samples):
            total += self.loss_sum(batch).item()
            count += batch.num_targets
        total, count = parallel.all_reduce_sum([total, count], self.device)
        return total / max(count, 1)

    # ---------------------------------------------------------------- the loop

    def train(self) -> list[dict[str, Any]]:
        """Run to schedule.max_steps; returns this call's per-step records."""
        cfg = self.cfg
        records: list[dict[str, Any]] = []
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.schedule.max_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (cfg.training.progress and self.info.is_main),
        )
        saved_at = self.step if cfg.checkpoint.resume else None
        try:
            while self.step < cfg.schedule.max_steps:
                record = self.train_step()
                records.append(record)
                if self.step % cfg.training.log_every == 0 or self.step == cfg.schedule.max_steps:
                    self.log.write(record)
                # the step's figures first, so the redraw that update() makes (rate-limited) shows them
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    tok_s=f"{record['tokens_per_s']:,.0f}",
                    lr=f"{record['lr']:.2e}",
                    refresh=False,
                )
                bar.update(1)
                every = cfg.training.eval_every
                if every and (self.step % every == 0 or self.step == cfg.schedule.max_steps):
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        record["eval_loss"] = eval_loss
                        self.log.write({"step": self.step, "eval_loss": eval_loss})
                        bar.write(f"step {self.step}: eval loss {eval_loss:.4f}")
                if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                    self.save()
                    saved_at = self.step
            bar.close()  # before the final save and export print anything
            if saved_at != self.step:
                self.save()
            self.export(Path(cfg.checkpoint.output_dir) / "final")
        finally:  # an interrupted run still closes its bar and flushes its TensorBoard scalars
            bar.close()  # (closing twice is harmless)
            self.log.close()
        return records

    # ---------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        state = {
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "config": self.cfg.to_dict(),
        }
        return ckpt.save_checkpoint(
            self.cfg.checkpoint.output_dir,
            self.step,
            self.model,
            self.optimizer,
            state,
            self.tokenizer,
            self.cfg.checkpoint.keep_last,
        )

    def load(self, path: str | Path) -> None:
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        saved = state.get("config", {}).get("data", {})
        for key in ("seq_len", "packing"):
            if key in saved and saved[key] != getattr(self.cfg.data, key):
                raise ValueError(
                    f"cannot resume {str(path)!r}: it was trained with data.{key}={saved[key]!r}, "
                    f"this run has {getattr(self.cfg.data, key)!r}"
                )
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        # the rate follows this run's schedule (max_steps may have grown since the save)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier(self.step, self.cfg.schedule)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def export(self, path: str | Path) -> Path:
        """The current weights as one Hugging Face directory (gathered from all ranks under FSDP)."""
        return ckpt.export_hf(self.model, path, self.tokenizer)


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    return Trainer(cfg).train()
