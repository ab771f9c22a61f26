"""Eval runs keep their context and their work: results.json carries the full setting, samples are appended
to samples.jsonl as they finish, `--resume DIR` continues an interrupted run to the same results.json as an
uninterrupted one, and an existing output directory is never written into silently."""

import json

import pytest

from longreach.cli import main
from longreach.eval import backends
from longreach.eval.record import SampleLog
from longreach.eval.results import SampleResult

# the run's own times and command lines, and the seconds spent, are all that may differ after a resume
VOLATILE_RUN = {"started_utc", "finished_utc", "command", "resumed"}


def _argv(checkpoint, out_flag, out):
    return [
        "eval",
        "passkey",
        "--model",
        str(checkpoint),
        "--lengths",
        "256,512",
        "--depths",
        "0,100",
        "--samples",
        "2",
        "--max-tokens",
        "4",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--no-progress",
        "--no-plot",
        out_flag,
        str(out),
    ]


def _comparable(path):
    data = json.loads(path.read_text())
    data.pop("elapsed_s")
    data["run"] = {k: v for k, v in data["run"].items() if k not in VOLATILE_RUN}
    return data


@pytest.fixture
def crash_after(monkeypatch):
    """Make LocalBackend.complete raise on its (n+1)-th call; returns the list of calls made."""
    calls, real = [], backends.LocalBackend.complete

    def arm(n):
        def complete(self, prompts, max_tokens):
            calls.append(len(prompts))
            if len(calls) > n:
                raise RuntimeError("injected crash")
            return real(self, prompts, max_tokens)

        monkeypatch.setattr(backends.LocalBackend, "complete", complete)
        return calls

    return arm


def test_resume_after_a_crash_gives_the_uninterrupted_results(byte_checkpoint, tmp_path, crash_after, capsys):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(_argv(byte_checkpoint, "--out", whole)) == 0
    calls = crash_after(2)  # 8 samples in 4 batches of 2: the third batch crashes
    with pytest.raises(RuntimeError, match="injected crash"):
        main(_argv(byte_checkpoint, "--out", broken))
    assert len(SampleLog(broken / "samples.jsonl").read()) == 4 and not (broken / "results.json").exists()
    calls.clear()
    code = main(
        ["eval", "passkey", "--resume", str(broken), "--no-progress", "--no-plot"]
    )  # the flags come from run.json
    assert code == 0
    assert calls == [2, 2]  # only the two batches the crash left were asked
    assert _comparable(broken / "results.json") == _comparable(whole / "results.json")
    run = json.loads((broken / "results.json").read_text())["run"]
    assert len(run["resumed"]) == 1 and run["resumed"][0]["at_utc"]
    assert len((broken / "samples.jsonl").read_text().splitlines()) == 8


def test_results_carry_the_full_setting(byte_checkpoint, tmp_path):
    from longreach import __version__

    out = tmp_path / "run"
    argv = _argv(byte_checkpoint, "--out", out)
    argv += ["--rope-scaling", '{"rope_type": "linear", "factor": 2}', "--kv-cache-dtype", "int8"]
    assert main(argv) == 0
    run = json.loads((out / "results.json").read_text())["run"]
    assert run["model"] == str(byte_checkpoint) and run["endpoint"] is None
    assert run["rope_scaling"] == {"rope_type": "linear", "factor": 2}
    assert run["dtype"] == "fp32" and run["kv_cache_dtype"] == "int8" and run["device"] == "cpu"
    assert run["checkpoint_max_position_embeddings"] == 4096 and run["backend"] == "engine"
    assert run["longreach_version"] == __version__ and run["started_utc"].endswith("+00:00")
    assert run["command"] and run["apply_chat_template"] is False
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["arguments"]["lengths"] == "256,512" and "api_key" not in recorded["arguments"]
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["length"] == 256


def test_an_existing_output_directory_is_never_overwritten(byte_checkpoint, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_argv(byte_checkpoint, "--out", out)) == 2
    err = capsys.readouterr().err
    assert f"output directory {out} already exists and is not empty" in err and f"--resume {out}" in err
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [
        "notes.txt"
    ]
    assert main(["eval", "passkey", "--resume", str(out)]) == 2
    assert "no run.json there" in capsys.readouterr().err
    fresh = tmp_path / "fresh"  # a run that fails before its first sample leaves nothing behind
    assert main(_argv(tmp_path / "missing-model", "--out", fresh)) == 2 and not fresh.exists()


def test_resume_refuses_other_flags_and_another_task(byte_checkpoint, tmp_path, capsys, crash_after):
    out = tmp_path / "run"
    crash_after(0)
    with pytest.raises(RuntimeError):
        main(_argv(byte_checkpoint, "--out", out))
    assert main(["eval", "passkey", "--resume", str(out), "--lengths", "2k"]) == 2
    assert "--lengths '2k' (recorded '256,512')" in capsys.readouterr().err
    assert main(["eval", "niah", "--resume", str(out)]) == 2
    assert "that run is 'passkey', not 'niah'" in capsys.readouterr().err


def test_failed_samples_are_asked_again_and_a_torn_line_is_ignored(tmp_path):
    log = SampleLog(tmp_path / "samples.jsonl")
    common = dict(task="passkey", depth=0.0, expected=["1"], num_prompt_tokens=9, needle_depths=[0.0])
    ok = SampleResult(length=256, index=0, got=" 1", score=1.0, correct=True, error=None, **common)
    failed = SampleResult(
        length=256, index=1, got=None, score=None, correct=False, error="HTTP 500", **common
    )
    log.append([ok, failed])
    with open(log.path, "a") as f:
        f.write('{"task": "passkey", "len')  # the process died mid-write
    assert list(log.read()) == [(256, 0.0, 0)]


def test_api_keys_are_never_recorded(monkeypatch):
    import argparse

    from longreach.eval.record import command_line, recorded_arguments

    argv = ["longreach", "eval", "niah", "--api-key", "sk-1", "--api-key=sk-2"]
    argv += ["--setting", 'a={"endpoint": "http://h", "api_key": "sk-3"}']
    monkeypatch.setattr("sys.argv", argv)
    line = command_line()
    assert not any(k in line for k in ("sk-1", "sk-2", "sk-3")) and line.count("***") == 3
    args = argparse.Namespace(task="niah", api_key="sk-1", setting=[argv[-1]], lengths="1k")
    recorded = recorded_arguments(args)
    assert recorded == {"task": "niah", "setting": ['a={"endpoint": "http://h"}'], "lengths": "1k"}


def test_endpoint_api_key_falls_back_to_longreach_api_key(monkeypatch):
    import argparse

    from longreach.eval.cli import add_arguments

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("LONGREACH_API_KEY", "sk-served")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["passkey"]).api_key == "sk-served"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["passkey"]).api_key == "sk-openai"
    assert parser.parse_args(["passkey", "--api-key", "sk-flag"]).api_key == "sk-flag"
