"""Figures for the evaluation results (matplotlib, drawn off-screen without touching pyplot's global state).

- `plot_heatmap(result, path)`: depth x length accuracy of one grid, as in the needle-in-a-haystack
  repository (green = retrieved, red = missed; failed requests count as missed and hatch their cell),
  each cell annotated with its percentage and its number of failed requests.
- `plot_comparison(results, path)`: accuracy vs context length, one line per setting, with the threshold.
- `plot_perplexity(results, path)`: perplexity vs context length, one line per setting (YaRN's Table 2 as a figure).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, NullFormatter

from longreach.eval.results import GridResult, format_length

# red (missed) -> amber -> green (retrieved); grey only for a cell the grid has no sample in
RETRIEVAL_CMAP = LinearSegmentedColormap.from_list("retrieval", ["#c0392b", "#f39c12", "#f7dc6f", "#27ae60"])


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_heatmap(result: GridResult, path: str | os.PathLike) -> Path:
    """Depth (rows, 0% at the top) x length (columns) accuracy heatmap of one grid; returns the PNG path."""
    depths, lengths = result.depths, result.lengths
    acc = np.array(
        [
            [np.nan if (a := result.accuracy(length, depth)) is None else 100.0 * a for length in lengths]
            for depth in depths
        ]
    )
    fig = Figure(figsize=(min(3.2 + 0.85 * len(lengths), 16), min(2.2 + 0.42 * len(depths), 12)))
    ax = fig.subplots()
    cmap = RETRIEVAL_CMAP.with_extremes(bad="#bdbdbd")
    image = ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    _annotate_cells(ax, result, acc)
    _label_grid_axes(ax, depths, lengths)
    effective, stopped_at = result._effective()
    if effective is not None and effective != lengths[-1]:  # mark where the effective context ends
        ax.axvline(lengths.index(effective) + 0.5, color="black", linestyle="--", linewidth=1.2)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    legend = "accuracy (%) of the samples in the cell\ngreen = retrieved, red = missed"
    if result.num_errors():
        legend += "\nhatched = failed requests (N err), counted as missed"
    colorbar.set_label(legend, fontsize=8)
    ax.set_title(_heatmap_title(result, effective, stopped_at), fontsize=9)
    return _save(fig, path)


def _annotate_cells(ax, result: GridResult, acc: np.ndarray) -> None:
    """Each cell's percentage ("n/a" without samples); a cell with failed requests is hatched and says
    how many failed, on a white box so the text stays legible over the hatching."""
    for i, depth in enumerate(result.depths):
        for j, length in enumerate(result.lengths):
            errors = result.num_errors(length, depth)
            text = "n/a" if np.isnan(acc[i, j]) else f"{acc[i, j]:.0f}%"
            if errors:
                text += f"\n{errors} err"
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#555555", linewidth=0
                    )
                )
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="black",
                bbox=dict(facecolor="white", alpha=0.75, edgecolor="none", pad=1) if errors else None,
            )


def _label_grid_axes(ax, depths: Sequence[float | None], lengths: Sequence[int]) -> None:
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_xlabel("context length (tokens, K = 1024)")
    if depths == [None]:
        ax.set_yticks([0], ["whole context"])
        ax.set_ylabel("(task has no needle depth)")
    else:
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_ylabel("needle depth (% of the context)")


def _heatmap_title(result: GridResult, effective: int | None, stopped_at: int | None) -> str:
    """Task, model and setting; then the effective context length, where the figure marks it and where
    failed requests stopped it."""
    title = f"{result.task} — {result.model}" + (f" [{result.setting}]" if result.setting else "")
    eff = "below the shortest length" if effective is None else format_length(effective)
    marked = ", dashed line" if effective is not None and effective != result.lengths[-1] else ""
    if stopped_at is not None:
        marked += f"; not claimed from {format_length(stopped_at)} on: failed requests"
    return (
        f"{title}\neffective context length {eff} (accuracy ≥ {100 * result.threshold:g}%{marked}); "
        f"{result.num_samples} sample(s) per cell"
    )


def _length_axis(ax, lengths: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths), [format_length(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens, K = 1024)")
    ax.grid(True, alpha=0.3)


def plot_comparison(results: Sequence[GridResult], path: str | os.PathLike) -> Path:
    """Accuracy (%) vs context length, one line per setting, the effective-length threshold dashed."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    lengths = sorted({n for r in results for n in r.lengths})
    for i, r in enumerate(results):
        points = [(n, a) for n, a in r.accuracy_by_length().items() if a is not None]
        eff = r.effective_length()
        label = f"{r.setting or r.model} (effective {format_length(eff) if eff else '—'})"
        ax.plot(
            [n for n, _ in points],
            [100 * a for _, a in points],
            label=label,
            **_series_style(i, len(results)),
        )
    threshold = 100 * results[0].threshold
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold:g}%")
    _length_axis(ax, lengths)
    ax.set_ylim(-3, 103)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results[0].task}: accuracy vs context length")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def _series_style(i: int, count: int) -> dict:
    """Distinct markers, earlier series drawn wider and bigger, so identical lines stay visible on top of each other."""
    markers = "osD^vP*X"
    scale = (count - i) / count
    return {
        "marker": markers[i % len(markers)],
        "markersize": 4 + 6 * scale,
        "linewidth": 1.2 + 2.5 * scale,
        "alpha": 0.9,
    }


def plot_perplexity(results: Sequence, path: str | os.PathLike) -> Path:
    """Perplexity vs context length (log scale), one line per `PerplexityResult`."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    lengths = sorted({n for r in results for n in r.perplexity})
    for i, r in enumerate(results):
        points = sorted((n, p) for n, p in r.perplexity.items() if p is not None and math.isfinite(p))
        ax.plot(
            [n for n, _ in points], [p for _, p in points], label=r.setting, **_series_style(i, len(results))
        )
    _length_axis(ax, lengths)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 2, 3, 10 rather than 2x10^0
    ax.yaxis.set_major_formatter(plain)
    values = [p for r in results for p in r.perplexity.values() if p is not None and math.isfinite(p)]
    # label the minor ticks (2, 3, 5, ...) only when the axis spans about one decade; beyond that they collide
    wide = values and max(values) / max(min(values), 1e-9) > 20
    ax.yaxis.set_minor_formatter(NullFormatter() if wide else plain)
    ax.set_ylabel("perplexity (log scale; lower is better)")
    ax.set_title(f"perplexity of the same {results[0].num_scored_tokens} tokens vs context length")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
