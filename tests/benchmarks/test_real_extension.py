"""benchmarks/real_extension.py (issue: SmolLM2 8K -> 32K) rehearsed end to end at toy scale on CPU.

The GPU run uses the same stages with the recipe's scale; here the bundled base demo model (512-token context)
is extended x4 for two steps at 1,024 tokens and the three settings are evaluated at 1,024 tokens."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval.test_real_text import needs_real_text

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "real_extension.py"
SETTINGS = ["original", "original + YaRN x4 (no training)", "extended (YaRN x4 + training)"]


@pytest.mark.slow
@needs_real_text
def test_rehearsal_runs_every_stage_and_writes_the_tables(tmp_path):
    from longreach.model.bundled import BUNDLED_BASE_MODEL_DIR

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--rehearse",
        "--model",
        str(BUNDLED_BASE_MODEL_DIR),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # the extended checkpoint carries the rope rewrite and was trained for the rehearsal's two steps
    final = json.loads((out / "extended" / "final" / "config.json").read_text())
    scaling = final.get("rope_scaling") or final.get("rope_parameters")
    assert scaling["rope_type"] == "yarn" and scaling["factor"] == 4
    data = json.loads((out / "data" / "data.json").read_text())
    assert data["real_tokens"] > 100_000 and data["synthetic_documents"] == 4
    assert len((out / "data" / "synthetic.jsonl").read_text().splitlines()) == 4

    for task in ("passkey-real", "niah_multikey"):
        comparison = json.loads((out / "eval" / task / "comparison.json").read_text())
        assert [s["setting"] for s in comparison["settings"]] == SETTINGS
        assert all(set(s["accuracy_by_length"]) == {"1024"} for s in comparison["settings"])
        assert (out / "eval" / task / "comparison.png").stat().st_size > 0
    ppl = json.loads((out / "eval" / "ppl" / "ppl.json").read_text())
    assert [r["setting"] for r in ppl] == SETTINGS
    assert all(math.isfinite(r["perplexity"]["1024"]) and r["perplexity"]["1024"] > 1 for r in ppl)

    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip())  # printed as written
    for heading in ("## passkey-real", "## niah_multikey", "## Perplexity vs length", "## Stage times"):
        assert heading in summary
    assert summary.count("| extended (YaRN x4 + training) |") == 2  # a by-depth row per retrieval task
    times = json.loads((out / "times.json").read_text())
    assert list(times) == ["convert", "data", "extend", "eval passkey real", "eval niah_multikey", "eval ppl"]

    # a second call finds every stage done and only rewrites the summary
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not again.stdout.startswith("+ ") and "\n+ " not in again.stdout.split("# ")[0]
