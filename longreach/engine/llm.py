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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from longreach.config import CacheConfig, SchedulerConfig
from longreach.engine.kv_state import INT4_BLOCK_SIZE, KVStates, kv_storage
from longreach.engine.runner import ModelRunner
from longreach.engine.sampler import Sampler, SamplingParams
from longreach.engine.scheduler import Scheduler
from longreach.engine.sequence import RequestMetrics, Sequence
from longreach.kvcache.block_pool import KVCacheManager
from longreach.kvcache.paged_cache import PagedKVCache, num_blocks_for
from longreach.model.llama import LlamaForCausalLM

Prompt = str | list[int]
logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """A request's state after a step; `finished` once `finish_reason` is set ("stop", "length" or "abort").

    `text` / `token_ids` are cumulative; `delta_text` / `delta_token_ids` are what this step added (for
    streaming). `out.outputs[0].text` also works, as in vLLM."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: list[dict[int, float]] | None
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def outputs(self) -> list["RequestOutput"]:
        return [self]


def detokenize_incrementally(tokenizer, ids: list[int], prefix_offset: int, read_offset: int):
    """New text of ids[read_offset:] given a few tokens of context (vLLM's trick): decoding a token alone
    can lose a leading space or split a UTF-8 character, so decode prefix..end and subtract prefix..read.
    Returns (new_text, prefix_offset, read_offset); text ending in U+FFFD waits for the next token."""
    prefix_text = tokenizer.decode(ids[prefix_offset:read_offset])
    full_text = tokenizer.decode(ids[prefix_offset:])
    if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
        return full_text[len(prefix_text):], read_offset, len(ids)
    return "", prefix_offset, read_offset


ALLOW_LONG_ENV = "LONGREACH_ALLOW_LONG_MAX_MODEL_LEN"


def check_max_model_len(cfg, scheduler_config: SchedulerConfig) -> None:
    """Refuse a max_model_len beyond what the model's rope is meant for (vLLM's rule), unless allowed
    (`allow_long_max_model_len=True` or LONGREACH_ALLOW_LONG_MAX_MODEL_LEN=1): then warn."""
    max_len, supported = scheduler_config.max_model_len, cfg.rope.max_supported_length
    if max_len <= supported:
        return
    what = (f"max_model_len={max_len} exceeds the {supported} tokens this model's rope supports "
            f"(rope_type {cfg.rope.rope_type!r}, max_position_embeddings {cfg.max_position_embeddings})")
    if scheduler_config.allow_long_max_model_len or os.environ.get(ALLOW_LONG_ENV, "") not in ("", "0"):
        logger.warning("%s; positions beyond it are extrapolated and answers may degrade", what)
        return
    raise ValueError(f"{what}; extend the context with a rope scaling (rope_scaling= / --rope-scaling), or pass "
                     f"allow_long_max_model_len=True (or set {ALLOW_LONG_ENV}=1) to run past it anyway")


class LLMEngine:
    """Continuous-batching engine over one model (vLLM's LLMEngine); not thread-safe: one caller steps it."""

    def __init__(self, model: LlamaForCausalLM, tokenizer: Any = None, cache_config: CacheConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None, seed: int | None = 0, parallel: Any = None):
        """parallel: tensor parallelism's hooks (tp.TensorParallel) when the model is sharded, else None."""
        cfg = model.config
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cache_config = cc = cache_config or CacheConfig()
        self.scheduler_config = scheduler_config or SchedulerConfig(max_model_len=cfg.rope.max_supported_length)
        check_max_model_len(cfg, self.scheduler_config)
        param = next(model.parameters())
        attn = model.model.layers[0].self_attn             # local head counts (fewer per rank under TP)
        bs, max_len = cc.block_size, self.scheduler_config.max_model_len
        quantizer, self.policy = kv_storage(cc, cfg, param.dtype)
        num_window_slots = self.scheduler_config.max_num_seqs if quantizer.needs_window else 0
        bytes_per_block = cfg.num_hidden_layers * quantizer.block_bytes(bs, attn.num_kv_heads, attn.head_dim)
        window_bytes = num_window_slots * cfg.num_hidden_layers * quantizer.window_bytes(attn.num_kv_heads,
                                                                                         attn.head_dim)
        sizing = cc
        if cc.kv_cache_memory is not None and window_bytes:
            if cc.kv_cache_memory <= window_bytes + bytes_per_block:
                raise ValueError(f"kv_cache_memory={cc.kv_cache_memory} bytes does not hold int4's window slots "
                                 f"({window_bytes} bytes: max_num_seqs={num_window_slots} x the recent-token window) "
                                 "plus one block; raise it or lower max_num_seqs")
            sizing = replace(cc, kv_cache_memory=cc.kv_cache_memory - window_bytes)
        max_useful_blocks = self.scheduler_config.max_num_seqs * -(-max_len // bs)
        num_blocks = num_blocks_for(sizing, bytes_per_block, param.device, max_useful_blocks)
        self.parallel = parallel
        if parallel is not None:
            num_blocks = parallel.agree_min(num_blocks)     # every rank must schedule the same blocks
        enable_caching = cc.enable_prefix_caching
        if enable_caching and (quantizer.needs_window or self.policy is not None):
            why = ("int4 KV keeps recent tokens in a per-request window, so a full block may not be quantized yet"
                   if quantizer.needs_window else f"kv_policy {cc.kv_policy!r} makes a block's K/V depend on what "
                   "was evicted before it")
            logger.info("prefix caching is off: %s", why)
            enable_caching = False
        self.kv_manager = KVCacheManager(num_blocks, bs, enable_caching)
        self.cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, bs, attn.num_kv_heads, attn.head_dim,
                                  param.dtype, param.device, quantizer=quantizer, num_window_slots=num_window_slots)
        self.kv_states, self.num_window_slots = KVStates(num_window_slots), num_window_slots
        self.kv_manager.on_free = self.kv_states.release
        eos = list(cfg.eos_token_ids)
        tok_eos = getattr(tokenizer, "eos_token_ids", None) or [getattr(tokenizer, "eos_token_id", None)]
        eos += [t for t in tok_eos if t is not None and t not in eos]
        self.eos_token_ids = tuple(eos)
        self.scheduler = Scheduler(self.scheduler_config, self.kv_manager, self.eos_token_ids)
        self.runner = ModelRunner(model, self.cache, self.kv_manager, self.policy, self.kv_states)
        self.sampler = Sampler(self.eos_token_ids, seed)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_manager.num_blocks

    @property
    def kv_cache_bytes_used(self) -> int:
        """Bytes of KV cache requests hold now: blocks (data and scales) plus int4 window slots in use."""
        used = self.kv_manager.num_blocks - self.kv_manager.num_free_blocks
        return used * self.cache.block_bytes + self.kv_states.num_window_slots_used * self.cache.window_slot_bytes

    @property
    def kv_cache_bytes_total(self) -> int:
        """Bytes of the whole KV cache: every block plus every int4 window slot."""
        return self.kv_manager.num_blocks * self.cache.block_bytes + self.num_window_slots * self.cache.window_slot_bytes

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a prompt (text, or a list of token ids); returns its request id."""
        params = sampling_params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self._encode(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {list(params.stop)} need a tokenizer; this engine has none "
                             "(use stop_token_ids)")
        max_len = self.scheduler_config.max_model_len
        if len(ids) >= max_len:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {max_len}: it must be shorter, "
                             "leaving room for at least one generated token")
        longest = min(len(ids) + (params.max_tokens or max_len), max_len)
        capacity = self.kv_manager.num_blocks * self.kv_manager.block_size
        if self.policy is not None:     # held between steps, plus one step's new tokens (a prefill chunk)
            bs = self.kv_manager.block_size
            step = min(self.scheduler_config.max_num_batched_tokens, longest)
            longest = min(longest, (self.policy.max_held_blocks(bs) + -(-step // bs) + 1) * bs)
        if longest > capacity:
            raise ValueError(f"request needs up to {longest} tokens of KV cache ({len(ids)} prompt + up to "
                             f"{longest - len(ids)} generated) but the cache holds {capacity} "
                             f"({self.kv_manager.num_blocks} blocks of {self.kv_manager.block_size}); "
                             "lower max_tokens or give the cache more memory")
        # length-dependent RoPE: chosen once, from the most positions this request can ever run (the last
        # sampled token is never fed back), never from the batch it happens to share a step with
        rope = self.model.config.rope
        rope_seq_len = rope.table_length(min(len(ids) + (params.max_tokens or max_len), max_len) - 1)
        seq = Sequence(request_id, ids, params, prompt=text, cache_salt=cache_salt, rope_seq_len=rope_seq_len,
                       arrival_time=time.perf_counter() if arrival_time is None else arrival_time)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; this engine has none (pass token-id lists)")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed")
        vocab = self.model.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        return ids

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward pass; outputs of every request that got a token (or finished)."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            if self.scheduler.has_unfinished():   # cannot happen given add_request's checks: fail, never spin
                raise RuntimeError(f"no request could be scheduled ({self.scheduler.num_unfinished} waiting, "
                                   f"{self.kv_manager.num_free_blocks} of {self.num_kv_blocks} KV blocks free)")
            return []
        try:
            sampling, logits = self.runner.execute(batch)
            sampled = self.sampler(logits, sampling)
            token_ids = sampled.token_ids if self.parallel is None else self.parallel.sync_tokens(sampled.token_ids)
        except BaseException:
            # an out-of-memory, a Ctrl-C, a kernel error: the step's K/V may be missing or half written, so
            # no block it registered may become a prefix hit, and its requests start over from their tokens
            # (still queued: the caller decides whether to retry them by stepping again or to abort them)
            self.kv_manager.rollback()
            self.scheduler.requeue(batch)
            raise
        self.kv_manager.commit()
        self.scheduler.update(batch, sampling, token_ids, sampled.logprobs)
        self.runner.after_step()
        outputs = [self._output(seq) for seq in sampling]
        for seq in sampling:
            if seq.is_finished:
                del self.requests[seq.request_id]
        return outputs

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks (a client went away); None if it is unknown/finished."""
        seq = self.requests.pop(str(request_id), None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._output(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        if self.tokenizer is not None:
            self._detokenize(seq)
        holdback = 0
        if not seq.is_finished and seq.sampling_params.stop:
            holdback = max(map(len, seq.sampling_params.stop)) - 1   # a stop string may still complete
        shown = len(seq.text) - holdback
        delta_text = seq.text[seq.num_reported_chars:shown] if shown > seq.num_reported_chars else ""
        seq.num_reported_chars = max(seq.num_reported_chars, shown)
        outputs = seq.output_token_ids
        delta_ids = outputs[seq.num_reported_tokens:]
        seq.num_reported_tokens = len(outputs)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, seq.text[:max(shown, 0)],
                             outputs, delta_text, delta_ids, seq.finish_reason, seq.stop_reason,
                             seq.logprobs, seq.metrics)

    def _detokenize(self, seq: Sequence) -> None:
        """Extend seq.text with the new tokens and finish the request if a stop string appeared."""
        outputs = seq.output_token_ids
        if seq.finish_reason == "stop" and seq.stop_reason is None:
            outputs = outputs[:-1]                      # EOS is not part of the text
        new, seq.detok_prefix_offset, seq.detok_read_offset = detokenize_incrementally(
            self.tokenizer, outputs, seq.detok_prefix_offset, seq.detok_read_offset)
        old_len = len(seq.text)
        seq.text += new
        stops = seq.sampling_params.stop
        if stops and not (seq.is_finished and isinstance(seq.stop_reason, str)):
            start = max(0, old_len - max(map(len, stops)) + 1)
            hits = [(seq.text.find(s, start), s) for s in stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                index, stop = min(hits)
                end = index + (len(stop) if seq.sampling_params.include_stop_str_in_output else 0)
                seq.text = seq.text[:end]
                if seq.is_finished:             # finished on the same token for another reason: the string wins
                    seq.finish_reason, seq.stop_reason = "stop", stop
                else:
                    self.scheduler.finish(seq, "stop", stop)
                return
        if seq.is_finished:                     # flush what the incremental decoder held back
            final = self.tokenizer.decode(outputs)
            if final.startswith(seq.text):
                seq.text = final


class LLM:
    """Offline generation over a batch of prompts (vLLM's `LLM`).

    model: a Hugging Face checkpoint directory, a loaded `LlamaForCausalLM`, or None for the bundled demo
    model. dtype: a torch dtype or its name ("bf16", "fp32", ...). The KV cache gets `num_kv_blocks` blocks,
    else `kv_cache_memory` bytes, else `memory_fraction` of the free memory (CacheConfig).
    tensor_parallel_size > 1: run under torchrun with that many processes; each holds a shard (tp.py).
    max_model_len: prompt + output tokens per request; default what the rope supports (max_position_embeddings,
    or factor x the original length for a scaling that extends it, as vLLM derives it); beyond that is an
    error unless allow_long_max_model_len=True (or LONGREACH_ALLOW_LONG_MAX_MODEL_LEN=1).

    kv_cache_dtype: KV storage, "auto" (the model dtype), "bf16", "fp16", "fp32", "int8" (per token and head)
    or "int4" (KIVI; needs block_size a multiple of 32, the default block_size then, and turns prefix caching
    off). Quantized on write, dequantized for attention (on CUDA into a compact page set before the Triton
    decode kernel; the kernel itself reads full precision).
    quantization: "int8" / "int4" weight-only linears, swapped in at load (`longreach.model.quant`);
    a checkpoint saved by `save_quantized` loads quantized without it.
    kv_policy: "none", "window", "sinks" or "h2o", with kv_policy_args its budgets (`make_policy`'s keywords:
    {"window": W}, {"window": W, "num_sinks": S}, {"heavy": H, "recent": R}). Decoding frees every whole
    block left without a kept token, so a request's KV memory stays bounded however long it generates: the
    policy's max_held_blocks plus one step's new tokens (a prefill chunk of up to max_num_batched_tokens;
    RequestOutput.metrics.max_kv_blocks says how much it held). Positions are NOT re-rotated: kept keys keep
    their original RoPE positions, so a query sees them at their true distance (unlike StreamingLLM's rolling
    positions). Prefix caching is off under a policy."""

    def __init__(self, model: str | Path | LlamaForCausalLM | None = None,
                 dtype: str | torch.dtype | None = None, *, tokenizer: Any = None,
                 device: str | torch.device | None = None,
                 max_model_len: int | None = None, block_size: int | None = None,
                 kv_cache_memory: int | float | None = None,
                 memory_fraction: float | None = None, num_kv_blocks: int | None = None,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, enable_chunked_prefill: bool = True,
                 rope_scaling: dict[str, Any] | None = None, seed: int | None = 0,
                 tensor_parallel_size: int = 1, kv_cache_dtype: str = "auto", quantization: str | None = None,
                 kv_policy: str = "none", kv_policy_args: dict[str, Any] | None = None,
                 allow_long_max_model_len: bool = False):
        from longreach.model.loader import load_model, resolve_dtype

        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if tensor_parallel_size > 1 else "cuda"
        device = torch.device(device or "cpu")
        path = None
        if isinstance(model, LlamaForCausalLM):
            if rope_scaling is not None:
                raise ValueError("rope_scaling applies when loading a checkpoint; this model is already built")
            model = model.to(device=device, dtype=resolve_dtype(dtype))
        else:
            from longreach.model.bundled import resolve_model_path
            path = resolve_model_path(None if model is None else str(model))
            model = load_model(path, dtype=dtype, rope_scaling=rope_scaling, device=device)
        if quantization is not None:
            from longreach.model.quant import check_quantization, quantize_model
            quantize_model(model, check_quantization(quantization))
        parallel = None
        if tensor_parallel_size > 1:
            from longreach.engine.tp import TensorParallel, shard_model
            shard_model(model, tensor_parallel_size)
            parallel = TensorParallel(device)
        if tokenizer is None and path is not None:
            tokenizer = _try_load_tokenizer(path)
        elif isinstance(tokenizer, (str, Path)):
            from longreach.model.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(tokenizer)
        if block_size is None:
            block_size = INT4_BLOCK_SIZE if kv_cache_dtype == "int4" else 16
        cache_config = CacheConfig(block_size=block_size, num_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory,
                                   memory_fraction=memory_fraction, enable_prefix_caching=enable_prefix_caching,
                                   kv_cache_dtype=kv_cache_dtype, kv_policy=kv_policy,
                                   kv_policy_args=dict(kv_policy_args or {}))
        scheduler_config = SchedulerConfig(max_model_len=max_model_len or model.config.rope.max_supported_length,
                                           max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                           enable_chunked_prefill=enable_chunked_prefill,
                                           allow_long_max_model_len=allow_long_max_model_len)
        self.engine = LLMEngine(model, tokenizer, cache_config, scheduler_config, seed, parallel)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in the prompts' order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts; "
                                 "pass one for all, or one per prompt")
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
                        bar.set_postfix_str(f"in: {num_in / elapsed:.0f} tok/s, out: {num_out / elapsed:.0f} tok/s")
                        bar.update(1)
        except BaseException:
            for request_id in ids:
                engine.abort(request_id)
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]


def _try_load_tokenizer(path: Path):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts still work)."""
    try:
        from longreach.model.tokenizer import load_tokenizer
    except ImportError:
        return None
    try:
        return load_tokenizer(path)
    except FileNotFoundError:
        return None
