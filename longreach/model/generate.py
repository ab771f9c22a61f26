"""`longreach generate`: batched generation with a contiguous KV cache.

Usable before (and independently of) the paged serving engine; also its reference.
Sampling here is deliberately small: greedy, temperature, top-k and top-p.
"""

from __future__ import annotations

import sys
import time

import torch

from longreach.kvcache.contiguous import ContiguousKVCache
from longreach.model.llama import LlamaForCausalLM


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    max_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Generate up to max_tokens new ids for each prompt (lists of ids); stops at stop_token_ids (kept)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = ContiguousKVCache(model.config, len(prompts), max(map(len, prompts)) + max_tokens, dtype, device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    outputs: list[list[int]] = [[] for _ in prompts]
    is_done = [False] * len(prompts)
    step_ids = [list(p) for p in prompts]
    # length-dependent RoPE: each prompt keeps the tables of the most positions it can run, as in the engine
    rope_lengths = torch.tensor([len(p) + max_tokens - 1 for p in prompts], device=device)
    for _ in range(max_tokens):
        meta, positions = cache.prepare([len(ids) for ids in step_ids])
        last = meta.cu_seqlens_q[1:].long() - 1
        input_ids = torch.tensor([t for ids in step_ids for t in ids], device=device)
        rope_seq_len = torch.repeat_interleave(
            rope_lengths, torch.tensor([len(ids) for ids in step_ids], device=device)
        )
        logits = model(
            input_ids, positions, meta, kv_cache=cache, logits_indices=last, rope_seq_len=rope_seq_len
        )  # (B, V)
        cache.commit()
        next_ids = sample_next(logits, temperature, top_k, top_p, generator).tolist()
        for b, token in enumerate(next_ids):
            if not is_done[b]:
                outputs[b].append(token)
                is_done[b] = token in stop_token_ids
        if all(is_done):
            break
        step_ids = [[t] for t in next_ids]
    return outputs


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="Hugging Face checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored)")
    parser.add_argument(
        "--rope-scaling",
        default=None,
        help='JSON rope dict overriding the checkpoint, e.g. \'{"rope_type": "yarn", "factor": 4}\'',
    )
    parser.add_argument(
        "--quantization",
        choices=["int8", "int4"],
        default=None,
        help="weight-only quantization applied at load (default: none, or as saved)",
    )


def parse_rope_scaling(text: str | None) -> dict | None:
    from longreach.rope import parse_rope_scaling_arg  # lazy: CLI verb, keeps --help fast

    try:
        return parse_rope_scaling_arg(text)
    except ValueError as exc:
        raise SystemExit(f"longreach generate: {exc}") from None


def main(args) -> int:
    from longreach.model.bundled import resolve_model_path  # lazy: CLI verb, keeps --help fast
    from longreach.model.loader import load_model  # lazy: CLI verb, keeps --help fast
    from longreach.model.tokenizer import load_tokenizer  # lazy: CLI verb, keeps --help fast

    path = resolve_model_path(args.model)
    model = load_model(path, dtype=args.dtype, rope_scaling=parse_rope_scaling(args.rope_scaling))
    if args.quantization is not None:
        from longreach.model.quant import quantize_model  # lazy: CLI verb, keeps --help fast

        try:
            quantize_model(model, args.quantization)
        except ValueError as exc:
            raise SystemExit(f"--quantization {args.quantization}: {exc}") from None
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.encode(p) for p in args.prompt]
    start = time.perf_counter()
    stop = tuple(model.config.eos_token_ids) or tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
    outputs = generate(
        model, prompts, args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed, stop
    )
    elapsed = time.perf_counter() - start
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")  # no escape codes in pipes
    for prompt, out in zip(args.prompt, outputs):
        print(f"{prompt}{bold}{tokenizer.decode(out)}{plain}")
    num_new = sum(map(len, outputs))
    print(f"[{num_new} tokens in {elapsed:.2f} s: {num_new / elapsed:.1f} tokens/s]", file=sys.stderr)
    return 0
