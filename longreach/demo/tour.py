"""`longreach demo`: a two-minute tour of the whole system on this CPU.

1. What a long context costs: the KV cache of popular models at 128K tokens (`longreach kv-size`).
2. Whether it is usable: passkey retrieval by the bundled model at growing lengths, through the paged
   engine, drawn as a depth x length heatmap (`longreach eval passkey`).
3. Why extension matters: the base model with no RoPE scaling vs the bundled YaRN-extended model at the
   base training length and at 8x it, passkey and perplexity (the full table: `longreach demo experiment`).
"""

from __future__ import annotations

from pathlib import Path

from longreach.demo.corpus import write_prose_text
from longreach.eval.backends import LocalBackend
from longreach.eval.ppl import evaluate_perplexity
from longreach.eval.results import GridResult
from longreach.eval.runner import run_grid, write_report
from longreach.kvcache.presets import resolve_model
from longreach.kvcache.size_report import format_report, report
from longreach.model.bundled import BUNDLED_BASE_MODEL_DIR, resolve_model_path
from longreach.model.loader import read_config


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def _kv_cache_section() -> None:
    _section("1. KV cache of one 128K-token request (longreach kv-size)")
    for name in ("Llama-3.1-8B", "Llama-3.1-70B"):
        print(format_report(report(resolve_model(name), 131072, dtypes=["bf16", "int8", "int4"])))
        print()


def _base_training_length(model_dir: Path) -> int:
    """The length the model was trained at before extension, read from its rope parameters."""
    return int(read_config(model_dir).get("rope_parameters", {}).get("original_max_position_embeddings", 512))


def _passkey_section(model_dir: Path, base_len: int, out_dir: Path) -> GridResult:
    """Passkey by the bundled model from its base length to 8x it; writes the heatmap under out_dir."""
    _section(f"2. Passkey retrieval by the bundled model (trained at {base_len}, extended to {8 * base_len})")
    lengths = [base_len, 2 * base_len, 4 * base_len, 8 * base_len]
    result = run_grid(
        LocalBackend(model_dir, dtype="fp32"),
        "passkey",
        lengths,
        depths=[0, 50, 100],
        num_samples=1,
        setting="bundled demo model",
    )
    print(result.table())
    paths = write_report(result, out_dir)
    print(f"heatmap: {paths.get('heatmap')}")
    return result


def _print_passkey_and_perplexity(name: str, path: Path, grid: GridResult, text: str, base_len: int) -> None:
    """One row: passkey accuracy (from grid) and perplexity of text, at the base length and at 8x it."""
    acc = grid.accuracy_by_length()
    ppl = evaluate_perplexity(
        path,
        data=[text],
        lengths=[base_len, 8 * base_len],
        stride=128,
        max_windows=1,
        dtype="fp32",
        progress=False,
    ).perplexity
    print(
        f"  {name:32s}"
        + "".join(
            f"  {n:>5} tokens: passkey {100 * (acc.get(n) or 0):3.0f}%, perplexity {ppl[n]:8.2f}"
            for n in (base_len, 8 * base_len)
        )
    )


def _without_extension_section(model_dir: Path, base_len: int, extended: GridResult) -> None:
    """The base model with no RoPE scaling beside the bundled extended model; skipped without the base model."""
    _section("3. The same question without extension: the base model, no RoPE scaling")
    if not BUNDLED_BASE_MODEL_DIR.is_dir():
        return
    base = run_grid(
        LocalBackend(BUNDLED_BASE_MODEL_DIR, dtype="fp32"),
        "passkey",
        [base_len, 8 * base_len],
        depths=[0, 50, 100],
        num_samples=1,
        setting="base, no scaling",
    )
    text = write_prose_text(4 * 8 * base_len)
    _print_passkey_and_perplexity("base model, no scaling", BUNDLED_BASE_MODEL_DIR, base, text, base_len)
    _print_passkey_and_perplexity("YaRN x8 + continued pretraining", model_dir, extended, text, base_len)


def tour(out_dir: str | Path = "runs/demo-tour") -> int:
    out_dir = Path(out_dir)
    _kv_cache_section()
    model_dir = resolve_model_path(None)
    base_len = _base_training_length(model_dir)
    extended = _passkey_section(model_dir, base_len, out_dir)
    _without_extension_section(model_dir, base_len, extended)
    print(
        "\nThe whole extension table (PI, NTK, dynamic NTK, YaRN; passkey and perplexity): "
        "`longreach demo experiment` (docs/extension.md)."
    )
    return 0
