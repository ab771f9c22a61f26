"""`LLM` for offline batches and `LLMEngine` (add_request / step / abort) for servers: vLLM's API.

    from longreach import LLM, SamplingParams
    llm = LLM("path/to/hf-checkpoint")
    for out in llm.generate(["The pass key is"], SamplingParams(max_tokens=16, temperature=0)):
        print(out.text, out.finish_reason, out.metrics.ttft)

One engine step = schedule (scheduler.py) -> one flat forward over the paged cache (runner.py) -> sample
(sampler.py) -> append tokens and check stops -> detokenize incrementally and check stop strings.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch

from longreach.config import CacheConfig, SchedulerConfig, kv_cache_memory_fields
from longreach.engine.bi_layout import BatchInvariantLayout, configure_batch_invariant
from longreach.engine.cuda_graphs import make_decode_graphs
from longreach.engine.kv_state import KVStates
from longreach.engine.layouts import make_layout
from longreach.engine.output import OutputProcessor, RequestOutput
from longreach.engine.prompts import (
    Message,
    Prompt,
    as_conversations,
    as_prompt_list,
    chat_prompt_ids,
    check_fits,
    encode_prompt,
    params_per_prompt,
)
from longreach.engine.runner import ModelRunner
from longreach.engine.sampler import Sampler
from longreach.engine.sampling_params import SamplingParams
from longreach.engine.scheduler import Scheduler
from longreach.engine.sequence import Sequence
from longreach.engine.tp import TensorParallel, shard_model
from longreach.kvcache.block_pool import KVCacheManager
from longreach.kvcache.paged_cache import PagedKVCache
from longreach.kvcache.planner import INT4_BLOCK_SIZE, plan_kv_cache
from longreach.model.bundled import resolve_model_path
from longreach.model.llama import LlamaForCausalLM
from longreach.model.loader import load_model, resolve_dtype
from longreach.model.quant import check_quantization, quantize_model
from longreach.model.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

ALLOW_LONG_ENV = "LONGREACH_ALLOW_LONG_MAX_MODEL_LEN"


def check_max_model_len(cfg, scheduler_config: SchedulerConfig) -> None:
    """Refuse a max_model_len beyond what the model's rope is meant for (vLLM's rule), unless allowed
    (`allow_long_max_model_len=True` or LONGREACH_ALLOW_LONG_MAX_MODEL_LEN=1): then warn."""
    max_len, supported = scheduler_config.max_model_len, cfg.rope.max_supported_length
    if max_len <= supported:
        return
    what = (
        f"max_model_len={max_len} exceeds the {supported} tokens this model's rope supports "
        f"(rope_type {cfg.rope.rope_type!r}, max_position_embeddings {cfg.max_position_embeddings})"
    )
    if scheduler_config.allow_long_max_model_len or os.environ.get(ALLOW_LONG_ENV, "") not in ("", "0"):
        logger.warning("%s; positions beyond it are extrapolated and answers may degrade", what)
        return
    raise ValueError(
        f"{what}; extend the context with a rope scaling (rope_scaling= / --rope-scaling), or pass "
        f"allow_long_max_model_len=True (or set {ALLOW_LONG_ENV}=1) to run past it anyway"
    )


class LLMEngine:
    """Continuous-batching engine over one model (vLLM's LLMEngine); not thread-safe: one caller steps it."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: Any = None,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        seed: int | None = 0,
        parallel: Any = None,
        batch_invariant: bool | None = None,
    ):
        """parallel: tensor parallelism's hooks (tp.TensorParallel) when the model is sharded, else None.
        batch_invariant: see `LLM`; None follows LONGREACH_BATCH_INVARIANT (or a model already switched on)."""
        cfg = model.config
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cache_config = cc = cache_config or CacheConfig()
        self.scheduler_config = sc = scheduler_config or SchedulerConfig(
            max_model_len=cfg.rope.max_supported_length
        )
        check_max_model_len(cfg, sc)
        param = next(model.parameters())
        self.parallel = parallel
        self.plan = plan = plan_kv_cache(
            cfg,
            cc,
            sc,
            param.dtype,
            param.device,
            tp_size=1 if parallel is None else parallel.world_size,
            agree_min=None if parallel is None else parallel.agree_min,
        )
        self.policy = plan.policy
        self.kv_manager = KVCacheManager(plan.num_blocks, plan.block_size, plan.enable_prefix_caching)
        self.cache = PagedKVCache(
            cfg.num_hidden_layers,
            plan.num_blocks,
            plan.block_size,
            plan.num_kv_heads,
            plan.head_dim,
            param.dtype,
            param.device,
            quantizer=plan.quantizer,
            num_window_slots=plan.num_window_slots,
        )
        self.kv_states = KVStates(plan.num_window_slots)
        self.kv_manager.on_free = self.kv_states.release
        eos = list(cfg.eos_token_ids)
        tok_eos = getattr(tokenizer, "eos_token_ids", None) or [getattr(tokenizer, "eos_token_id", None)]
        eos += [t for t in tok_eos if t is not None and t not in eos]
        self.eos_token_ids = tuple(eos)
        self.scheduler = Scheduler(sc, self.kv_manager)
        self.output = OutputProcessor(tokenizer, self.eos_token_ids, sc.max_model_len, self.scheduler.finish)
        layout = make_layout(plan, self.cache, self.kv_manager, param.device, self.kv_states)
        self.batch_invariant = configure_batch_invariant(model, batch_invariant, plan, parallel is not None)
        if self.batch_invariant:  # one fixed reduction order per token, whatever the batch (bi_layout.py)
            layout = BatchInvariantLayout(self.cache, self.kv_manager, param.device)
        self.runner = ModelRunner(model, layout, self.kv_manager, plan.block_bytes, plan.window_slot_bytes)
        self.runner.graphs = make_decode_graphs(model, layout, self.cache, sc, param.device, parallel)
        self.sampler = Sampler(self.eos_token_ids, seed)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_manager.num_blocks

    @property
    def num_window_slots(self) -> int:
        return self.plan.num_window_slots

    @property
    def kv_cache_bytes_used(self) -> int:
        """Bytes of KV cache requests hold now: blocks (data and scales) plus int4 window slots in use."""
        used = self.kv_manager.num_blocks - self.kv_manager.num_free_blocks
        return (
            used * self.plan.block_bytes + self.kv_states.num_window_slots_used * self.plan.window_slot_bytes
        )

    @property
    def kv_cache_bytes_total(self) -> int:
        """Bytes of the whole KV cache: every block plus every int4 window slot."""
        return self.plan.total_bytes

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a prompt (text, or a list of token ids); returns its request id."""
        params = sampling_params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self._encode(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError(
                f"stop strings {list(params.stop)} need a tokenizer; this engine has none "
                "(use stop_token_ids)"
            )
        sc = self.scheduler_config
        longest = check_fits(
            len(ids), params.max_tokens, sc.max_model_len, self.plan, sc.max_num_batched_tokens
        )
        # length-dependent RoPE: chosen once, from the most positions this request can ever run (the last
        # sampled token is never fed back), never from the batch it happens to share a step with
        rope_seq_len = self.model.config.rope.table_length(longest - 1)
        seq = Sequence(
            request_id,
            ids,
            params,
            prompt=text,
            cache_salt=cache_salt,
            rope_seq_len=rope_seq_len,
            arrival_time=time.perf_counter() if arrival_time is None else arrival_time,
        )
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        self.output.add(seq)
        self.runner.prompt_logprobs.add(seq)
        return request_id

    def _encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.model.config.vocab_size)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward pass; outputs of every request that got a token (or finished)."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            if self.scheduler.has_unfinished():  # cannot happen given add_request's checks: fail, never spin
                raise RuntimeError(
                    f"no request could be scheduled ({self.scheduler.num_unfinished} waiting, "
                    f"{self.kv_manager.num_free_blocks} of {self.num_kv_blocks} KV blocks free)"
                )
            return []
        try:
            step, logits = self.runner.execute(batch)
            sampled = self.sampler(logits, step.sampling)
            token_ids = (
                sampled.token_ids if self.parallel is None else self.parallel.sync_tokens(sampled.token_ids)
            )
        except BaseException:
            # an out-of-memory, a Ctrl-C, a kernel error: the step's K/V may be missing or half written, so
            # no block it registered may become a prefix hit, and its requests start over from their tokens
            # (still queued: the caller decides whether to retry them by stepping again or to abort them)
            self.kv_manager.rollback()
            self.scheduler.requeue(batch)
            raise
        self.kv_manager.commit()
        self.scheduler.update(batch, step.sampling, token_ids, sampled.logprobs)
        outputs = self.output.process(step.sampling)
        self.runner.after_step(step)
        for out in outputs:
            out.prompt_logprobs = self.runner.prompt_logprobs.get(out.request_id)
        for seq in step.sampling:
            if seq.is_finished:
                del self.requests[seq.request_id]
                self.runner.prompt_logprobs.pop(seq.request_id)
        return outputs

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks (a client went away); None if it is unknown/finished."""
        seq = self.requests.pop(str(request_id), None)
        if seq is None:
            return None
        self.runner.prompt_logprobs.pop(seq.request_id)
        return self.output.abort(seq)


class LLM:
    """Offline generation over a batch of prompts (vLLM's `LLM`).

    model: a Hugging Face checkpoint directory, a loaded `LlamaForCausalLM`, or None for the bundled demo
    model. dtype: a torch dtype or its name ("bf16", "fp32", ...). The KV cache gets `num_kv_blocks` blocks,
    else `kv_cache_memory` bytes, else `memory_fraction` of the free memory (CacheConfig).
    tensor_parallel_size > 1: run under torchrun with that many processes; each holds a shard (tp.py).
    max_model_len: prompt + output tokens per request; default what the rope supports (max_position_embeddings,
    or factor x the original length for a scaling that extends it, as vLLM derives it); beyond that is an
    error unless allow_long_max_model_len=True (or LONGREACH_ALLOW_LONG_MAX_MODEL_LEN=1).

    kv_cache_dtype: KV storage, "auto" (the model dtype), "bf16", "fp16", "fp32", "int8" or "fp8" (e4m3, alias
    "fp8_e4m3"; both with one scale per token and head) or "int4" (KIVI; needs block_size a multiple of 32,
    the default block_size then, and turns prefix caching off). Quantized on write, dequantized for attention
    (int8 and fp8 inside the Triton decode kernel on CUDA; int4 per sequence before its attention call).
    quantization: "int8" / "int4" weight-only linears, swapped in at load (`longreach.model.quant`);
    a checkpoint saved by `save_quantized` loads quantized without it.
    kv_policy: "none", "window", "sinks" or "h2o", with kv_policy_args its budgets (`make_policy`'s keywords:
    {"window": W}, {"window": W, "num_sinks": S}, {"heavy": H, "recent": R}). Decoding frees every whole
    block left without a kept token, so a request's KV memory stays bounded however long it generates: the
    policy's max_held_blocks plus one step's new tokens (a prefill chunk of up to max_num_batched_tokens;
    RequestOutput.metrics.max_kv_blocks says how much it held). Positions are NOT re-rotated: kept keys keep
    their original RoPE positions, so a query sees them at their true distance (unlike StreamingLLM's rolling
    positions). Prefix caching is off under a policy.
    batch_invariant: True gives every token the same logits (bitwise) whatever else runs in its step, its
    prefill chunking or preemption (fixed-tile linears, fixed-split attention: `longreach.batch_invariant`);
    None follows LONGREACH_BATCH_INVARIANT=1. Needs tensor_parallel_size=1 and token-local KV storage.
    enforce_eager: True never replays decode steps from CUDA graphs (`engine.cuda_graphs`; CUDA only)."""

    def __init__(
        self,
        model: str | Path | LlamaForCausalLM | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        max_model_len: int | None = None,
        block_size: int | None = None,
        kv_cache_memory: int | float | None = None,
        memory_fraction: float | None = None,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_chunked_prefill: bool = True,
        rope_scaling: dict[str, Any] | None = None,
        seed: int | None = 0,
        tensor_parallel_size: int = 1,
        kv_cache_dtype: str = "auto",
        quantization: str | None = None,
        kv_policy: str = "none",
        kv_policy_args: dict[str, Any] | None = None,
        allow_long_max_model_len: bool = False,
        batch_invariant: bool | None = None,
        enforce_eager: bool = False,
    ):
        model, path, parallel = _build_model(
            model, dtype, device, rope_scaling, quantization, tensor_parallel_size
        )
        if tokenizer is None and path is not None:
            tokenizer = _try_load_tokenizer(path)
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        if block_size is None:
            block_size = INT4_BLOCK_SIZE if kv_cache_dtype == "int4" else 16
        kv_cache_memory, memory_fraction = kv_cache_memory_fields(kv_cache_memory, memory_fraction)
        cache_config = CacheConfig(
            block_size=block_size,
            num_blocks=num_kv_blocks,
            kv_cache_memory=kv_cache_memory,
            memory_fraction=memory_fraction,
            enable_prefix_caching=enable_prefix_caching,
            kv_cache_dtype=kv_cache_dtype,
            kv_policy=kv_policy,
            kv_policy_args=dict(kv_policy_args or {}),
        )
        scheduler_config = SchedulerConfig(
            max_model_len=max_model_len or model.config.rope.max_supported_length,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            allow_long_max_model_len=allow_long_max_model_len,
            enforce_eager=enforce_eager,
        )
        self.engine = LLMEngine(
            model, tokenizer, cache_config, scheduler_config, seed, parallel, batch_invariant=batch_invariant
        )

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in the prompts' order."""
        prompts = as_prompt_list(prompts)
        params = params_per_prompt(sampling_params, len(prompts))
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(engine.add_request(prompt, p))
        except Exception:
            for request_id in ids:
                engine.abort(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: Seq[Message] | Seq[Seq[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation ([{"role", "content"}, ...]) or a list of them (vLLM's `LLM.chat`):
        each goes through the chat template (the tokenizer's, or `chat_template`: a template string or one of
        the tokenizer's template names), tokenized without added special tokens, then `generate`."""
        tokenizer = self.engine.tokenizer
        prompts = [
            chat_prompt_ids(tokenizer, c, chat_template, add_generation_prompt)
            for c in as_conversations(messages)
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        engine = self.engine
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start, num_in, num_out = time.perf_counter(), 0, 0
        try:
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        num_in += len(out.prompt_token_ids)
                        num_out += len(out.token_ids)
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(
                            f"in: {num_in / elapsed:.0f} tok/s, out: {num_out / elapsed:.0f} tok/s"
                        )
                        bar.update(1)
        except BaseException:
            for request_id in ids:
                engine.abort(request_id)
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]


def _build_model(model, dtype, device, rope_scaling, quantization, tensor_parallel_size: int):
    """(model on its device, quantized and sharded as asked; its checkpoint directory or None; TP hooks or None)."""
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if tensor_parallel_size > 1 else "cuda"
    device = torch.device(device or "cpu")
    path = None
    if isinstance(model, LlamaForCausalLM):
        if rope_scaling is not None:
            raise ValueError("rope_scaling applies when loading a checkpoint; this model is already built")
        model = model.to(device=device, dtype=resolve_dtype(dtype))
    else:
        path = resolve_model_path(None if model is None else str(model))
        model = load_model(path, dtype=dtype, rope_scaling=rope_scaling, device=device)
    if quantization is not None:
        quantize_model(model, check_quantization(quantization))
    parallel = None
    if tensor_parallel_size > 1:
        shard_model(model, tensor_parallel_size)
        parallel = TensorParallel(device)
    return model, path, parallel


def _try_load_tokenizer(path: Path):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts still work)."""
    try:
        return load_tokenizer(path)
    except FileNotFoundError:
        return None
