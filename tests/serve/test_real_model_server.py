"""What `make run` does with the real model installed: `longreach serve` with no model serves SmolLM2-135M-Instruct
under that name; the announced curl and the official openai client get a sensible chat answer."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from longreach.model.bundled import REAL_MODEL_INSTALL, REAL_MODEL_NAME, real_model_path

pytestmark = pytest.mark.skipif(
    real_model_path() is None, reason=f"the real model is not installed ({REAL_MODEL_INSTALL})"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, announced curl line) of `longreach serve` started with no model, on a free port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["LONGREACH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    argv = [sys.executable, "-m", "longreach", "serve", "--port", "0", "--log-level", "warning"]
    argv += ["--max-model-len", "2048", "--kv-cache-memory", "256MiB"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    url, curl, deadline = None, None, time.monotonic() + 300
    try:
        while curl is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited before it started"
            if f"serving {REAL_MODEL_NAME!r} at http://127.0.0.1:" in line:
                url = line.split(" at ", 1)[1].split("/v1", 1)[0]
            curl = line.split("try: ", 1)[1].strip() if "try: curl " in line else None
        assert url and curl, "no URL or curl announced"
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield url, curl
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_announced_curl_gets_a_sensible_chat_answer(served):
    _, curl = served
    assert "/v1/chat/completions" in curl
    done = subprocess.run(
        shlex.split(curl) + ["--silent", "--max-time", "120"], capture_output=True, text=True, check=True
    )
    answer = json.loads(done.stdout)
    assert answer["model"] == REAL_MODEL_NAME
    assert "Paris" in answer["choices"][0]["message"]["content"], answer


def test_openai_client_chat(served):
    openai = pytest.importorskip("openai")
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [REAL_MODEL_NAME]
    reply = client.chat.completions.create(
        model=REAL_MODEL_NAME,
        messages=[{"role": "user", "content": "Name three primary colors."}],
        max_tokens=24,
        temperature=0,
    )
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and "red" in text.lower() and "blue" in text.lower(), text
