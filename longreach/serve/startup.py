"""What `longreach serve` says when it starts: a summary of what it serves (log records), and how big the KV
cache may be under `--gpu-memory-utilization`.

The summary answers what an operator checks first: which model, on which device, in which dtype; how the KV
cache is stored and how much it holds, in tokens and in requests of the full `--max-model-len` at once;
whether prefix caching and chunked prefill are on; the sampling defaults; where to send requests. Secrets
are never part of it (the API key is only said to be set).
"""

from __future__ import annotations

import gc
import logging
import sys
from dataclasses import replace
from typing import Any

import torch

from longreach.kvcache.quant import resolve_kv_cache_dtype

logger = logging.getLogger("longreach.serve")


def num_full_length_requests(engine) -> int:
    """How many requests of max_model_len tokens the KV cache holds at once (each held to its kept tokens
    under an eviction policy; int4 also needs one window slot per request)."""
    plan, sc = engine.plan, engine.scheduler_config
    held = plan.max_held_tokens(sc.max_model_len, sc.max_num_batched_tokens)
    blocks_per_request = -(-held // plan.block_size)
    count = plan.num_blocks // blocks_per_request
    return min(count, plan.num_window_slots) if plan.num_window_slots else count


def startup_summary(engine, names: list[str], model_path, url: str, **extra: Any) -> dict[str, Any]:
    """The facts the startup log states, as a dict (also what the tests read). `extra`: further entries
    from the command line (tensor-parallel size, the generation-config source, whether a key is set)."""
    param = next(engine.model.parameters())
    sc, cc, plan = engine.scheduler_config, engine.cache_config, engine.plan
    model_dtype = str(param.dtype).removeprefix("torch.")
    return {
        "model": str(model_path),
        "served_model_names": list(names),
        "device": str(param.device),
        "dtype": model_dtype,
        "kv_cache_dtype": resolve_kv_cache_dtype(cc.kv_cache_dtype, param.dtype),
        "kv_cache_bytes": plan.total_bytes,
        "kv_cache_tokens": plan.capacity_tokens,
        "max_model_len": sc.max_model_len,
        "full_length_requests": num_full_length_requests(engine),
        "kv_policy": cc.kv_policy,
        "prefix_caching": plan.enable_prefix_caching,
        "chunked_prefill": sc.enable_chunked_prefill,
        "max_num_seqs": sc.max_num_seqs,
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "address": url,
        **extra,
    }


def log_startup_summary(summary: dict[str, Any]) -> None:
    """The summary as a few INFO records on the `longreach.serve` logger."""
    s = summary
    logger.info(
        "model %s served as %s on %s, dtype %s",
        s["model"],
        ", ".join(map(repr, s["served_model_names"])),
        s["device"],
        s["dtype"],
    )
    logger.info(
        "KV cache: %s, %s, %d tokens = %d request(s) of the full max_model_len %d at once%s",
        s["kv_cache_dtype"],
        format_bytes(s["kv_cache_bytes"]),
        s["kv_cache_tokens"],
        s["full_length_requests"],
        s["max_model_len"],
        "" if s["kv_policy"] == "none" else f" (kv_policy {s['kv_policy']})",
    )
    logger.info(
        "prefix caching %s, chunked prefill %s, up to %d requests and %d tokens per step",
        "on" if s["prefix_caching"] else "off",
        "on" if s["chunked_prefill"] else "off",
        s["max_num_seqs"],
        s["max_num_batched_tokens"],
    )
    rest = {k: v for k, v in s.items() if k not in _STATED and v not in (None, {}, [])}
    if rest:
        logger.info("%s", ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in rest.items()))
    logger.info("listening at %s/v1", s["address"])


def format_bytes(num_bytes: int) -> str:
    """1536 -> '1.5 KiB', 3 * 2**30 -> '3.00 GiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{num_bytes} B"


_STATED = {
    "model",
    "served_model_names",
    "device",
    "dtype",
    "kv_cache_dtype",
    "kv_cache_bytes",
    "kv_cache_tokens",
    "max_model_len",
    "full_length_requests",
    "kv_policy",
    "prefix_caching",
    "chunked_prefill",
    "max_num_seqs",
    "max_num_batched_tokens",
    "address",
}


def warn_about_limits(engine) -> None:
    """Warnings on stderr when max_model_len passes what the rope supports or what the KV cache holds."""
    max_len, supported = engine.scheduler_config.max_model_len, engine.model.config.rope.max_supported_length
    if max_len > supported:  # only reachable with LONGREACH_ALLOW_LONG_MAX_MODEL_LEN=1
        print(
            f"longreach serve: warning: --max-model-len {max_len} exceeds the {supported} tokens the model's "
            "rope supports; beyond it answers may degrade (extend it with --rope-scaling)",
            file=sys.stderr,
        )
    capacity = engine.num_kv_blocks * engine.cache_config.block_size
    if capacity < max_len:
        print(
            f"longreach serve: warning: the KV cache holds {capacity} tokens, fewer than --max-model-len "
            f"{max_len}; longer requests will be refused (give it more with --kv-cache-memory)",
            file=sys.stderr,
        )


# ---------------------------------------------------------------- --gpu-memory-utilization


def gpu_kv_budget(fraction: float, total: int, used_without_kv: int, activation_peak: int) -> int:
    """vLLM's --gpu-memory-utilization: the engine may use `fraction` of the device's `total` bytes in all,
    so the KV cache gets what is left of it after what is already in use (weights, other processes; the
    KV cache excluded) and the peak of a forward pass's activations."""
    budget = int(fraction * total) - used_without_kv - activation_peak
    if budget < 1:
        raise ValueError(
            f"--gpu-memory-utilization {fraction}: {fraction:.0%} of {total / 2**30:.2f} GiB leaves nothing "
            f"for the KV cache ({used_without_kv / 2**30:.2f} GiB already in use, "
            f"{activation_peak / 2**30:.2f} GiB for activations); raise it"
        )
    return budget


def resize_for_gpu_utilization(llm, fraction: float, seed: int | None) -> None:
    """Rebuild `llm`'s engine with the KV cache --gpu-memory-utilization allows on its CUDA device.

    The engine was built with a cache for one step's tokens; one full step through it measures the
    activations' peak, the cache is freed, and what the device then uses is what stays (weights, others)."""
    from longreach.engine.llm import LLMEngine, SamplingParams  # lazy: the engine is heavy; CUDA only

    engine = llm.engine
    device = next(engine.model.parameters()).device
    sc = engine.scheduler_config
    num_tokens = min(sc.max_num_batched_tokens, sc.max_model_len - 1)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    llm.generate([[0] * num_tokens], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    activation_peak = torch.cuda.max_memory_allocated(device) - base
    model, tokenizer, cc, parallel = engine.model, engine.tokenizer, engine.cache_config, engine.parallel
    llm.engine = engine = None
    gc.collect()  # the measuring cache's tensors must be gone before the free memory is read
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = gpu_kv_budget(fraction, total, total - free, activation_peak)
    cache_config = replace(cc, num_blocks=None, kv_cache_memory=budget, memory_fraction=None)
    llm.engine = LLMEngine(model, tokenizer, cache_config, sc, seed, parallel)
    logger.info(
        "--gpu-memory-utilization %g: %.2f GiB of %.2f GiB for the KV cache (%.2f GiB in use before it, "
        "%.2f GiB activation peak)",
        fraction,
        budget / 2**30,
        total / 2**30,
        (total - free) / 2**30,
        activation_peak / 2**30,
    )


def warmup_blocks(block_size: int, max_num_batched_tokens: int, max_model_len: int) -> int:
    """KV blocks for the measuring step of `resize_for_gpu_utilization`: one step's tokens and one more."""
    return -(-min(max_num_batched_tokens, max_model_len) // block_size) + 1
