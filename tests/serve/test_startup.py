"""What `longreach serve` says when it starts: a summary with the device, dtypes and KV capacity as log
records at --log-level, and never the API key, in any line of its output. Also --tensor-parallel-size 2
on CPU: the server starts its own second rank and answers as one process does."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch.distributed as dist

SECRET = "sk-very-secret-4d1f"


def _start(argv, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "longreach",
            "serve",
            *argv,
            "--port",
            "0",
            "--dtype",
            "fp32",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines, url, deadline = [], None, time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "server exited before it started:\n" + "".join(lines)
        lines.append(line)
        match = re.search(r"serving '[^']+' at (http://127\.0\.0\.1:\d+)/v1", line)
        url = match and match.group(1)
    assert url, "no URL announced:\n" + "".join(lines)
    rest = []
    reader = threading.Thread(target=lambda: rest.extend(proc.stdout), daemon=True)
    reader.start()
    return proc, url, lines, rest, reader


def _stop(proc, reader):
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    reader.join(10)
    return code


def test_startup_summary_and_no_secret_in_any_line(byte_model_dir):
    argv = [str(byte_model_dir), "--served-model-name", "tiny", "--max-model-len", "256"]
    argv += ["--num-kv-blocks", "40", "--block-size", "16", "--log-level", "debug"]
    proc, url, lines, rest, reader = _start(argv, {"LONGREACH_API_KEY": SECRET})
    try:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        ok = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {SECRET}"})
        refused = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert ok.status_code == 200 and refused.status_code == 401
    finally:
        code = _stop(proc, reader)
    output = "".join(lines + rest)
    assert code == 0, output
    assert SECRET not in output
    assert (
        'Authorization: Bearer $LONGREACH_API_KEY"' in output
    )  # the curl line reads it from the environment
    assert re.search(r"INFO +longreach\.serve: model \S+ served as 'tiny' on cpu, dtype float32", output)
    # 40 blocks x 16 tokens = 640 tokens = 2 whole requests of 256 tokens (16 blocks each); a block is
    # 2 layers x K,V x 16 tokens x 2 KV heads x 16 dims x 4 bytes = 8 KiB
    assert "KV cache: fp32, 320.0 KiB, 640 tokens = 2 request(s) of the full max_model_len 256" in output
    assert "prefix caching on, chunked prefill on" in output and "api key: set (not shown)" in output
    assert f"listening at {url}/v1" in output


def test_log_level_warning_hides_the_summary(byte_model_dir, capsys):
    """In-process: the handler follows --log-level (the summary is INFO) and the key is redacted anyway."""
    import logging

    from longreach.logging_setup import configure_logging

    configure_logging("warning", secrets=[SECRET])
    logger = logging.getLogger("longreach.serve")
    logger.info("invisible")
    logger.warning("key is %s", SECRET)
    err = capsys.readouterr().err
    assert "invisible" not in err and "key is ***" in err and SECRET not in err
    configure_logging("info")
    logger.info("visible now")
    assert "visible now" in capsys.readouterr().err


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
def test_tensor_parallel_2_on_cpu_answers_as_one_process(byte_model_dir):
    from longreach import LLM, SamplingParams

    prompt, max_tokens = "The pass key is 48213. Remember it. The pass key is", 12
    llm = LLM(byte_model_dir, dtype="fp32", device="cpu", max_model_len=256, num_kv_blocks=64, block_size=8)
    [expected] = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    argv = [str(byte_model_dir), "--served-model-name", "tiny", "--max-model-len", "256"]
    argv += ["--num-kv-blocks", "64", "--block-size", "8", "--tensor-parallel-size", "2"]
    proc, url, lines, rest, reader = _start(argv)
    try:
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        answers = [httpx.post(url + "/v1/completions", json=body, timeout=60).json() for _ in range(2)]
    finally:
        code = _stop(proc, reader)
    output = "".join(lines + rest)
    assert code == 0, output
    assert "tensor parallel size: 2" in output
    for answer in answers:
        assert answer["choices"][0]["text"] == expected.text, output
