"""Endpoint mode against live HTTP servers started in the test: failures and timeouts are per-sample
results, retries recover transient errors, and a server wrapping the local model scores like the local run."""

import json
import re
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from longreach.eval.backends import EndpointBackend, LocalBackend, completions_url
from longreach.eval.runner import run_grid, write_report
from longreach.model.tokenizer import ByteTokenizer

API_KEY = "sk-test"


@contextmanager
def serve(answer):
    """An OpenAI-style server on a free port; `answer(body, attempt) -> (status, text | None, delay_s)`."""
    attempts, lock = {}, threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                return self._send(401, {"error": {"message": "invalid api key", "type": "auth"}})
            if self.path != "/v1/completions" or body.get("model") != "fake-model":
                return self._send(404, {"error": {"message": f"unknown route or model {body.get('model')}"}})
            with lock:
                attempt = attempts[body["prompt"]] = attempts.get(body["prompt"], 0) + 1
            status, text, delay = answer(body, attempt)
            time.sleep(delay)
            if status != 200:
                return self._send(status, {"error": {"message": "server exploded", "type": "server_error"}})
            self._send(
                200,
                {
                    "object": "text_completion",
                    "model": "fake-model",
                    "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                },
            )

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _flaky(body, attempt):
    """By pass key mod 4: 0 always HTTP 500, 1 answers too late, 2 fails once then answers, 3 answers."""
    key = int(re.search(r"The pass key is (\d+)", body["prompt"]).group(1))
    kind = key % 4
    if kind == 0:
        return 500, None, 0.0
    if kind == 1:
        return 200, f" {key}", 1.0
    if kind == 2 and attempt == 1:
        return 503, None, 0.0
    return 200, f" {key}. Remember it.", 0.0


def test_failing_and_slow_requests_are_reported_per_sample(tmp_path):
    with serve(_flaky) as url:
        backend = EndpointBackend(
            url,
            api_key=API_KEY,
            tokenizer=ByteTokenizer(),
            concurrency=6,
            timeout=0.3,
            retries=1,
            backoff=0.01,
        )
        assert backend.model_name == "fake-model"  # discovered through /v1/models
        result = run_grid(
            backend, "passkey", [512, 1024], depths=[0, 50, 100], num_samples=3, seed=1, progress=False
        )
    kinds = {}
    for s in result.samples:
        kinds.setdefault(int(s.expected[0]) % 4, []).append(s)
    assert set(kinds) == {0, 1, 2, 3}, "the seed should exercise every server behaviour"
    assert all("HTTP 500" in s.error and "after 2 attempts" in s.error for s in kinds[0])
    assert all("no answer" in s.error and "0.3 s" in s.error for s in kinds[1])
    assert all(s.error is None and s.correct for s in kinds[2] + kinds[3])  # the retry recovered kind 2
    # a failed request did not retrieve: it counts as a miss, and the table counts it as an error
    for length in (512, 1024):
        cell = [s for s in result.samples if s.length == length]
        failed = sum(s.error is not None for s in cell)
        assert 0 < failed < len(cell) and result.num_errors(length) == failed
        assert result.accuracy(length) == pytest.approx((len(cell) - failed) / len(cell))
        assert result.answered_accuracy(length) == 1.0
    num_errors = len(kinds[0]) + len(kinds[1])
    assert result.num_errors() == num_errors
    assert result.effective_length() is None  # below 85% once the failures count, and never claimed past them
    paths = write_report(result, tmp_path)
    saved = json.loads(paths["results"].read_text())
    assert saved["num_errors"] == num_errors and saved["effective_length"] is None
    summary = paths["summary"].read_text()
    errors_row = re.search(r"^errors\s+(\d+)\s+(\d+)$", summary, re.M)
    assert errors_row and sum(map(int, errors_row.groups())) == num_errors
    assert f"{num_errors} of {len(result.samples)} request(s) failed; each counts as a miss" in summary
    assert "100%" not in summary.split("mean")[1].splitlines()[0]  # the mean row no longer shows 100%


def test_client_errors_are_not_retried_and_unreachable_servers_do_not_crash():
    calls = []

    def count(body, attempt):
        calls.append(attempt)
        return 200, " 1", 0.0

    with serve(count) as url:
        wrong_key = EndpointBackend(url, api_key="sk-wrong", model_name="fake-model", retries=3, backoff=0.01)
        [error] = wrong_key.complete(["The pass key is 1."], 4)
        assert isinstance(error, Exception) and "HTTP 401" in str(error) and "invalid api key" in str(error)
        assert calls == []  # refused before the handler ran
    dead = EndpointBackend(url, model_name="fake-model", retries=1, backoff=0.01, timeout=1.0)
    results = dead.complete(["a", "b"], 4)
    assert all(isinstance(r, Exception) and "cannot reach" in str(r) for r in results)
    with pytest.raises(ValueError, match="--model-name"):
        EndpointBackend(url, timeout=1.0)


def test_completions_url_forms():
    assert completions_url("http://h:8000") == "http://h:8000/v1/completions"
    assert completions_url("http://h:8000/v1/") == "http://h:8000/v1/completions"
    assert (
        completions_url("https://api.example.com/v1/completions") == "https://api.example.com/v1/completions"
    )
    with pytest.raises(ValueError, match="http://"):
        completions_url("localhost:8000")


def test_a_server_wrapping_the_local_model_scores_like_the_local_run(byte_checkpoint):
    local = LocalBackend(byte_checkpoint)
    lock = threading.Lock()

    def model_answer(body, attempt):
        with lock:
            [text] = local.complete([body["prompt"]], body["max_tokens"])
        return 200, text, 0.0

    grid = dict(lengths=[512], depths=[0, 100], num_samples=1, max_new_tokens=6, progress=False)
    direct = run_grid(local, "niah", **grid)
    with serve(model_answer) as url:
        remote = EndpointBackend(
            url, api_key=API_KEY, model_name="fake-model", tokenizer=ByteTokenizer(), concurrency=2
        )
        served = run_grid(remote, "niah", **grid)
    assert [s.got for s in served.samples] == [s.got for s in direct.samples]
    assert [s.score for s in served.samples] == [s.score for s in direct.samples]
    assert [s.num_prompt_tokens for s in served.samples] == [s.num_prompt_tokens for s in direct.samples]


def test_longreach_serve_gives_the_same_scores_as_the_local_run(byte_checkpoint):
    """The real server (`longreach serve`, a subprocess) answers the same prompts with the same text."""
    pytest.importorskip("longreach.serve.server")
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "longreach",
            "serve",
            str(byte_checkpoint),
            "--port",
            "0",
            "--served-model-name",
            "tiny",
            "--api-key",
            API_KEY,
            "--max-model-len",
            "1024",
            "--num-kv-blocks",
            "256",
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "longreach serve exited before it started"
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            url = match and match.group(1)
        assert url, "longreach serve announced no URL"
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        grid = dict(lengths=[512], depths=[0, 100], num_samples=1, max_new_tokens=6, progress=False)
        served = run_grid(
            EndpointBackend(url, api_key=API_KEY, tokenizer=ByteTokenizer(), concurrency=2, timeout=120),
            "passkey",
            **grid,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    direct = run_grid(LocalBackend(byte_checkpoint, device="cpu"), "passkey", **grid)
    assert served.model == "tiny" and all(s.error is None for s in served.samples)
    assert [s.got for s in served.samples] == [s.got for s in direct.samples]
    assert [s.score for s in served.samples] == [s.score for s in direct.samples]
