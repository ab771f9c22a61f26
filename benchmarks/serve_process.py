"""`longreach serve` in a subprocess on a free loopback port, for the benchmarks that load the real command
(serve_load.py, fuzz_server.py): started with fp32 on CPU, read through /metrics, stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx


class ServeProcess:
    """args: `longreach serve` arguments (model, flags); threads: its torch threads (OMP_NUM_THREADS)."""

    def __init__(self, args: list[str], threads: int, start_timeout: float = 180.0):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        fixed = ["--port", "0", "--dtype", "fp32", "--device", "cpu", "--log-level", "warning"]
        cmd = [sys.executable, "-m", "longreach", "serve", *fixed, *args]
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        self.url, self.log = None, []
        deadline = time.monotonic() + start_timeout
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"`{' '.join(cmd)}` did not start (exit status {self.proc.poll()})")
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            self.url = match and match.group(1)
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def metric(self, name: str, labels: str = "") -> float:
        """A /metrics sample `longreach_<name><labels>`; without labels, the sum over every label set."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        suffix = re.escape(labels) if labels else r"(?:\{[^}]*\})?"
        return sum(float(v) for v in re.findall(rf"^longreach_{name}{suffix}\s+(\S+)$", text, re.M))

    def wait_idle(self, timeout: float) -> None:
        """Until no request runs or waits (or `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while (self.metric("num_requests_running") or self.metric("num_requests_waiting")) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM (graceful: in-flight requests drain) and the exit status; killed after a minute."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
