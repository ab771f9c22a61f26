"""KV bytes one request holds as it generates, per KV setting: full caches grow, eviction stays flat past its budget.

One prompt, `--new-tokens` greedy tokens (EOS ignored) through the engine; every `--every` steps the engine's
`kv_cache_bytes_used` (blocks held, scales and int4's window included) is recorded. Writes a table and a plot
into docs/tradeoffs.md's "KV held over a long generation" section and docs/img/kv-memory.png.

    python benchmarks/kv_memory.py                    # budget 256 tokens, 3,584 new tokens
    python benchmarks/kv_memory.py --new-tokens 512 --out /tmp/m
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longreach.engine.llm import LLM, SamplingParams

POLICY_SETTINGS = {
    "bf16": {"kv_cache_dtype": "bf16"},
    "int8": {"kv_cache_dtype": "int8"},
    "int4": {"kv_cache_dtype": "int4"},
    "window": lambda b: {"kv_cache_dtype": "bf16", "kv_policy": "window", "kv_policy_args": {"window": b}},
    "sinks": lambda b: {"kv_cache_dtype": "bf16", "kv_policy": "sinks", "kv_policy_args": {"window": b - 4}},
    "h2o-block": lambda b: {
        "kv_cache_dtype": "bf16",
        "kv_policy": "h2o",
        "kv_policy_args": {"heavy": b // 2, "recent": b - b // 2, "unit": "block"},
    },
}


def curve(
    kwargs: dict, prompt: list[int], new_tokens: int, every: int, max_len: int
) -> list[tuple[int, int]]:
    """(tokens in the request, KV bytes held) after every `every` engine steps, and at the end."""
    llm = LLM(
        dtype="fp32",
        max_model_len=max_len,
        allow_long_max_model_len=True,
        enable_prefix_caching=False,
        max_num_seqs=1,
        num_kv_blocks=max_len // 16 + 64,
        **kwargs,
    )
    engine = llm.engine
    request = engine.add_request(
        prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    )
    points, step = [], 0
    while engine.has_unfinished_requests():
        engine.step()
        step += 1
        seq = engine.requests.get(request)
        if seq is not None and step % every == 0:
            points.append((seq.num_tokens, engine.kv_cache_bytes_used))
    points.append((len(prompt) + new_tokens, engine.kv_cache_bytes_used))  # after the finish: all freed
    return points


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=256, help="eviction budget in tokens (default 256)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=3584)
    parser.add_argument("--every", type=int, default=256, help="sample every N engine steps")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    prompt = [(i * 7) % 250 + 1 for i in range(args.prompt_tokens)]
    max_len = args.prompt_tokens + args.new_tokens + 16
    curves = {}
    for name, make in POLICY_SETTINGS.items():
        kwargs = make(args.budget) if callable(make) else make
        curves[name] = curve(kwargs, prompt, args.new_tokens, args.every, max_len)
        print(f"{name:>10}: " + ", ".join(f"{n}:{b / 1024:.0f}K" for n, b in curves[name]), file=sys.stderr)
    out = Path(args.out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in curves.items():
        ax.plot([n for n, _ in points[:-1]], [b / 1024 for _, b in points[:-1]], marker="o", ms=3, label=name)
    ax.set(
        xlabel="tokens in the request (prompt + generated)",
        ylabel="KV held (KiB)",
        title=f"KV held by one request while generating (eviction budget {args.budget} tokens)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "img" / "kv-memory.png", dpi=110)
    marks = [n for n, _ in curves["bf16"][:-1]]
    lines = [
        "| setting | " + " | ".join(f"{n:,} tokens" for n in marks) + " | after finish |",
        "|---" * (len(marks) + 2) + "|",
    ]
    for name, points in curves.items():
        held = dict(points[:-1])
        lines.append(
            f"| `{name}` | "
            + " | ".join(f"{held[n] / 1024:,.0f} KiB" if n in held else "—" for n in marks)
            + f" | {points[-1][1]} B |"
        )
    command = "python benchmarks/kv_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "\n".join(
        [
            "## KV held over a long generation",
            "",
            f"One {args.prompt_tokens}-token prompt, {args.new_tokens:,} generated tokens, eviction "
            f"budget {args.budget} tokens, KV bytes the engine holds (`kv_cache_bytes_used`):",
            "",
            "```",
            command.strip(),
            "```",
            "",
            *lines,
            "",
            "![KV held while generating](img/kv-memory.png)",
            "",
        ]
    )
    doc = out / "tradeoffs.md"
    text = doc.read_text() if doc.is_file() else "# Trade-offs of the KV-cache levers\n"
    marker = "## KV held over a long generation"
    if marker in text:
        before, _, after = text.partition(marker)
        rest = after.split("\n## ", 1)
        text = before + section + (("\n## " + rest[1]) if len(rest) > 1 else "")
    else:
        before, sep, after = text.partition("## How each lever works here")
        text = before + section + "\n" + sep + after if sep else text + "\n" + section
    doc.write_text(text)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
