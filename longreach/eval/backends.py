"""Where evaluation prompts are answered: this machine's model, or any OpenAI-compatible server.

Both backends follow one tiny protocol, so the runner never knows which it drives:

    backend.name                     # a label for tables and plot titles
    backend.tokenizer                # encode(text) -> ids: used to size the prompts in the model's tokens
    backend.complete(prompts, max_tokens) -> list[str | Exception]   # greedy; one entry per prompt, in order

A failed prompt comes back as its exception (never raised), so one bad request costs one sample.

- `LocalBackend(model_dir | model object)`: greedy generation here, through the paged serving engine
  (`longreach.engine.llm.LLM`) when this build has it and the contiguous-cache reference generator
  (`longreach.model.generate.generate`) otherwise — the one switch is `_local_generator`.
- `EndpointBackend(url)` (in `endpoint.py`, re-exported here): POSTs `/v1/completions` or, with
  `api="chat"`, `/v1/chat/completions` (temperature 0) with concurrency, timeouts and retries.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from longreach.engine.llm import SamplingParams
from longreach.eval.chat import ChatTemplateTokenizer
from longreach.eval.endpoint import ApproxTokenizer, EndpointBackend, EndpointError, completions_url
from longreach.eval.tasks import Tokenizer
from longreach.model.bundled import resolve_model_path
from longreach.model.generate import generate
from longreach.model.loader import load_model
from longreach.model.tokenizer import load_tokenizer

__all__ = [
    "ApproxTokenizer",
    "Backend",
    "EndpointBackend",
    "EndpointError",
    "LocalBackend",
    "completions_url",
]

IdsGenerator = Callable[[list[list[int]], int], list[list[int]]]  # (prompt ids, max_tokens) -> new ids


class Backend(Protocol):
    name: str
    tokenizer: Tokenizer

    def complete(self, prompts: list[str], max_tokens: int) -> list[str | Exception]: ...


# ---------------------------------------------------------------- local


def _engine_generator(
    LLM,
    SamplingParams,
    model,
    tokenizer,
    dtype,
    device,
    rope_scaling,
    kv_cache_dtype,
    max_model_len,
    batch_size: int,
    engine_kwargs: dict[str, Any],
) -> tuple[IdsGenerator, str]:
    kwargs = {
        "model": str(model) if isinstance(model, Path) else model,
        "tokenizer": tokenizer,
        "dtype": dtype,
        "device": device,
        "rope_scaling": rope_scaling,
        "kv_cache_dtype": kv_cache_dtype,
        "max_model_len": max_model_len,
        **engine_kwargs,
    }
    if "allow_long_max_model_len" in inspect.signature(LLM).parameters:
        kwargs.setdefault(
            "allow_long_max_model_len", True
        )  # evals probe past the supported length on purpose
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    params = inspect.signature(LLM).parameters
    sized = {"num_kv_blocks", "kv_cache_memory", "memory_fraction"} & set(kwargs)
    on_cpu = str(kwargs.get("device", "cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if "num_kv_blocks" in params and not sized and max_model_len and on_cpu:
        # on CPU, one batch of the longest prompts is all the engine holds here: size the cache for exactly that
        # instead of the engine's default share of free memory (slow to allocate, and greedy on a shared box);
        # on a GPU the engine's own sizing stands (it preempts and recomputes if blocks run out)
        default = params["block_size"].default if "block_size" in params else None
        block_size = (
            kwargs.get("block_size") or default or (32 if kwargs.get("kv_cache_dtype") == "int4" else 16)
        )
        kwargs["num_kv_blocks"] = batch_size * (math.ceil(max_model_len / block_size) + 1)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unsupported = sorted(set(kwargs) - set(params))
        if unsupported:
            raise ValueError(
                f"this build's serving engine (longreach.engine.llm.LLM) does not accept "
                f"{unsupported}; it accepts {sorted(params)}"
            )
    return _llm_runner(LLM(**kwargs), SamplingParams), "engine"


def _llm_runner(llm, SamplingParams) -> IdsGenerator:
    quiet = {"use_tqdm": False} if "use_tqdm" in inspect.signature(llm.generate).parameters else {}

    def run(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), **quiet)
        # outputs carry token_ids themselves, or vLLM-style under .outputs[0]
        return [list(o.token_ids if hasattr(o, "token_ids") else o.outputs[0].token_ids) for o in outputs]

    return run


def _reference_generator(model, stop_token_ids: Sequence[int]) -> tuple[IdsGenerator, str]:

    stops = tuple(stop_token_ids)

    def run(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        outputs = generate(model, prompts, max_tokens=max_tokens, stop_token_ids=stops)
        return [
            out[:-1] if out and out[-1] in stops else out for out in outputs
        ]  # generate keeps the stop token

    return run, "contiguous-cache generator"


def _local_generator(
    model,
    tokenizer,
    dtype,
    device,
    rope_scaling,
    kv_cache_dtype,
    max_model_len,
    batch_size: int,
    engine_kwargs: dict[str, Any],
    stop_token_ids: Sequence[int],
) -> tuple[IdsGenerator, str]:
    """The single switch between the two local generation paths.

    The paged serving engine (continuous batching, chunked prefill, KV dtypes) answers whenever
    `longreach.engine.llm` is importable; in a build without it, the contiguous-cache reference generator
    answers instead (the same greedy tokens, but no KV-cache options).
    """
    LLM, SamplingParams = _import_engine()
    if LLM is not None:
        return _engine_generator(
            LLM,
            SamplingParams,
            model,
            tokenizer,
            dtype,
            device,
            rope_scaling,
            kv_cache_dtype,
            max_model_len,
            batch_size,
            engine_kwargs,
        )
    if kv_cache_dtype is not None:
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} needs the paged serving engine "
            "(longreach.engine.llm), which this build does not have"
        )
    if engine_kwargs:
        raise ValueError(
            f"engine options {sorted(engine_kwargs)} need the paged serving engine "
            "(longreach.engine.llm), which this build does not have"
        )
    model = _reference_model(model, dtype, device, rope_scaling)
    stops = tuple(model.config.eos_token_ids) or tuple(stop_token_ids)
    return _reference_generator(model, stops)


def _import_engine():
    """(LLM, SamplingParams) of the paged serving engine, or (None, None) in a build without it."""
    try:
        from longreach.engine.llm import (  # lazy: optional: a build without the engine falls back to the reference generator
            LLM,
            SamplingParams,
        )
    except ModuleNotFoundError as exc:
        if exc.name not in ("longreach.engine.llm", "longreach.engine"):
            raise  # the engine exists but one of its imports is broken: say so
        return None, None
    return LLM, SamplingParams


def _reference_model(model, dtype, device, rope_scaling):
    """The model the reference generator runs: a checkpoint directory loaded with the options, or the
    given model object moved to `device` (a loaded model's rope and dtype are already fixed)."""
    if isinstance(model, Path):
        return load_model(
            model,
            dtype=dtype,
            rope_scaling=rope_scaling,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        )
    if rope_scaling is not None or dtype is not None:
        raise ValueError(
            "rope_scaling and dtype apply when loading a checkpoint; pass a directory, not a model"
        )
    return model.to(device) if device is not None else model


class LocalBackend:
    """Greedy generation on this machine.

    model: a checkpoint directory (None: the bundled demo model), an `LLM`, or a loaded `LlamaForCausalLM`
    (then pass `tokenizer`). device: where the model runs (default: CUDA when available). rope_scaling: a
    dict overriding the checkpoint's rope config. kv_cache_dtype and engine_kwargs go to the paged engine
    (an error without one). max_model_len: the longest prompt + answer
    the engine must accept; the runner raises it to its longest length (`ensure_max_len`).
    The engine is built on first use, so `ensure_max_len` costs nothing before then; unless engine_kwargs
    size its KV cache, it gets blocks for one batch of `batch_size` prompts of `max_model_len` tokens.
    """

    def __init__(
        self,
        model=None,
        *,
        tokenizer: Tokenizer | None = None,
        dtype: str | None = None,
        device: str | None = None,
        rope_scaling: dict | None = None,
        kv_cache_dtype: str | None = None,
        max_model_len: int | None = None,
        batch_size: int = 8,
        engine_kwargs: dict | None = None,
        name: str | None = None,
        apply_chat_template: bool = False,
    ):
        """apply_chat_template: each prompt goes to the model as one user turn of the tokenizer's chat
        template (`ChatTemplateTokenizer`), and is sized with the template's tokens counted."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if model is None or isinstance(model, (str, Path)):
            model = resolve_model_path(None if model is None else str(model))
            if not Path(model).is_dir():
                raise FileNotFoundError(f"model directory {str(model)!r} does not exist")
        self._model = model
        if tokenizer is None and hasattr(model, "get_tokenizer"):  # an LLM knows its tokenizer
            tokenizer = model.get_tokenizer()
        if tokenizer is None:
            if not isinstance(model, Path):
                raise ValueError("pass tokenizer= along with a model object")
            tokenizer = load_tokenizer(model)
        self.tokenizer = ChatTemplateTokenizer(tokenizer) if apply_chat_template else tokenizer
        self.name = name or (model.name if isinstance(model, Path) else type(model).__name__)
        self.batch_size = batch_size
        self.max_model_len = max_model_len
        self._options = (dtype, device, rope_scaling, kv_cache_dtype, dict(engine_kwargs or {}))
        self._generator: IdsGenerator | None = None
        self.kind: str | None = None  # "engine" or "contiguous-cache generator" once built
        if type(model).__name__ == "LLM":  # an engine built by the caller
            self._generator, self.kind = _llm_runner(model, SamplingParams), "engine"

    def ensure_max_len(self, num_tokens: int) -> None:
        if self._generator is None or self.kind != "engine" or type(self._model).__name__ == "LLM":
            self.max_model_len = max(self.max_model_len or 0, num_tokens)
            return
        if (self.max_model_len or 0) < num_tokens:  # the engine was sized for shorter prompts: rebuild it
            self.max_model_len = num_tokens
            self._generator = None

    def _generate(self) -> IdsGenerator:
        if self._generator is None:
            dtype, device, rope_scaling, kv_cache_dtype, engine_kwargs = self._options
            stop_token_ids = tuple(getattr(self.tokenizer, "eos_token_ids", ()) or ())
            self._generator, self.kind = _local_generator(
                self._model,
                self.tokenizer,
                dtype,
                device,
                rope_scaling,
                kv_cache_dtype,
                self.max_model_len,
                self.batch_size,
                engine_kwargs,
                stop_token_ids,
            )
        return self._generator

    def complete(self, prompts: list[str], max_tokens: int) -> list[str | Exception]:
        generate = self._generate()
        results: list[str | Exception] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = [self.tokenizer.encode(p) for p in prompts[start : start + self.batch_size]]
            try:
                outputs: list[list[int] | Exception] = list(generate(batch, max_tokens))
            except Exception:  # isolate the failing prompt(s): each is retried alone
                outputs = []
                for ids in batch:
                    try:
                        outputs.append(generate([ids], max_tokens)[0])
                    except Exception as exc:
                        outputs.append(exc)
            results += [o if isinstance(o, Exception) else self.tokenizer.decode(o) for o in outputs]
        return results

    def close(self) -> None:
        self._generator = None
