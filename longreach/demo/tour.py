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
from longreach.eval.runner import run_grid, write_report
from longreach.kvcache.presets import resolve_model
from longreach.kvcache.size_report import format_report, report
from longreach.model.bundled import BUNDLED_BASE_MODEL_DIR, resolve_model_path
from longreach.model.loader import read_config


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def tour(out_dir: str | Path = "runs/demo-tour") -> int:

    out_dir = Path(out_dir)
    _section("1. KV cache of one 128K-token request (longreach kv-size)")
    for name in ("Llama-3.1-8B", "Llama-3.1-70B"):
        print(format_report(report(resolve_model(name), 131072, dtypes=["bf16", "int8", "int4"])))
        print()

    model_dir = resolve_model_path(None)
    base_len = int(
        read_config(model_dir).get("rope_parameters", {}).get("original_max_position_embeddings", 512)
    )
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

    _section("3. The same question without extension: the base model, no RoPE scaling")
    if BUNDLED_BASE_MODEL_DIR.is_dir():
        base = run_grid(
            LocalBackend(BUNDLED_BASE_MODEL_DIR, dtype="fp32"),
            "passkey",
            [base_len, 8 * base_len],
            depths=[0, 50, 100],
            num_samples=1,
            setting="base, no scaling",
        )
        text = write_prose_text(4 * 8 * base_len)
        for name, path, grid in (
            ("base model, no scaling", BUNDLED_BASE_MODEL_DIR, base),
            ("YaRN x8 + continued pretraining", model_dir, result),
        ):
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
    print(
        "\nThe whole extension table (PI, NTK, dynamic NTK, YaRN; passkey and perplexity): "
        "`longreach demo experiment` (docs/extension.md)."
    )
    return 0
