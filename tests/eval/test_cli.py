"""The `longreach eval` command line end to end (in-process, through `longreach.cli.main`): a comparison over
KV-cache dtypes on a tiny model, and a run against an OpenAI-compatible endpoint."""

import functools
import json
import re

import pytest

from longreach.cli import main
from longreach.eval.tasks import PASSKEY_INSTRUCTION
from tests.eval.test_endpoint import API_KEY, serve


def test_cli_compares_kv_cache_dtypes(byte_checkpoint, tmp_path, capsys, monkeypatch):
    llm_module = pytest.importorskip("longreach.engine.llm")
    real_llm, built = llm_module.LLM, []

    @functools.wraps(real_llm)  # keeps LLM's signature, which the backend inspects
    def recording_llm(*args, **kwargs):
        built.append(kwargs.get("kv_cache_dtype"))
        return real_llm(*args, **kwargs)

    monkeypatch.setattr(llm_module, "LLM", recording_llm)
    out = tmp_path / "kv"
    rc = main(
        [
            "eval",
            "passkey",
            "--model",
            str(byte_checkpoint),
            "--lengths",
            "512",
            "--depths",
            "0,100",
            "--samples",
            "1",
            "--max-tokens",
            "4",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
            "--kv-cache-dtype",
            "bf16",
            "--kv-cache-dtype",
            "int8",
        ]
    )
    assert rc == 0
    assert built == ["bf16", "int8"]  # each setting built its own engine with its KV dtype
    printed = capsys.readouterr().out
    assert "passkey — tiny-byte [kv=bf16]" in printed and "passkey — tiny-byte [kv=int8]" in printed
    table = (out / "comparison.txt").read_text()
    assert re.search(r"^kv=bf16\s+\d+%", table, re.M) and re.search(r"^kv=int8\s+\d+%", table, re.M)
    summary = json.loads((out / "comparison.json").read_text())
    assert [s["setting"] for s in summary["settings"]] == ["kv=bf16", "kv=int8"]
    assert all(s["num_errors"] == 0 for s in summary["settings"])
    for name in ("kv-bf16", "kv-int8"):
        saved = json.loads((out / name / "results.json").read_text())
        assert saved["setting"] == name.replace("-", "=") and saved["backend"] == "engine"
        assert len(saved["samples"]) == 2 and all(s["error"] is None for s in saved["samples"])
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def _key_or_500(body, attempt):
    """Answers the pass key, except HTTP 500 when the needle opens the context (depth 0)."""
    prompt = body["prompt"]
    key = re.search(r"The pass key is (\d+)", prompt).group(1)
    if prompt.startswith(PASSKEY_INSTRUCTION + "\nThe pass key is"):
        return 500, None, 0.0
    return 200, f" {key}. Remember it.", 0.0


def test_cli_against_an_endpoint(byte_checkpoint, tmp_path, capsys):
    with serve(_key_or_500) as url:
        common = [
            "passkey",
            "--endpoint",
            url,
            "--api-key",
            API_KEY,
            "--tokenizer",
            str(byte_checkpoint),
            "--lengths",
            "512,1k",
            "--samples",
            "1",
            "--retries",
            "0",
            "--no-progress",
        ]
        assert main(["eval", *common, "--depths", "60,100", "--out", str(tmp_path / "ok")]) == 0
        ok = capsys.readouterr()
        assert main(["eval", *common, "--depths", "0,50,...,100", "--out", str(tmp_path / "half")]) == 0
        half = capsys.readouterr()
    # every request answered: the model name came from /v1/models, prompts were sized with the byte tokenizer
    assert "passkey — fake-model" in ok.out and "effective context length: 1K" in ok.out
    assert "approximate" not in ok.err and "warning" not in ok.err
    saved = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert saved["backend"] == "endpoint" and saved["num_errors"] == 0
    assert [s["num_prompt_tokens"] for s in saved["samples"]] == [512 - 16] * 2 + [1024 - 16] * 2
    # the needles at 0% got HTTP 500: one miss of three at each length, and counted as errors
    saved = json.loads((tmp_path / "half" / "results.json").read_text())
    failed = [s for s in saved["samples"] if s["error"]]
    assert [s["depth"] for s in failed] == [0.0, 0.0] and all("HTTP 500" in s["error"] for s in failed)
    assert all(s["correct"] for s in saved["samples"] if not s["error"])
    assert saved["num_errors"] == 2 and saved["errors_by_length"] == {"512": 1, "1024": 1}
    assert saved["accuracy_by_length"] == {"512": pytest.approx(2 / 3), "1024": pytest.approx(2 / 3)}
    assert saved["effective_length"] is None
    summary = (tmp_path / "half" / "summary.txt").read_text()
    assert re.search(r"^mean\s+67%\s+67%$", summary, re.M) and re.search(r"^errors\s+1\s+1$", summary, re.M)
    assert "2 of 6 request(s) failed; each counts as a miss" in summary
    assert "among the answered ones only: 512 100%, 1K 100%" in summary
    assert "warning: 2 of 6 request(s) failed and count as misses" in half.err


def test_cli_endpoint_without_tokenizer_says_lengths_are_approximate(tmp_path, capsys):
    with serve(_key_or_500) as url:
        rc = main(
            [
                "eval",
                "passkey",
                "--endpoint",
                url,
                "--api-key",
                API_KEY,
                "--model-name",
                "fake-model",
                "--lengths",
                "512",
                "--depths",
                "100",
                "--samples",
                "1",
                "--no-progress",
                "--no-plot",
                "--out",
                str(tmp_path),
            ]
        )
    assert rc == 0
    assert "prompt lengths are approximate" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["samples"][0]["correct"]
