"""Evaluation results: one sample's outcome, and a grid of them (lengths x depths) with its accuracy table,
RULER's effective context length and a lossless JSON form (results.json).

Kept apart from `runner.py` (which produces them) so that plots and reports read results without the runner.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_ANY_DEPTH = object()  # "all depths" (None is itself a depth: the one of tasks without a depth)


@dataclass
class SampleResult:
    task: str
    length: int
    depth: float | None
    index: int
    expected: list[str]
    got: str | None
    score: float | None
    correct: bool
    error: str | None
    num_prompt_tokens: int
    needle_depths: list[float] = field(default_factory=list)


@dataclass
class GridResult:
    task: str
    model: str
    lengths: list[int]
    depths: list[float | None]
    num_samples: int
    seed: int
    threshold: float = 0.85
    setting: str | None = None
    backend: str | None = None
    elapsed_s: float = 0.0
    run: dict[str, Any] = field(default_factory=dict)  # the full setting and the run's facts (record.py)
    samples: list[SampleResult] = field(default_factory=list)

    def _cell(self, length: int, depth: Any = _ANY_DEPTH) -> list[SampleResult]:
        return [s for s in self.samples if s.length == length and (depth is _ANY_DEPTH or s.depth == depth)]

    def accuracy(self, length: int, depth: Any = _ANY_DEPTH) -> float | None:
        """Mean score of the samples at `length` (and `depth`, if given), a failed request scoring 0;
        None only when the grid has no sample there."""
        cell = self._cell(length, depth)
        scores = [0.0 if s.error is not None else s.score for s in cell]
        return sum(scores) / len(scores) if scores else None

    def answered_accuracy(self, length: int, depth: Any = _ANY_DEPTH) -> float | None:
        """Mean score of the answered samples only (failed requests left out); None if none answered."""
        scores = [s.score for s in self._cell(length, depth) if s.error is None]
        return sum(scores) / len(scores) if scores else None

    def num_errors(self, length: int | None = None, depth: Any = _ANY_DEPTH) -> int:
        """Failed requests at `length` (and `depth`); in the whole grid without `length`."""
        cell = self.samples if length is None else self._cell(length, depth)
        return sum(s.error is not None for s in cell)

    def accuracy_by_length(self) -> dict[int, float | None]:
        return {length: self.accuracy(length) for length in self.lengths}

    def effective_length(self, threshold: float | None = None) -> int | None:
        """Longest length L such that every tested length <= L scores >= threshold (RULER) with no failed
        request; None if the shortest length fails either way."""
        return self._effective(threshold)[0]

    def _effective(self, threshold: float | None = None) -> tuple[int | None, int | None]:
        """(effective length, the first length that was stopped by failed requests rather than by accuracy)."""
        threshold = self.threshold if threshold is None else threshold
        effective = None
        for length in sorted(self.lengths):
            acc = self.accuracy(length)
            if acc is None or acc < threshold:
                return effective, None
            if self.num_errors(length):
                return effective, length
            effective = length
        return effective, None

    def summary_line(self) -> str:
        """The effective-length line, with what failed requests did to it."""
        effective, stopped_at = self._effective()
        line = effective_length_line(effective, self.threshold)
        errors = self.num_errors()
        if not errors:
            return line
        line += (
            f"\n{errors} of {len(self.samples)} request(s) failed; each counts as a miss in the accuracy "
            f"(among the answered ones only: "
            + ", ".join(f"{format_length(n)} {pct(self.answered_accuracy(n))}" for n in self.lengths)
            + ")"
        )
        if stopped_at is not None:
            line += (
                f"\nnot claimed: {format_length(stopped_at)} and beyond, where {self.num_errors(stopped_at)} "
                f"request(s) failed (rerun them for a measured effective length)"
            )
        return line

    def table(self) -> str:
        """Depth x length accuracy (percent), a mean row, an errors row and the effective length."""
        head = f"{self.task} — {self.model}" + (f" [{self.setting}]" if self.setting else "")
        label_width = max(len("depth \\ length"), 8)
        cols = [format_length(length) for length in self.lengths]
        width = max(7, *(len(c) + 2 for c in cols))
        lines = [head, "depth \\ length".ljust(label_width) + "".join(c.rjust(width) for c in cols)]
        for depth in self.depths:
            label = "whole context" if depth is None else f"{depth:g}%"
            lines.append(
                label.ljust(label_width)
                + "".join(pct(self.accuracy(length, depth)).rjust(width) for length in self.lengths)
            )
        if len(self.depths) > 1:
            lines.append(
                "mean".ljust(label_width)
                + "".join(pct(self.accuracy(length)).rjust(width) for length in self.lengths)
            )
        if self.num_errors():
            lines.append(
                "errors".ljust(label_width)
                + "".join(str(self.num_errors(length)).rjust(width) for length in self.lengths)
            )
        lines.append(self.summary_line())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "samples"}
        out["effective_length"] = self.effective_length()
        out["accuracy_by_length"] = {str(k): v for k, v in self.accuracy_by_length().items()}
        out["num_errors"] = self.num_errors()
        out["errors_by_length"] = {str(k): self.num_errors(k) for k in self.lengths}
        out["samples"] = [asdict(s) for s in self.samples]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GridResult":
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "samples"}
        return cls(**fields, samples=[SampleResult(**s) for s in data.get("samples", [])])

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GridResult":
        return cls.from_dict(json.loads(Path(path).read_text()))


def format_length(num_tokens: int) -> str:
    """1024 -> '1K', 1536 -> '1.5K', 1000 -> '1000' (K = 1024, as the lengths are given)."""
    if num_tokens >= 1024 and (num_tokens * 2) % 1024 == 0:
        return f"{num_tokens / 1024:g}K"
    return str(num_tokens)


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def effective_length_line(effective: int | None, threshold: float) -> str:
    if effective is None:
        return f"effective context length: below the shortest length tested (accuracy < {100 * threshold:g}%)"
    return (
        f"effective context length: {format_length(effective)} ({effective} tokens; accuracy >= "
        f"{100 * threshold:g}% at every length up to it)"
    )
