"""One request of 1,048,576 tokens on one GPU: chunked prefill, then 128 decoded tokens, with int4 KV.

The model is a ~1.2B-parameter Llama-class decoder with Llama 3.2 1B's shape (hidden 2048, 16 layers, 32 query
and 8 KV heads of 64, SwiGLU 8192, vocabulary 128,256, tied embeddings) and RANDOM weights: the figures are
speed and memory, not answers. The prompt is random token ids. Beside the 1M-token int4 request, bf16 and int8
KV run 262,144 tokens (bf16 KV at 1M would be 32 GiB of cache; it is the int4 case's comparison, not the goal).

Per case: time to first token (the whole chunked prefill), decode tokens/s over the 128 tokens, the whole
request's wall time, the KV cache's size and peak GPU memory (torch.cuda.max_memory_allocated, weights and
cache included). Results go to --out as million.json (rewritten after each case, so a time limit still leaves
the finished ones) and million.md.

    python benchmarks/million.py --out out/                   # GPU: int4 at 1M, bf16 and int8 at 256K
    python benchmarks/million.py --rehearse --out /tmp/m      # CPU, toy sizes, the same code path

--rehearse runs the same engine calls on CPU with a tiny random model (2 layers, head_dim 32), 2,048 tokens
(int4) and 512 (bf16/int8), 256-token chunks and 8 decoded tokens: a check that the script works, in seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ONE_B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TOY = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
GPU_CASES = "int4:1048576,bf16:262144,int8:262144"
TOY_CASES = "int4:2048,bf16:512,int8:512"


def parse_cases(text: str) -> list[tuple[str, int]]:
    """'int4:1048576,bf16:262144' -> [('int4', 1048576), ('bf16', 262144)]."""
    cases = []
    for item in text.split(","):
        kv, _, length = item.partition(":")
        if (
            kv not in ("int4", "int8", "bf16", "fp16", "fp32", "fp8")
            or not length.isdigit()
            or int(length) < 2
        ):
            raise SystemExit(
                f"--cases item {item!r} must be KV_DTYPE:TOKENS (int4/int8/bf16/...; tokens >= 2)"
            )
        cases.append((kv, int(length)))
    return cases


def build_model(shape: dict, max_len: int, dtype: torch.dtype, device: str):
    from longreach.config import ModelConfig
    from longreach.model.loader import build_model as build

    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict({**shape, "max_position_embeddings": max_len})
    return build(cfg, dtype=dtype, device=device)


def run_case(model, kv_dtype: str, num_tokens: int, args) -> dict:
    """One request of `num_tokens` random tokens, then `args.decode_tokens` greedy tokens."""
    from longreach import LLM, SamplingParams

    device = next(model.parameters()).device
    max_len = num_tokens + args.decode_tokens + 1
    llm = LLM(
        model,
        max_model_len=max_len,
        max_num_seqs=1,
        max_num_batched_tokens=args.chunk,
        enable_prefix_caching=False,
        kv_cache_dtype=kv_dtype,
        memory_fraction=args.memory_fraction if device.type == "cuda" else None,
        kv_cache_memory=None if device.type == "cuda" else 64 * 2**20,
    )
    vocab = model.config.vocab_size
    warm = [(7 * i) % vocab for i in range(min(num_tokens, 2 * args.chunk) - 1)]
    llm.generate([warm], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(0, vocab, (num_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
    out, wall = _generate_with_progress(llm.engine, prompt, params)
    m = out.metrics
    result = dict(
        kv_cache_dtype=kv_dtype,
        prompt_tokens=num_tokens,
        decoded_tokens=len(out.token_ids),
        ttft_s=round(m.first_token_time - m.arrival_time, 3),
        decode_tokens_per_s=round(m.decode_tokens_per_s, 2) if m.decode_tokens_per_s else None,
        request_s=round(wall, 3),
        kv_cache_gib=round(llm.engine.kv_cache_bytes_total / 2**30, 4),
        max_kv_gib=round(m.max_kv_bytes / 2**30, 4),
        max_kv_bytes=m.max_kv_bytes,
        chunk_tokens=args.chunk,
    )
    if device.type == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    del llm
    gc.collect()  # the next case sizes its cache from the free memory: free this one's first
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _generate_with_progress(engine, prompt: list[int], params, every_s: float = 10.0):
    """(finished output, seconds): the request stepped by hand, printing progress every `every_s` seconds so a
    run cut short by a time limit still shows how far the prefill got and at what rate."""
    request_id = engine.add_request(prompt, params)
    start = last = time.perf_counter()
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished and o.request_id == request_id), out)
        now = time.perf_counter()
        seq = engine.requests.get(request_id)
        if seq is not None and now - last >= every_s:
            done = seq.num_computed_tokens
            print(f"  {done:,}/{len(prompt):,} prompt tokens computed, {seq.num_output_tokens} decoded, "
                  f"{now - start:.1f} s ({done / (now - start):,.0f} tok/s)", flush=True)  # fmt: skip
            last = now
    return out, time.perf_counter() - start


def _markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"model: {meta['model']}, {meta['params_b']:.2f}B parameters, random weights, {meta['dtype']}, "
        f"{meta['device']}; chunk {meta['chunk']} tokens",
        "",
        "| KV | prompt tokens | TTFT s | decode tok/s | whole request s | KV held GiB | KV cache GiB | peak GPU GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['kv_cache_dtype']} | {r['prompt_tokens']:,} | {r['ttft_s']} | {r['decode_tokens_per_s']} "
            f"| {r['request_s']} | {r['max_kv_gib']} | {r['kv_cache_gib']} | {r.get('peak_gpu_gib', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rehearse", action="store_true", help="CPU, toy model and lengths")
    parser.add_argument(
        "--cases", default=None, help=f"KV:TOKENS,... (default {GPU_CASES}; rehearse {TOY_CASES})"
    )
    parser.add_argument("--decode-tokens", type=int, default=None, help="default 128 (rehearse 8)")
    parser.add_argument(
        "--chunk", type=int, default=None, help="prefill chunk tokens (default 65536; rehearse 256)"
    )
    parser.add_argument("--memory-fraction", type=float, default=0.9)
    parser.add_argument("--out", default="out")
    args = parser.parse_args(argv)
    rehearse = args.rehearse
    cases = parse_cases(args.cases or (TOY_CASES if rehearse else GPU_CASES))
    args.decode_tokens = args.decode_tokens or (8 if rehearse else 128)
    args.chunk = args.chunk or (256 if rehearse else 65536)
    if not rehearse and not torch.cuda.is_available():
        raise SystemExit("million.py needs a CUDA GPU; --rehearse runs it on CPU at toy sizes")
    device, dtype = ("cpu" if rehearse else "cuda"), torch.bfloat16
    os.environ.setdefault("LONGREACH_ALLOW_LONG_MAX_MODEL_LEN", "1")
    longest = max(n for _, n in cases) + args.decode_tokens + 1
    model = build_model(TOY if rehearse else ONE_B, longest, dtype, device)
    meta = dict(
        model="toy" if rehearse else "Llama-3.2-1B-shaped",
        params_b=sum(p.numel() for p in model.parameters()) / 1e9,
        dtype=str(dtype).removeprefix("torch."),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        chunk=args.chunk,
        decode_tokens=args.decode_tokens,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for kv_dtype, num_tokens in cases:
        print(f"{kv_dtype} KV, {num_tokens:,} tokens ...", flush=True)
        results.append(run_case(model, kv_dtype, num_tokens, args))
        print(json.dumps(results[-1]), flush=True)
        (out / "million.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    (out / "million.md").write_text(_markdown(results, meta))
    print(_markdown(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
