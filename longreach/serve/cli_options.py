"""The `longreach serve` flags that follow `vllm serve` by name and meaning, and what each turns into.

--gpu-memory-utilization F      the engine may use fraction F of the device's memory in all (weights,
                                activations, KV cache); the KV cache gets the rest. On a CPU there is no
                                device memory to share out: F becomes the KV cache's share of the memory
                                available once the weights are loaded (as --kv-cache-memory F would)
--tensor-parallel-size N        N ranks, each holding 1/N of every layer (started by the server itself)
--[no-]enable-chunked-prefill   split long prompts over steps (on by default)
--chat-template FILE            a Jinja template replacing the checkpoint's (a file, or the template text)
--generation-config auto|vllm|DIR   sampling defaults for fields a request omits (generation_config.py)

Also the value parsers of the other flags: sizes with units (`parse_size`, `parse_kv_memory`), ports and
positive integers.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'4GiB', '512MB', '1e9', '123' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes, or a number with a unit such as 512MiB, 4GiB, 8GB"
        )
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least one byte")
    return value


def parse_kv_memory(text: str) -> int | float:
    """--kv-cache-memory: a size with its unit ('4GiB', '512MiB', '123B') or, written with a decimal point, a
    fraction of the free memory ('0.5', '1.0'). A bare number ('1', '4000000000') is refused: '1' read as
    one byte, or as all the memory, would be a trap either way."""
    if re.fullmatch(r"\s*[0-9]*\.[0-9]+\s*", text) and float(text) <= 1.0:
        if float(text) <= 0.0:
            raise argparse.ArgumentTypeError(f"{text!r}: a fraction of the free memory must be in (0, 1]")
        return float(text)
    if re.fullmatch(r"\s*[0-9.eE+]+\s*", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} has no unit: give a size such as 4GiB, 512MiB or {text.strip()}B (bytes), or a "
            "fraction of the free memory with a decimal point, such as 0.5 or 1.0"
        )
    return parse_size(text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0..65535 (0 picks a free port)")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a fraction of the device memory must be in (0, 1]")
    return value


def _tp_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: the tensor-parallel size must be >= 1")
    return value


def add_vllm_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the module docstring."""
    parser.add_argument(
        "--gpu-memory-utilization",
        type=_fraction,
        default=None,
        metavar="F",
        help="fraction of the GPU's memory the engine may use in all; the KV cache gets what the weights "
        "and activations leave (vLLM's meaning). On a CPU: the KV cache's share of the memory available "
        "after loading. Excludes --kv-cache-memory / --num-kv-blocks",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=_tp_size,
        default=1,
        metavar="N",
        help="shard the model over N processes the server starts itself (gloo on CPU, NCCL on GPUs); "
        "under torchrun, its N ranks are used instead (default 1)",
    )
    parser.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefill prompts longer than --max-num-batched-tokens over several steps (default on; off "
        "needs --max-num-batched-tokens >= --max-model-len)",
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template replacing the checkpoint's: a file, or the template itself",
    )
    parser.add_argument(
        "--generation-config",
        default="auto",
        metavar="auto|vllm|DIR",
        help="sampling defaults for what a request omits (temperature, top_p, top_k, min_p, "
        "repetition_penalty, max_tokens): 'auto' the checkpoint's generation_config.json, 'vllm' the "
        "built-in ones, DIR another generation_config.json (default auto)",
    )


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the value itself when it is a template (has Jinja markup)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r}: no such file (and not a Jinja template either)")


def override_chat_template(tokenizer, template: str) -> None:
    """Make `template` the tokenizer's chat template (its default and its only named one)."""
    if tokenizer is None:
        raise ValueError("--chat-template: this model has no tokenizer to apply a chat template with")
    from longreach.model.chat_template import _compile_template  # lazy: jinja only when a template is given

    try:
        _compile_template(template)
    except Exception as exc:  # noqa: BLE001  (jinja's syntax errors have several types)
        raise ValueError(f"--chat-template: not a valid Jinja template: {exc}") from None
    tokenizer.chat_template = template
    if hasattr(tokenizer, "chat_templates"):
        tokenizer.chat_templates = {"default": template}


def kv_sizing(args, on_cuda: bool) -> tuple[dict, float | None]:
    """(LLM's KV-sizing keywords, the --gpu-memory-utilization fraction still to apply on CUDA or None)."""
    fraction = args.gpu_memory_utilization
    if fraction is None:
        return {"kv_cache_memory": args.kv_cache_memory, "num_kv_blocks": args.num_kv_blocks}, None
    if args.kv_cache_memory is not None or args.num_kv_blocks is not None:
        raise ValueError(
            "--gpu-memory-utilization sizes the KV cache itself; drop --kv-cache-memory / --num-kv-blocks "
            "or drop it"
        )
    if not on_cuda:
        return {"kv_cache_memory": fraction}, None
    from longreach.serve.startup import warmup_blocks  # lazy: the engine's modules, only on CUDA

    block_size = args.block_size or (32 if args.kv_cache_dtype == "int4" else 16)
    max_len = args.max_model_len or args.max_num_batched_tokens
    return {"num_kv_blocks": warmup_blocks(block_size, args.max_num_batched_tokens, max_len)}, fraction
