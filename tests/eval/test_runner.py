"""The runner: grids, accuracy tables, effective length, reports and the CLI, on a fake and a tiny real model."""

import json
import re
import sys

import pytest

from longreach.eval.backends import LocalBackend
from longreach.eval.runner import (
    GridResult,
    comparison_table,
    format_length,
    run_comparison,
    run_grid,
    write_comparison,
    write_report,
)
from longreach.model.tokenizer import ByteTokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class OracleBackend:
    """Reads the pass key out of the prompt while the prompt is short enough; fails on request."""

    kind = "oracle"

    def __init__(self, max_chars=1500, fail_depth_line=None):
        self.name, self.tokenizer = "oracle", ByteTokenizer()
        self.max_chars, self.fail_depth_line = max_chars, fail_depth_line
        self.calls = []

    def complete(self, prompts, max_tokens):
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            key = re.search(r"The pass key is (\d+)", p).group(1)
            if self.fail_depth_line and p.index("pass key is") < self.fail_depth_line:
                out.append(TimeoutError("server took too long"))
            else:
                out.append(f" {key}. Remember it." if len(p) <= self.max_chars else " 12345")
        return out


def test_grid_accuracy_effective_length_and_table():
    result = run_grid(
        OracleBackend(max_chars=1500),
        "passkey",
        [2048, 512, 1024],
        depths=[0, 50, 100],
        num_samples=2,
        batch_size=4,
        progress=False,
    )
    assert result.lengths == [512, 1024, 2048] and len(result.samples) == 18
    assert result.accuracy_by_length() == {512: 1.0, 1024: 1.0, 2048: 0.0}
    assert result.effective_length() == 1024 and result.effective_length(threshold=1.0) == 1024
    table = result.table()
    assert "passkey — oracle" in table and "effective context length: 1K (1024 tokens" in table
    assert re.search(r"50%\s+100%\s+100%\s+0%", table)
    first = result.samples[0]
    assert (first.length, first.depth, first.correct, first.error) == (512, 0.0, True, None)
    assert first.num_prompt_tokens == 512 - 16 and first.got.startswith(" ")
    backend = OracleBackend()
    run_grid(
        backend, "passkey", [512, 1024], depths=[0, 50, 100], num_samples=2, batch_size=4, progress=False
    )
    assert backend.calls == [4, 2, 4, 2]  # batches never mix lengths


def test_errors_are_kept_per_sample_and_count_as_misses(tmp_path):
    backend = OracleBackend(max_chars=10**9, fail_depth_line=200)  # the needle near the top times out
    result = run_grid(backend, "passkey", [512, 1024], depths=[0, 100], num_samples=1, progress=False)
    failed = [s for s in result.samples if s.error]
    assert {s.depth for s in failed} == {0.0} and all("TimeoutError" in s.error for s in failed)
    assert all(s.got is None and s.score is None and not s.correct for s in failed)
    assert result.accuracy(512) == 0.5 and result.accuracy(512, 0.0) == 0.0  # a failed request missed
    assert result.answered_accuracy(512) == 1.0 and result.answered_accuracy(512, 0.0) is None
    assert result.num_errors() == 2 and result.num_errors(512) == 1
    assert result.effective_length() is None
    table = result.table()
    assert re.search(r"errors\s+1\s+1", table) and "2 of 4 request(s) failed" in table
    paths = write_report(result, tmp_path)
    saved = json.loads(paths["results"].read_text())
    assert saved["num_errors"] == 2 and saved["samples"][0]["error"].startswith("TimeoutError")
    assert saved["errors_by_length"] == {"512": 1, "1024": 1} and saved["accuracy_by_length"]["512"] == 0.5
    assert GridResult.load(paths["results"]).accuracy_by_length() == result.accuracy_by_length()
    assert paths["heatmap"].read_bytes()[:8] == PNG_MAGIC


def test_effective_length_is_not_claimed_where_requests_failed(tmp_path):
    class FailsOnceAt1K(OracleBackend):
        def complete(self, prompts, max_tokens):
            out = super().complete(prompts, max_tokens)
            if len(prompts[0]) > 700:  # one failure in each batch past 512 (1K, 2K)
                out[0] = ConnectionError("reset by peer")
            return out

    result = run_grid(
        FailsOnceAt1K(max_chars=10**9),
        "passkey",
        [512, 1024, 2048],
        depths=[0, 25, 50, 75, 100],
        num_samples=2,
        progress=False,
    )
    assert result.accuracy_by_length() == {512: 1.0, 1024: 0.9, 2048: 0.9}  # >= 85% even counting the miss
    assert result.effective_length() == 512  # but 1K was not fully measured
    table = result.table()
    assert "effective context length: 512" in table and "not claimed: 1K and beyond" in table
    assert "among the answered ones only: 512 100%, 1K 100%, 2K 100%" in table
    cmp = comparison_table([result])
    assert re.search(r"512\*\s+2$", cmp.splitlines()[2]) and "count as misses" in cmp
    assert write_report(result, tmp_path)["heatmap"].read_bytes()[:8] == PNG_MAGIC


def test_tasks_without_depth_use_one_row():
    backend = OracleBackend()
    backend.complete = lambda prompts, n: ["no idea"] * len(prompts)
    result = run_grid(backend, "common_words", [1024], depths=[0, 50], num_samples=2, progress=False)
    assert result.depths == [None] and len(result.samples) == 2
    assert "whole context" in result.table()


def test_comparison_writes_one_table_and_one_figure(tmp_path):
    results = run_comparison(
        {"short": lambda: OracleBackend(max_chars=700), "long": lambda: OracleBackend(max_chars=10**9)},
        "passkey",
        [512, 1024],
        depths=[50],
        num_samples=1,
        progress=False,
    )
    table = comparison_table(results)
    assert re.search(r"short\s+100%\s+0%\s+512", table) and re.search(r"long\s+100%\s+100%\s+1K", table)
    paths = write_comparison(results, tmp_path)
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "short" / "results.json").is_file() and (tmp_path / "long" / "heatmap.png").is_file()
    assert json.loads(paths["results"].read_text())["settings"][1]["effective_length"] == 1024


def test_bad_grid_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        run_grid(OracleBackend(), "needle", [512])
    with pytest.raises(ValueError, match="depth 120"):
        run_grid(OracleBackend(), "passkey", [512], depths=[120])
    with pytest.raises(ValueError, match="threshold=85"):
        run_grid(OracleBackend(), "passkey", [512], threshold=85)
    assert [format_length(n) for n in (512, 1024, 1536, 131072, 1000)] == [
        "512",
        "1K",
        "1.5K",
        "128K",
        "1000",
    ]


# ---------------------------------------------------------------- a tiny random model, end to end


def test_end_to_end_on_a_tiny_model(byte_checkpoint, tmp_path):
    backend = LocalBackend(byte_checkpoint, batch_size=4)
    result = run_grid(
        backend, "passkey", [512, 768], depths=[0, 100], num_samples=1, max_new_tokens=8, progress=False
    )
    assert backend.kind in ("engine", "contiguous-cache generator") and result.backend == backend.kind
    assert all(s.error is None and isinstance(s.got, str) for s in result.samples)
    paths = write_report(result, tmp_path)
    saved = json.loads(paths["results"].read_text())
    assert saved["model"] == "tiny-byte" and len(saved["samples"]) == 4
    assert set(saved["samples"][0]) >= {"task", "length", "depth", "expected", "got", "correct", "error"}
    assert "effective context length" in paths["summary"].read_text()
    assert paths["heatmap"].read_bytes()[:8] == PNG_MAGIC


def test_engine_and_reference_generator_agree(byte_checkpoint, monkeypatch):
    pytest.importorskip("longreach.engine.llm")
    prompts = ["The pass key is 12345. Remember it. What is the pass key?", "The grass is green."]
    engine = LocalBackend(byte_checkpoint)
    assert engine.complete(prompts, 6) and engine.kind == "engine"
    monkeypatch.setitem(sys.modules, "longreach.engine.llm", None)  # a build without the engine
    reference = LocalBackend(byte_checkpoint)
    assert reference.complete(prompts, 6) == engine.complete(prompts, 6)
    assert reference.kind == "contiguous-cache generator"
    with pytest.raises(ValueError, match="kv_cache_dtype='int8' needs the paged serving engine"):
        LocalBackend(byte_checkpoint, kv_cache_dtype="int8").complete(prompts, 2)


def test_cli_single_run_and_comparison(byte_checkpoint, tmp_path, capsys):
    from longreach.cli import main

    common = [
        "--model",
        str(byte_checkpoint),
        "--lengths",
        "512",
        "--samples",
        "1",
        "--no-progress",
        "--max-tokens",
        "4",
    ]
    assert main(["eval", "niah", *common, "--depths", "0,50,...,100", "--out", str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    assert "niah — tiny-byte" in out and "effective context length" in out
    saved = json.loads((tmp_path / "one" / "results.json").read_text())
    assert saved["depths"] == [0.0, 50.0, 100.0] and (tmp_path / "one" / "heatmap.png").is_file()

    rc = main(
        [
            "eval",
            "passkey",
            *common,
            "--depths",
            "50",
            "--out",
            str(tmp_path / "cmp"),
            "--rope-scaling",
            "none",
            "--rope-scaling",
            '{"rope_type": "linear", "factor": 2.0}',
        ]
    )
    assert rc == 0
    table = (tmp_path / "cmp" / "comparison.txt").read_text()
    assert "rope=checkpoint" in table and "rope=linear x2" in table
    assert (tmp_path / "cmp" / "comparison.png").is_file()


def test_cli_errors_name_the_bad_value(tmp_path, capsys):
    from longreach.cli import main

    assert main(["eval", "passkey", "--model", str(tmp_path), "--data", "x.txt"]) == 2
    assert "--data is for ppl" in capsys.readouterr().err
    assert main(["eval", "passkey", "--lengths", "1k,2q"]) == 2
    assert "'2q' is not a length" in capsys.readouterr().err
    assert main(["eval", "passkey", "--depths", "0,10,...,95"]) == 2
    assert "--depths" in capsys.readouterr().err
    assert main(["eval", "ppl", "--endpoint", "http://localhost:1"]) == 2
    assert "ppl needs the model's logits" in capsys.readouterr().err
    assert main(["eval", "passkey", "--model", str(tmp_path / "missing"), "--lengths", "512"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_parsers():
    from longreach.eval.cli import parse_depths, parse_lengths

    assert parse_lengths("1k,2K,4096,1.5k,512") == [512, 1024, 1536, 2048, 4096]
    assert parse_depths("0,10,...,100") == [float(d) for d in range(0, 101, 10)]
    assert parse_depths("5,0,12.5,25,...,50") == [0.0, 5.0, 12.5, 25.0, 37.5, 50.0]


def test_evaluate_passkey_takes_a_loaded_model(byte_checkpoint):
    from longreach import load_model
    from longreach.eval.runner import evaluate_passkey

    model = load_model(byte_checkpoint, dtype="fp32")
    result = evaluate_passkey(
        model, [512], depths=[50], num_samples=1, tokenizer=ByteTokenizer(), max_new_tokens=4, progress=False
    )
    assert len(result.samples) == 1 and result.samples[0].error is None
    with pytest.raises(ValueError, match="pass tokenizer="):
        evaluate_passkey(model, [512])
