"""Run a task over a grid of context lengths x needle depths and report where retrieval stops working.

    from longreach.eval.backends import LocalBackend
    from longreach.eval.runner import run_grid, write_report, evaluate_passkey

    result = run_grid(LocalBackend("ckpt/"), "niah", lengths=[1024, 2048], depths=[0, 50, 100], num_samples=4)
    print(result.table())                 # depth x length accuracy, errors, effective context length
    write_report(result, "out/")          # results.json, summary.txt, heatmap.png
    evaluate_passkey("ckpt/", lengths=[512, 2048]).accuracy_by_length()

Accuracy of a cell is the mean score of all its samples (RULER's string-match scores), and a sample whose
request failed (server error, timeout) scores 0: a request that got no answer did not retrieve. Failed
samples keep their error in results.json and are counted in the table's errors row. The *effective context
length* follows RULER: the longest tested length such that it and every shorter tested length score at
least `threshold` (default 0.85) -- and, here, had no failed request: a length with failures was not fully
measured, so it is never claimed (the summary line says where the failures stopped it).

Several settings (rope scalings, KV dtypes, models) compare with `run_comparison` + `write_comparison`:
one table and one accuracy-vs-length figure with a line per setting.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from longreach.eval.backends import LocalBackend
from longreach.eval.plots import plot_comparison, plot_heatmap
from longreach.eval.record import SampleKey, sample_key
from longreach.eval.results import GridResult, SampleResult, format_length, pct
from longreach.eval.scoring import is_correct, score_output
from longreach.eval.tasks import TASKS, Sample, make_sample


def _as_backend(model_or_backend, **backend_kwargs):
    if hasattr(model_or_backend, "complete") and hasattr(model_or_backend, "tokenizer"):
        return model_or_backend
    return LocalBackend(model_or_backend, **backend_kwargs)


def run_grid(
    backend,
    task: str,
    lengths: Sequence[int],
    depths: Sequence[float] | None = None,
    num_samples: int = 1,
    seed: int = 0,
    haystack: Sequence[str | os.PathLike] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    threshold: float = 0.85,
    progress: bool = True,
    setting: str | None = None,
    done: Mapping[SampleKey, SampleResult] | None = None,
    on_samples: Callable[[list[SampleResult]], None] | None = None,
) -> GridResult:
    """Generate every (length, depth, sample) prompt of `task`, answer it through `backend`, score it.

    backend: a `Backend` (`LocalBackend`, `EndpointBackend`), or a model directory / model object for a
    `LocalBackend`. lengths: context lengths in tokens (prompt + answer budget). depths: percentages
    (ignored, and recorded as None, for tasks without a depth). Prompts go to the backend in batches of
    up to `batch_size` prompts of one length, shortest first; a tqdm bar on stderr shows progress unless
    `progress=False`. done: earlier results by `record.sample_key`, not asked again but kept in grid order;
    on_samples: gets each batch's new results as soon as they are scored (e.g. `SampleLog.append`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    backend = _as_backend(backend)
    lengths, grid_depths = _grid_axes(task, lengths, depths, num_samples, threshold)
    budget = TASKS[task].max_new_tokens if max_new_tokens is None else max_new_tokens
    if hasattr(backend, "ensure_max_len"):
        backend.ensure_max_len(max(lengths))
    result = GridResult(
        task=task,
        model=backend.name,
        lengths=lengths,
        depths=grid_depths,
        num_samples=num_samples,
        seed=seed,
        threshold=threshold,
        setting=setting,
        backend=getattr(backend, "kind", None),
    )
    bar = _progress_bar(
        len(lengths) * len(grid_depths) * num_samples,
        f"{task}" + (f" [{setting}]" if setting else ""),
        progress,
    )
    start = time.perf_counter()
    try:
        for cells in _batches_of_one_length(lengths, grid_depths, num_samples, batch_size):
            make = functools.partial(
                make_sample, task, backend.tokenizer, seed=seed, haystack=haystack, max_new_tokens=budget
            )
            result.samples.extend(_answer_cells(backend, cells, make, budget, done or {}, on_samples))
            _show_progress(bar, result, cells[-1][0], len(cells))
    finally:
        bar.close()
    result.elapsed_s = round(time.perf_counter() - start, 3)
    result.backend = getattr(backend, "kind", None)
    return result


def _answer_cells(backend, cells, make, budget: int, done, on_samples) -> list[SampleResult]:
    """The results of one batch of cells in order: recorded ones from `done`, the others answered now
    (and handed to `on_samples` first)."""
    todo = [cell for cell in cells if _cell_key(cell) not in done]
    answered = {}
    if todo:
        new = _answer_and_score(
            backend, [make(length, depth, index) for length, depth, index in todo], budget
        )
        if on_samples is not None:
            on_samples(new)
        answered = {sample_key(r): r for r in new}
    return [answered.get(_cell_key(c)) or done[_cell_key(c)] for c in cells]


def _grid_axes(
    task: str, lengths: Sequence[int], depths: Sequence[float] | None, num_samples: int, threshold: float
) -> tuple[list[int], list[float | None]]:
    """The grid's sorted distinct lengths and its depths ([None] for a task without a needle depth),
    after checking them and the other grid arguments."""
    lengths = sorted(set(int(n) for n in lengths))
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths {lengths} must be positive token counts")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be a fraction in (0, 1]")
    grid_depths: list[float | None] = (
        [float(d) for d in (depths if depths is not None else (0, 25, 50, 75, 100))]
        if TASKS[task].uses_depth
        else [None]
    )
    for depth in grid_depths:
        if depth is not None and not 0.0 <= depth <= 100.0:
            raise ValueError(f"depth {depth} must be a percentage in [0, 100]")
    return lengths, grid_depths


def _batches_of_one_length(
    lengths: list[int], depths: list[float | None], num_samples: int, batch_size: int
) -> list[list[tuple[int, float | None, int]]]:
    """(length, depth, sample index) cells in batches of up to batch_size, shortest length first."""
    # a batch never mixes lengths: length-dependent rope (dynamic NTK, LongRoPE) picks its frequencies from
    # the longest position in a forward call, so a mixed batch would score short prompts with long-prompt rope
    return [
        [(length, depth, index) for depth in depths for index in range(num_samples)][i : i + batch_size]
        for length in lengths
        for i in range(0, len(depths) * num_samples, batch_size)
    ]


def _answer_and_score(backend, samples: list[Sample], budget: int) -> list[SampleResult]:
    """One backend call for the batch; a prompt that failed is scored as a miss with its error."""
    outputs = backend.complete([s.prompt for s in samples], budget)
    return [_score(sample, output) for sample, output in zip(samples, outputs)]


def _cell_key(cell: tuple[int, float | None, int]) -> SampleKey:
    length, depth, index = cell
    return (int(length), None if depth is None else float(depth), int(index))


def _show_progress(bar, result: GridResult, length: int, num_samples: int) -> None:
    """Advance the bar past a finished batch and show the running accuracy of its length."""
    bar.update(num_samples)
    bar.set_postfix_str(f"{format_length(length)} acc {pct(result.accuracy(length))}", refresh=False)


def _score(sample, output: str | Exception) -> SampleResult:
    common = dict(
        task=sample.task,
        length=sample.length,
        depth=sample.depth,
        index=sample.index,
        expected=list(sample.expected),
        num_prompt_tokens=sample.num_prompt_tokens,
        needle_depths=[round(d, 2) for d in sample.needle_depths],
    )
    if isinstance(output, Exception):
        return SampleResult(
            **common, got=None, score=None, correct=False, error=f"{type(output).__name__}: {output}"
        )
    score = score_output(output, sample.expected, sample.scoring)
    return SampleResult(**common, got=output, score=score, correct=is_correct(score), error=None)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True)


def evaluate_passkey(
    model_or_backend,
    lengths: Sequence[int],
    depths: Sequence[float] = (0, 25, 50, 75, 100),
    num_samples: int = 5,
    seed: int = 0,
    tokenizer=None,
    **kwargs,
) -> GridResult:
    """Passkey retrieval over lengths x depths (YaRN / Landmark template).

    model_or_backend: a backend, a checkpoint directory, an `LLM`, or a loaded model (then pass `tokenizer`).
    Other arguments as in `run_grid`."""
    backend = _as_backend(model_or_backend, **({"tokenizer": tokenizer} if tokenizer is not None else {}))
    return run_grid(backend, "passkey", lengths, depths, num_samples=num_samples, seed=seed, **kwargs)


def write_report(result: GridResult, out_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """results.json, summary.txt (the table) and, with plot, heatmap.png in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": result.save(out_dir / "results.json")}
    (out_dir / "summary.txt").write_text(result.table() + "\n")
    paths["summary"] = out_dir / "summary.txt"
    if plot:
        paths["heatmap"] = plot_heatmap(result, out_dir / "heatmap.png")
    return paths


# ---------------------------------------------------------------- comparison


def run_comparison(
    settings: dict[str, Callable[[], Any]], task: str, lengths: Sequence[int], **grid_kwargs
) -> list[GridResult]:
    """One grid per setting. settings: name -> zero-argument factory of a backend (built, run and
    closed one at a time, so only one model is in memory)."""
    if not settings:
        raise ValueError("no settings to compare")
    results = []
    for name, make_backend in settings.items():
        backend = make_backend()
        try:
            results.append(run_grid(backend, task, lengths, setting=name, **grid_kwargs))
        finally:
            if hasattr(backend, "close"):
                backend.close()
    return results


def comparison_table(results: Sequence[GridResult]) -> str:
    """Rows: settings; columns: lengths (mean accuracy, failed requests as misses), the effective length
    and, when any request failed, the number of failed requests."""
    lengths = sorted({length for r in results for length in r.lengths})
    names = [r.setting or r.model for r in results]
    name_width = max(len("setting"), *(len(n) for n in names)) + 2
    cols = [format_length(length) for length in lengths]
    width = max(7, *(len(c) + 2 for c in cols))
    task = results[0].task
    lines = [
        f"{task}: accuracy by context length (threshold {100 * results[0].threshold:g}%)",
        "setting".ljust(name_width) + "".join(c.rjust(width) for c in cols) + "effective".rjust(12),
    ]
    any_errors = any(r.num_errors() for r in results)
    if any_errors:
        lines[1] += "errors".rjust(8)
    for name, r in zip(names, results):
        accs = r.accuracy_by_length()
        eff, stopped_at = r._effective()
        line = (
            name.ljust(name_width)
            + "".join(pct(accs.get(length)).rjust(width) for length in lengths)
            + ((format_length(eff) if eff else "—") + ("*" if stopped_at else "")).rjust(12)
        )
        lines.append(line + (str(r.num_errors()).rjust(8) if any_errors else ""))
    if any_errors:
        lines.append(
            "failed requests count as misses; * = effective length stopped by failed requests "
            "(see that setting's summary)"
        )
    return "\n".join(lines)


def write_comparison(
    results: Sequence[GridResult], out_dir: str | os.PathLike, plot: bool = True
) -> dict[str, Path]:
    """Per setting a subdirectory with its own report; comparison.json / .txt / .png at the top."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in results:
        write_report(r, setting_dir(out_dir, r.setting or r.model), plot=plot)
    table = comparison_table(results)
    (out_dir / "comparison.txt").write_text(table + "\n")
    summary = [
        {
            "setting": r.setting or r.model,
            "model": r.model,
            "effective_length": r.effective_length(),
            "num_errors": r.num_errors(),
            "accuracy_by_length": {str(k): v for k, v in r.accuracy_by_length().items()},
            "results": f"{_slug(r.setting or r.model)}/results.json",
        }
        for r in results
    ]
    (out_dir / "comparison.json").write_text(
        json.dumps(
            {"task": results[0].task, "threshold": results[0].threshold, "settings": summary}, indent=1
        )
        + "\n"
    )
    paths = {"table": out_dir / "comparison.txt", "results": out_dir / "comparison.json"}
    if plot:
        paths["plot"] = plot_comparison(results, out_dir / "comparison.png")
    return paths


def setting_dir(out_dir: str | os.PathLike, name: str | None) -> Path:
    """Where one setting's files go: out_dir itself for a single run, its subdirectory in a comparison."""
    return Path(out_dir) if name is None else Path(out_dir) / _slug(name)


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-")
    return keep or "setting"
