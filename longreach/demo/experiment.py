"""The context-extension experiment on the demo model: where does each RoPE method stop working?

The base model was trained at L0 = 512 tokens. We evaluate it at 1x..16x L0 with no scaling and with
training-free scaling (PI / linear, static NTK, dynamic NTK, YaRN, each at factor 8), then the
YaRN x8 model after a short continued pretraining at 8x L0 (`longreach demo extend`). Each setting
gets passkey accuracy (the YaRN paper's passkey test) and perplexity of the same tokens at every
length (its Table 2 format); the table and a plot go to docs/extension.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from longreach.demo.corpus import write_prose_text
from longreach.demo.train import EXTEND_SEQ_LEN
from longreach.eval.backends import LocalBackend
from longreach.eval.plots import plot_comparison, plot_perplexity
from longreach.eval.ppl import PerplexityResult, evaluate_perplexity
from longreach.eval.results import GridResult
from longreach.eval.runner import run_grid
from longreach.model.bundled import BUNDLED_BASE_MODEL_DIR, BUNDLED_MODEL_DIR
from longreach.model.loader import read_config

FACTOR = 8.0


def settings(base: Path, extended: Path, original: int) -> dict[str, tuple[Path, dict | None]]:
    """name -> (checkpoint, rope_scaling override)."""
    yarn = {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": original}
    return {
        "no scaling": (base, None),
        "PI (linear x8)": (base, {"rope_type": "linear", "factor": FACTOR}),
        "NTK-aware (x8)": (base, {"rope_type": "ntk", "factor": FACTOR}),
        "dynamic NTK (x8)": (base, {"rope_type": "dynamic", "factor": FACTOR}),
        "YaRN (x8)": (base, yarn),
        "YaRN x8 + continued pretraining": (extended, None),
    }


def _markdown_table(title: str, rows: dict[str, dict[int, str]], lengths: list[int], original: int) -> str:
    head = "| setting | " + " | ".join(f"{n // original}x ({n})" for n in lengths) + " |"
    lines = [f"**{title}**", "", head, "|---" * (len(lengths) + 1) + "|"]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(cells.get(n, "—") for n in lengths) + " |")
    return "\n".join(lines)


def _parse_multiples(text: str) -> list[int]:
    try:
        return [int(m) for m in text.split(",")]
    except ValueError:
        raise SystemExit(f"--multiples must be comma-separated integers, got {text!r}") from None


def _passkey_grid(backend: LocalBackend, name: str, lengths: list[int], samples: int) -> GridResult:
    """Passkey at depths 10/50/90% of every length; the report's table title quotes these depths."""
    return run_grid(
        backend, "passkey", lengths, depths=[10, 50, 90], num_samples=samples, seed=0, setting=name
    )


def _perplexity(path: Path, rope: dict | None, name: str, text: str, lengths: list[int]) -> PerplexityResult:
    """Perplexity of the same text at every length, so a row changes only with the context length."""
    return evaluate_perplexity(
        path,
        data=[text],
        lengths=lengths,
        stride=128,
        max_windows=2,
        rope_scaling=rope,
        dtype="fp32",
        setting=name,
    )


def _evaluate_settings(
    all_settings: dict[str, tuple[Path, dict | None]], lengths: list[int], samples: int
) -> tuple[list[GridResult], list[PerplexityResult]]:
    """Passkey grid and perplexity for every setting, in order; prints each setting's accuracy as it lands."""
    # perplexity text from the model's own training distribution (filler prose and passkey filler): the eval's
    # built-in haystack is out of distribution for this byte model
    ppl_data = write_prose_text(4 * lengths[-1])
    grids: list[GridResult] = []
    ppls: list[PerplexityResult] = []
    for name, (path, rope) in all_settings.items():
        backend = LocalBackend(path, rope_scaling=rope, dtype="fp32", batch_size=samples, name=name)
        grids.append(_passkey_grid(backend, name, lengths, samples))
        ppls.append(_perplexity(path, rope, name, ppl_data, lengths))
        print(
            f"{name}: passkey "
            + ", ".join(f"{n}: {100 * (a or 0):.0f}%" for n, a in grids[-1].accuracy_by_length().items()),
            flush=True,
        )
    return grids, ppls


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, quoted in the report."""
    return (
        "longreach demo experiment"
        + (f" --base {args.base}" if args.base else "")
        + (f" --extended {args.extended}" if args.extended else "")
        + f" --samples {args.samples} --multiples {args.multiples}"
    )


def _report_markdown(
    grids: list[GridResult],
    ppls: list[PerplexityResult],
    lengths: list[int],
    original: int,
    keys_per_prompt: int,
    command: str,
    elapsed: float,
) -> str:
    """docs/extension.md: how the run was made, then the passkey and perplexity tables and the plots."""
    acc = {
        g.setting: {n: f"{100 * a:.0f}%" if a is not None else "—" for n, a in g.accuracy_by_length().items()}
        for g in grids
    }
    ppl = {
        p.setting: {n: f"{v:.2f}" if v is not None else "—" for n, v in p.perplexity.items()} for p in ppls
    }
    prompts_per_length = len(grids[0].samples) // len(lengths)
    sections = [
        "# Context extension on the demo model",
        f"Base model: trained at L0 = {original} tokens ([recipes/demo.toml](../recipes/demo.toml)). "
        f"Training-free settings scale RoPE by {FACTOR:g}x; the last row is the YaRN x{FACTOR:g} model after "
        f"continued pretraining at {EXTEND_SEQ_LEN:,} tokens (`longreach demo extend`), the model bundled with the "
        "package.",
        f"Measured with `{command}` ({elapsed / 60:.1f} min on this machine's CPU, fp32).",
        _markdown_table(
            f"Passkey accuracy ({prompts_per_length} prompts per length: depths 10/50/90%, "
            f"{keys_per_prompt} keys each)",
            acc,
            lengths,
            original,
        ),
        _markdown_table(
            "Perplexity per byte of the same tokens at each context length (sliding windows over "
            "the training corpus's filler prose)",
            ppl,
            lengths,
            original,
        ),
        "![passkey accuracy vs length](img/extension-passkey.png)",
        "![perplexity vs length](img/extension-ppl.png)",
    ]
    return "\n\n".join(sections) + "\n"


def _write_raw_results(
    path: Path, grids: list[GridResult], ppls: list[PerplexityResult], command: str
) -> None:
    """The unformatted numbers behind the report, for anyone who wants to replot or compare runs."""
    path.write_text(
        json.dumps(
            {
                "passkey": {g.setting: g.accuracy_by_length() for g in grids},
                "perplexity": {p.setting: p.perplexity for p in ppls},
                "command": command,
            },
            indent=1,
            default=str,
        )
    )


def run_experiment(args: argparse.Namespace) -> int:
    import torch

    base = Path(args.base) if args.base else BUNDLED_BASE_MODEL_DIR
    extended = Path(args.extended) if args.extended else BUNDLED_MODEL_DIR
    original = int(read_config(base).get("max_position_embeddings", 512))
    lengths = [m * original for m in _parse_multiples(args.multiples)]
    out = Path(args.out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    grids, ppls = _evaluate_settings(settings(base, extended, original), lengths, args.samples)
    elapsed = time.perf_counter() - start
    plot_comparison(grids, out / "img" / "extension-passkey.png")
    plot_perplexity(ppls, out / "img" / "extension-ppl.png")
    command = _command_line(args)
    report = _report_markdown(grids, ppls, lengths, original, args.samples, command, elapsed)
    (out / "extension.md").write_text(report)
    _write_raw_results(out / "img" / "extension.json", grids, ppls, command)
    print(report)
    return 0
