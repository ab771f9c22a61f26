"""What each KV-cache lever costs and saves, measured in one run on one model: docs/tradeoffs.md.

Settings: full-precision KV (bf16), int8 KV, fp8 (e4m3) KV, int4 KV (KIVI-style), sliding window, attention sinks
(StreamingLLM), H2O and int8 weights. The three eviction policies get the same budget, a fraction of the
context (default 25%: window = budget, sinks = 4 + budget - 4, h2o = half heavy hitters + half recent).
For every setting and context length, through the serving engine (`LLM.generate`, greedy):

- accuracy on the evaluation runner's `passkey` and `niah` tasks (run_grid, string match);
- KV bytes per token: the most bytes of KV a request held (blocks + scales + int4's window slot, from the
  engine's per-request accounting) divided by its tokens;
- decode tokens/s of a batch of long prompts, and its ratio to the bf16 row measured in the same run.

Prompts are prefilled in chunks of `--chunk` tokens so eviction acts while the prompt is read, as it would
for a long stream: a policy that keeps a token only within one chunk cannot see it at the question.

    python benchmarks/tradeoffs.py                          # the bundled model, writes docs/tradeoffs.md
    python benchmarks/tradeoffs.py --lengths 512,1024 --samples 4 --out /tmp/t --settings bf16,int8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from longreach.engine.llm import LLM, SamplingParams
from longreach.eval.backends import LocalBackend
from longreach.eval.runner import GridResult, comparison_table, format_length, run_grid
from longreach.eval.tasks import make_sample
from longreach.model.bundled import resolve_model_path

SETTINGS = ["bf16", "int8", "fp8", "int4", "window", "sinks", "h2o", "h2o-block", "int8-weights"]
NUM_SINKS = 4


def engine_kwargs(setting: str, length: int, budget_ratio: float) -> dict:
    """LLM keywords of one setting at one context length (eviction budgets scale with it)."""
    budget = max(16, int(length * budget_ratio))
    if setting in ("bf16", "int8", "fp8", "int4"):
        return {"kv_cache_dtype": setting}
    if setting == "int8-weights":
        return {"kv_cache_dtype": "bf16", "quantization": "int8"}
    if setting == "window":
        return {"kv_cache_dtype": "bf16", "kv_policy": "window", "kv_policy_args": {"window": budget}}
    if setting == "sinks":
        return {
            "kv_cache_dtype": "bf16",
            "kv_policy": "sinks",
            "kv_policy_args": {"window": budget - NUM_SINKS, "num_sinks": NUM_SINKS},
        }
    if setting in ("h2o", "h2o-block"):
        return {
            "kv_cache_dtype": "bf16",
            "kv_policy": "h2o",
            "kv_policy_args": {
                "heavy": budget // 2,
                "recent": budget - budget // 2,
                "unit": "block" if setting == "h2o-block" else "token",
            },
        }
    raise ValueError(f"unknown setting {setting!r}; choose from {SETTINGS}")


def describe(setting: str, budget_ratio: float) -> str:
    pct = f"{100 * budget_ratio:g}%"
    return {
        "bf16": "KV in bf16 (the baseline)",
        "int8": "KV int8, per-token-per-head scales",
        "fp8": "KV fp8 e4m3, per-token-per-head scales",
        "int4": "KV int4, KIVI groups of 32 + a window of recent tokens in the model's dtype",
        "window": f"last {pct} of the context",
        "sinks": f"{NUM_SINKS} sink tokens + last {pct}",
        "h2o": f"{pct}: half heavy-hitter tokens, half recent",
        "h2o-block": f"{pct}: half heavy-hitter blocks, half recent",
        "int8-weights": "weights int8 per channel, KV bf16",
    }[setting]


def measure_decode(llm: LLM, tokenizer, length: int, batch: int, new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s of a batch of `length`-token prompts, KV bytes per token held at the peak).

    The clock starts once every prompt is prefilled and has its first token, so the rate is decode alone
    (chunked prefill of the later prompts would otherwise interleave with the first ones' decoding)."""
    engine = llm.engine
    prompts = [
        tokenizer.encode(make_sample("passkey", tokenizer, length - new_tokens, 50.0, i, 99).prompt)
        for i in range(batch)
    ]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done, generated, start = {}, 0, None
    while len(done) < len(ids):
        outputs = engine.step()
        if start is not None:
            generated += sum(len(o.delta_token_ids) for o in outputs)
        for o in outputs:
            if o.finished:
                done[o.request_id] = o
        if start is None and all(engine.requests[i].num_output_tokens > 0 for i in ids if i not in done):
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    outs = [done[i] for i in ids]
    per_token = [
        o.metrics.max_kv_bytes / (len(p) + o.metrics.num_generated_tokens) for o, p in zip(outs, prompts)
    ]
    return generated / elapsed, sum(per_token) / len(per_token)


def run(args) -> dict:
    model = resolve_model_path(args.model)
    rows = []
    for setting in args.settings:
        row = {
            "setting": setting,
            "what": describe(setting, args.budget),
            "accuracy": {},
            "kv_bytes_per_token": {},
            "decode_tok_s": {},
        }
        grids = {task: [] for task in args.tasks}
        for length in args.lengths:
            kwargs = engine_kwargs(setting, length, args.budget)
            llm = LLM(
                model,
                dtype=args.dtype,
                max_model_len=length + 64,
                allow_long_max_model_len=True,
                enable_prefix_caching=False,
                max_num_batched_tokens=args.chunk,
                max_num_seqs=args.batch,
                num_kv_blocks=args.batch * (length // 16 + 8),
                **kwargs,
            )
            backend = LocalBackend(llm, batch_size=args.batch, name=setting)
            for task in args.tasks:
                grids[task].append(
                    run_grid(
                        backend,
                        task,
                        [length],
                        depths=args.depths,
                        num_samples=args.samples,
                        seed=args.seed,
                        batch_size=args.batch,
                        setting=setting,
                        progress=not args.quiet,
                    )
                )
            tok_s, per_token = measure_decode(llm, llm.get_tokenizer(), length, args.batch, args.new_tokens)
            row["decode_tok_s"][length], row["kv_bytes_per_token"][length] = tok_s, per_token
            print(
                f"{setting:>13} {format_length(length):>5}: "
                + " ".join(f"{t} {100 * grids[t][-1].accuracy(length):.0f}%" for t in args.tasks)
                + f"  KV {per_token:,.0f} B/token  decode {tok_s:,.0f} tok/s",
                file=sys.stderr,
            )
            del llm, backend
        for task, parts in grids.items():
            merged = GridResult(
                task=task,
                model=parts[0].model,
                lengths=list(args.lengths),
                depths=parts[0].depths,
                num_samples=args.samples,
                seed=args.seed,
                setting=setting,
                samples=[s for g in parts for s in g.samples],
            )
            row["accuracy"][task] = {length: merged.accuracy(length) for length in args.lengths}
            grids[task] = merged
        row["grids"] = grids
        rows.append(row)
    return {"model": str(model), "rows": rows}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def markdown(result: dict, args, command: str, elapsed: float) -> str:
    rows, lengths, longest = result["rows"], args.lengths, args.lengths[-1]
    base = next((r for r in rows if r["setting"] == "bf16"), rows[0])
    head = (
        ["setting", "what"]
        + [f"{t} {format_length(n)}" for t in args.tasks for n in lengths]
        + [
            f"KV B/token @{format_length(longest)}",
            "KV vs bf16",
            f"decode tok/s @{format_length(longest)}",
            "vs bf16",
        ]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kv, tok = r["kv_bytes_per_token"][longest], r["decode_tok_s"][longest]
        cells = [f"`{r['setting']}`", r["what"]] + [
            _pct(r["accuracy"][t][n]) for t in args.tasks for n in lengths
        ]
        cells += [
            f"{kv:,.0f}",
            f"{kv / base['kv_bytes_per_token'][longest]:.2f}x",
            f"{tok:,.0f}",
            f"{tok / base['decode_tok_s'][longest]:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return "\n".join(
        [
            "## Measured table",
            "",
            f"Model `{Path(result['model']).name}`, compute in {args.dtype} on {device} ({torch.get_num_threads()} threads), "
            f"{args.samples} samples per task, length and depth ({', '.join(args.tasks)} at depths "
            f"{', '.join(f'{d:g}' for d in args.depths)}%), greedy, "
            f"prefill chunks of {args.chunk} tokens, eviction budget {100 * args.budget:g}% of the context; "
            f"decode speed: {args.batch} prompts x {args.new_tokens} new tokens. Whole run: {elapsed / 60:.1f} min.",
            "",
            "```",
            command,
            "```",
            "",
            *lines,
            "",
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list from {SETTINGS}")
    parser.add_argument("--lengths", default="512,1024,2048,4096", help="context lengths in tokens")
    parser.add_argument("--tasks", default="passkey,niah")
    parser.add_argument("--depths", default="10,50,90", help="needle depths in percent")
    parser.add_argument("--samples", type=int, default=4, help="samples per task, length and depth")
    parser.add_argument("--budget", type=float, default=0.25, help="eviction budget, fraction of the context")
    parser.add_argument("--chunk", type=int, default=128, help="prefill chunk (max_num_batched_tokens)")
    parser.add_argument("--batch", type=int, default=4, help="prompts per engine batch and in the speed run")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated in the speed run")
    parser.add_argument("--dtype", default="fp32", help="compute dtype (default fp32: CPUs are slow in bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs", help="tradeoffs.md goes here, its plot and JSON under img/")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in args.settings:
        engine_kwargs(s, 1024, args.budget)  # unknown names fail before any work
    args.lengths = sorted(int(x) for x in args.lengths.split(","))
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.depths = [float(d) for d in args.depths.split(",")]
    if not 0 < args.budget < 1:
        parser.error(f"--budget {args.budget} must be a fraction in (0, 1)")
    start = time.perf_counter()
    result = run(args)
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/tradeoffs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(result, args, command.strip(), elapsed)
    from longreach.eval.plots import plot_comparison

    for task in args.tasks:
        plot_comparison([r["grids"][task] for r in result["rows"]], out / "img" / f"tradeoffs-{task}.png")
        print(comparison_table([r["grids"][task] for r in result["rows"]]))
    for r in result["rows"]:
        r.pop("grids")
    (out / "img" / "tradeoffs.json").write_text(json.dumps(result, indent=1) + "\n")
    doc = out / "tradeoffs.md"
    text = doc.read_text() if doc.is_file() else "# Trade-offs of the KV-cache levers\n\n## Measured table\n"
    marker = "## Measured table"
    before, _, after = text.partition(marker)
    rest = after.split("\n## ", 1)
    after = ("\n## " + rest[1]) if len(rest) > 1 else "\n"
    doc.write_text(before + table + after)
    print(table)
    print(f"wrote {doc}, {out / 'img'}/tradeoffs-*.png and tradeoffs.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
