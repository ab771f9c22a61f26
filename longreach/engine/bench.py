"""`longreach bench`: offline throughput of the serving engine on random prompts (nano-vllm's bench.py).

    longreach bench --model DIR --num-prompts 64 --min-input 128 --max-input 2048 --output-len 64
    longreach bench --random-model 34m            # no checkpoint needed: a random-init Llama

Prompts are random token ids with lengths uniform in [min-input, max-input]; every request generates
exactly `output-len` tokens (EOS ignored). Reports output tokens/s, total tokens/s, mean and p90
time-to-first-token and the decode rate, as JSON with --json.
"""

from __future__ import annotations

import json
import random
import time

RANDOM_MODELS = {
    "34m": dict(
        vocab_size=32000,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
}


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="Hugging Face checkpoint directory (default: the bundled demo model)")
    parser.add_argument(
        "--random-model", choices=sorted(RANDOM_MODELS), help="benchmark a random-init Llama instead"
    )
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--min-input", type=int, default=128)
    parser.add_argument("--max-input", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--dtype", default=None, help="fp32 / bf16 / fp16 (default: the checkpoint's; fp32 for random)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--kv-cache-memory", type=int, default=None, help="KV cache bytes (default: sized to the run)"
    )
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA-graph decode (CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _check(args) -> None:
    for name in ("num_prompts", "min_input", "output_len"):
        if getattr(args, name) < 1:
            raise SystemExit(
                f"longreach bench: --{name.replace('_', '-')}={getattr(args, name)} must be >= 1"
            )
    if args.max_input < args.min_input:
        raise SystemExit(
            f"longreach bench: --max-input={args.max_input} is below --min-input={args.min_input}"
        )


def _build_model(args):
    import torch

    from longreach.model.loader import (  # lazy: CLI verb, keeps --help fast
        build_model,
        load_model,
        resolve_dtype,
    )

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.random_model:
        from longreach.config import ModelConfig  # lazy: CLI verb, keeps --help fast

        shape = RANDOM_MODELS[args.random_model]
        cfg = ModelConfig.from_hf_dict(
            {
                "model_type": "llama",
                **shape,
                "rope_theta": 10000.0,
                "max_position_embeddings": args.max_input + args.output_len,
            }
        )
        return build_model(cfg, dtype=resolve_dtype(args.dtype) or torch.float32, device=device)
    from longreach.model.bundled import resolve_model_path  # lazy: CLI verb, keeps --help fast

    return load_model(resolve_model_path(args.model), dtype=args.dtype, device=device)


def _random_prompts(args, vocab_size: int) -> list[list[int]]:
    """Random token ids, lengths uniform in [min-input, max-input], reproducible from --seed."""
    rng = random.Random(args.seed)
    return [
        [rng.randrange(vocab_size) for _ in range(rng.randint(args.min_input, args.max_input))]
        for _ in range(args.num_prompts)
    ]


def _kv_bytes_for_run(args, model, prompts: list[list[int]]) -> int:
    """Room for every request at once: its prompt, its output and one block of rounding slack."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    return per_token * (sum(map(len, prompts)) + args.num_prompts * (args.output_len + args.block_size))


def _build_engine(args, model, prompts: list[list[int]]):
    from longreach.engine.llm import LLM  # lazy: CLI verb, keeps --help fast

    kv_bytes = args.kv_cache_memory
    if kv_bytes is None:
        kv_bytes = _kv_bytes_for_run(args, model, prompts)
    return LLM(
        model,
        max_model_len=args.max_input + args.output_len,
        block_size=args.block_size,
        kv_cache_memory=kv_bytes,
        enable_prefix_caching=not args.no_prefix_caching,
        max_num_seqs=args.max_num_seqs,
        enforce_eager=args.enforce_eager,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
    )


def _timed_generate(args, llm, prompts: list[list[int]]) -> tuple[list, float, float]:
    """(outputs, start time, seconds): a short warm-up first keeps one-time setup out of the timing."""
    from longreach.engine.sampler import SamplingParams  # lazy: CLI verb, keeps --help fast

    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not args.json)
    return outs, start, time.perf_counter() - start


def _summary(llm, prompts: list[list[int]], outs: list, start: float, seconds: float) -> dict:
    """Throughput, time to first token and decode rate of the timed run, plus the engine's KV counters."""
    num_out = sum(len(o.token_ids) for o in outs)
    num_in = sum(map(len, prompts))
    ttfts = sorted(o.metrics.first_token_time - start for o in outs)
    rates = [o.metrics.decode_tokens_per_s for o in outs if o.metrics.decode_tokens_per_s]
    return dict(
        num_prompts=len(prompts),
        input_tokens=num_in,
        output_tokens=num_out,
        seconds=round(seconds, 3),
        output_tokens_per_s=round(num_out / seconds, 1),
        total_tokens_per_s=round((num_in + num_out) / seconds, 1),
        mean_ttft_s=round(sum(ttfts) / len(ttfts), 3),
        p90_ttft_s=round(ttfts[int(0.9 * (len(ttfts) - 1))], 3),
        mean_decode_tokens_per_s_per_request=round(sum(rates) / len(rates), 1) if rates else None,
        preemptions=llm.engine.scheduler.num_preemptions,
        kv_blocks=llm.engine.num_kv_blocks,
    )


def main(args) -> int:
    import torch

    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _build_model(args)
    prompts = _random_prompts(args, model.config.vocab_size)
    llm = _build_engine(args, model, prompts)
    outs, start, seconds = _timed_generate(args, llm, prompts)
    result = _summary(llm, prompts, outs, start, seconds)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:40s} {value}")
    return 0
