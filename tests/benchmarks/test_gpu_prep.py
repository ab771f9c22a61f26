"""The issue-16 benchmarks stay runnable on CPU: million.py's rehearsal (the same engine calls at toy sizes) and
host_overhead.py (the engine's host time per step). Figures are not asserted, only that they are produced."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_million_rehearsal_writes_every_case(tmp_path):
    million = _load("million")
    million.main(
        ["--rehearse", "--cases", "int4:320,int8:200", "--decode-tokens", "3", "--out", str(tmp_path)]
    )
    results = json.loads((tmp_path / "million.json").read_text())["results"]
    assert [(r["kv_cache_dtype"], r["prompt_tokens"], r["decoded_tokens"]) for r in results] == [
        ("int4", 320, 3),
        ("int8", 200, 3),
    ]
    assert all(r["ttft_s"] > 0 and r["max_kv_bytes"] > 0 for r in results)
    assert "| int4 | 320 |" in (tmp_path / "million.md").read_text()


def test_million_names_a_bad_case():
    with pytest.raises(SystemExit, match="'int3:5'"):
        _load("million").parse_cases("int4:100,int3:5")


def test_host_overhead_measures_host_time_per_step():
    row = _load("host_overhead").measure(num_seqs=3, num_steps=3, device="cpu", context=40)
    assert row["num_seqs"] == 3 and row["step_ms"] > 0 and row["forward_ms"] > 0 and row["prepare_ms"] > 0
