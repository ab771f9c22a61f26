"""`longreach serve [MODEL]`: the OpenAI-compatible server (flags follow `vllm serve`).

    longreach serve path/to/checkpoint --port 8000 --api-key secret --max-model-len 32768
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "path/to/checkpoint", "prompt": "... The pass key is 48213. ... The pass key is", "max_tokens": 8}'

Without MODEL it serves the demo model bundled with the package. Bad flags and unusable checkpoints end
with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import sys

# The announced curl: a pass-key prompt (the README's), which the bundled model answers with 48213.
EXAMPLE_PROMPT = (
    "The grass is green. The pass key is 48213. Remember it. 48213 is the pass key. The sky is blue. "
    "What is the pass key? The pass key is"
)
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


class CLIError(Exception):
    """A bad flag or an unusable model: printed as one line, exit status 2."""


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
    """--kv-cache-memory: a size ('4GiB', '123') or, written with a decimal point, a fraction ('0.5')."""
    if re.fullmatch(r"\s*[0-9]*\.[0-9]+\s*", text) and float(text) <= 1.0:
        if float(text) <= 0.0:
            raise argparse.ArgumentTypeError(f"{text!r}: a fraction of the free memory must be in (0, 1]")
        return float(text)
    return parse_size(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0..65535 (0 picks a free port)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_server_arguments(parser)
    _add_model_arguments(parser)
    _add_cache_arguments(parser)


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="Hugging Face checkpoint directory (default: the demo model bundled with the package)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LONGREACH_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LONGREACH_API_KEY, else none)",
    )
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) clients use in 'model' (default: MODEL as given, or 'longreach-demo')",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=parse_size,
        default=None,
        help="largest request body; bigger ones get 413 (default 8MiB)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests may still run before they are aborted (default 30)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help="longest prompt + completion in tokens (default: what the model's rope supports; more is "
        "refused unless LONGREACH_ALLOW_LONG_MAX_MODEL_LEN=1)",
    )
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument(
        "--quantization",
        choices=["int8", "int4"],
        default=None,
        help="weight-only quantization applied at load (default: none, or as the checkpoint was saved)",
    )
    parser.add_argument(
        "--rope-scaling",
        default=None,
        help='JSON rope dict overriding the checkpoint, e.g. \'{"rope_type": "yarn", "factor": 4, '
        '"original_max_position_embeddings": 8192}\'',
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling (default 0)")
    parser.add_argument(
        "--batch-invariant",
        action="store_true",
        help="bitwise the same tokens and logprobs for a request whatever else is batched with it, however "
        "its prompt is chunked (slower; also LONGREACH_BATCH_INVARIANT=1; see docs/serving.md)",
    )


def _add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="KV-cache storage: auto (the model dtype) or a quantized/other dtype the engine "
        "supports (bf16, fp16, fp32, int8, fp8 = e4m3 or fp8_e4m3, int4)",
    )
    parser.add_argument(
        "--kv-policy",
        default="none",
        help="KV eviction: none | window:W | sinks:W (4 sinks; or sinks:window=W,num_sinks=S) | "
        "h2o:B (B heavy + B recent; or h2o:heavy=H,recent=R). Memory per request stays bounded; "
        "positions are not re-rotated (default none)",
    )
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="share the KV blocks of identical prompt prefixes (default on)",
    )
    parser.add_argument(
        "--max-num-seqs", type=_positive_int, default=256, help="requests per step (default 256)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=2048,
        help="tokens per step; longer prompts are prefilled in chunks (default 2048)",
    )
    parser.add_argument(
        "--block-size",
        type=_positive_int,
        default=None,
        help="tokens per KV block (default 16; 32 with --kv-cache-dtype int4)",
    )
    parser.add_argument(
        "--kv-cache-memory",
        type=parse_kv_memory,
        default=None,
        help="bytes for the KV cache, e.g. 4GiB, or a fraction of the free memory, e.g. 0.3 "
        "(default: 0.9 on a GPU, 0.5 on a CPU)",
    )
    parser.add_argument(
        "--num-kv-blocks",
        type=_positive_int,
        default=None,
        help="exact number of KV blocks (overrides --kv-cache-memory)",
    )


def parse_rope_scaling(text: str | None) -> dict | None:
    from longreach.rope import parse_rope_scaling_arg  # lazy: CLI verb, keeps --help fast

    try:
        return parse_rope_scaling_arg(text)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def kv_cache_dtype_kwargs(value: str | None, llm_cls) -> dict:
    """Pass --kv-cache-dtype to the engine when it takes one; 'auto' needs nothing. A value the engine
    cannot store is refused here, with the accepted values."""
    if value is None or value == "auto":
        return {}
    accepted = ("auto",)
    try:
        from longreach.kvcache.quant import KV_CACHE_DTYPES  # lazy: CLI verb, keeps --help fast

        accepted = tuple(KV_CACHE_DTYPES)
    except ImportError:
        pass
    if value not in accepted:
        raise CLIError(f"--kv-cache-dtype {value!r} is not supported; accepted: {', '.join(accepted)}")
    if "kv_cache_dtype" not in inspect.signature(llm_cls).parameters:
        raise CLIError(
            f"--kv-cache-dtype {value!r}: this build's engine stores the KV cache in the model dtype "
            "only; accepted: auto"
        )
    return {"kv_cache_dtype": value}


def build_app(args):
    """(app, served model names) from parsed arguments; CLIError for anything the user must fix."""
    from longreach.engine.llm import LLM  # lazy: CLI verb, keeps --help fast
    from longreach.model.bundled import resolve_model_path  # lazy: CLI verb, keeps --help fast
    from longreach.serve.server import (  # lazy: CLI verb, keeps --help fast
        DEFAULT_MAX_REQUEST_BYTES,
        create_app,
    )

    if args.shutdown_timeout < 0:
        raise CLIError(f"--shutdown-timeout {args.shutdown_timeout} must be >= 0 seconds")
    rope_scaling = parse_rope_scaling(args.rope_scaling)
    kv_kwargs = _storage_kwargs(args, LLM)
    try:
        path = resolve_model_path(args.model)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    if not path.is_dir():
        raise CLIError(f"{path}: no such checkpoint directory")
    names = args.served_model_name or [args.model if args.model is not None else "longreach-demo"]
    try:
        llm = LLM(
            path,
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
            block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory,
            num_kv_blocks=args.num_kv_blocks,
            enable_prefix_caching=args.enable_prefix_caching,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            rope_scaling=rope_scaling,
            seed=args.seed,
            batch_invariant=args.batch_invariant or None,
            **kv_kwargs,
        )
    except (ValueError, FileNotFoundError, KeyError, TypeError, RuntimeError) as exc:
        raise CLIError(f"cannot serve {str(path)!r}: {exc}") from None
    _warn_about_limits(llm.engine)
    max_request_bytes = args.max_request_bytes or DEFAULT_MAX_REQUEST_BYTES
    app = create_app(llm.engine, names, api_key=args.api_key or None, max_request_bytes=max_request_bytes)
    return app, names


def _storage_kwargs(args, llm_cls) -> dict:
    """The engine's KV dtype, eviction policy and weight quantization from the flags."""
    from longreach.kvcache.policies import parse_policy_spec  # lazy: CLI verb, keeps --help fast

    kwargs = kv_cache_dtype_kwargs(args.kv_cache_dtype, llm_cls)
    try:
        policy, policy_args = parse_policy_spec(args.kv_policy)
    except ValueError as exc:
        raise CLIError(f"--kv-policy: {exc}") from None
    if policy != "none":
        kwargs.update(kv_policy=policy, kv_policy_args=policy_args)
    if args.quantization is not None:
        kwargs["quantization"] = args.quantization
    return kwargs


def _warn_about_limits(engine) -> None:
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


def main(args) -> int:
    try:
        app, names = build_app(args)
    except CLIError as exc:
        print(f"longreach serve: error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from longreach.serve.server import Server  # lazy: CLI verb, keeps --help fast

    def announce(server: Server) -> None:
        host = args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1"
        url = f"http://{host}:{server.bound_port}"
        auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""
        body = json.dumps({"model": names[0], "prompt": EXAMPLE_PROMPT, "max_tokens": 8})
        print(
            f"longreach serve: serving {names[0]!r} at {url}/v1 (metrics at {url}/metrics)\n"
            f"  try: curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
            file=sys.stderr,
            flush=True,
        )

    logging.getLogger("longreach").setLevel(args.log_level.upper())
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on")
    server = Server(config, shutdown_timeout=args.shutdown_timeout, on_started=announce)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind the port (already logged)
        return int(exc.code or 1)
    return 0 if server.started else 1
