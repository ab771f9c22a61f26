"""Schema-driven fuzzing of the HTTP server: schemathesis against the real `longreach serve` on loopback.

Starts `longreach serve` (the bundled model by default, fp32 on CPU, one torch thread), points schemathesis
at its `/openapi.json` and lets it generate requests for every operation: schema-valid bodies, bodies that
break the schema (wrong types, out-of-range numbers, missing fields, broken JSON, odd unicode), boundary
values, wrong methods, missing or wrong API keys. Every answer is checked: never a 5xx, status, content type and body as the schema
documents them, schema-breaking input rejected with a 4xx, and an answer within `--request-timeout`
seconds (a hang is a failure). Afterwards `/health` must answer 200 and no KV block may be held.

    .venv/bin/python benchmarks/fuzz_server.py --out /tmp/fuzz              # 300 examples per operation
    .venv/bin/python benchmarks/fuzz_server.py --model path/to/ckpt --max-examples 50

Writes fuzz.json (the figures), fuzz.md (the table), schemathesis.json (its run report) and fuzz.har.json
(every request and answer) to --out; exit status 0 when everything held.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by a test
from serve_process import ServeProcess  # noqa: E402

from longreach.model.bundled import BUNDLED_MODEL_DIR  # noqa: E402

# positive_data_acceptance wants every schema-valid body answered 2xx; some valid bodies are rightly refused
# (a prompt + max_tokens over the context length, ids outside the vocabulary): reported, not a failure.
CHECKS = ["--checks", "all", "--exclude-checks", "positive_data_acceptance"]


def run_schemathesis(url: str, out: Path, args) -> tuple[int, float]:
    """`st run` against `url`; (its exit status, wall seconds). Its reports land in `out`."""
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        url + "/openapi.json",
        *CHECKS,
        "--max-examples",
        str(args.max_examples),
        "--phases",
        args.phases,
        "--seed",
        str(args.seed),
        *(["--header", f"Authorization: Bearer {args.api_key}"] if args.api_key else []),
        "--workers",
        str(args.workers),
        "--request-timeout",
        str(args.request_timeout),
        "--max-response-time",
        str(args.request_timeout),
        "--continue-on-failure",
        "--generation-database",
        "none",
        "--no-color",
        "--report",
        "har,json",
        "--report-dir",
        str(out),
        "--report-har-path",
        str(out / "fuzz.har.json"),
        "--report-json-path",
        str(out / "schemathesis.json"),
    ]
    start = time.perf_counter()
    with open(out / "schemathesis.log", "w") as log:
        code = subprocess.call(cmd, cwd=out, stdout=log, stderr=subprocess.STDOUT)
    return code, time.perf_counter() - start


def operation(method: str, url: str, operations: set[str]) -> str:
    """'POST /v1/completions', 'GET /v1/models/{model_id}'; a method the route does not have: 'other methods'."""
    path = re.sub(r"^https?://[^/]+", "", url).split("?")[0]
    if path.startswith("/v1/models/"):
        path = "/v1/models/{model_id}"
    label = f"{method} {path}"
    return label if label in operations else "other methods"


def count_statuses(har: dict, operations: set[str]) -> dict[str, collections.Counter]:
    """Statuses per operation from the HAR log; 0 is a request that got no answer (timeout, reset)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for entry in har["log"]["entries"]:
        request = entry["request"]
        if "X-Schemathesis-Probe" in {h["name"] for h in request.get("headers", [])}:
            continue  # schemathesis's capability probes, not test cases
        counts[operation(request["method"], request["url"], operations)][entry["response"]["status"]] += 1
    return counts


def count_streams(har: dict) -> dict[str, int]:
    """Server-sent event answers read to `data: [DONE]`, and those the client stopped reading (schemathesis
    reads at most 20 events of a stream, then closes the connection: the server must abort and free them)."""
    done = cut = 0
    for entry in har["log"]["entries"]:
        response = entry["response"]
        if "text/event-stream" in response["content"].get("mimeType", ""):
            if response["content"].get("text", "").rstrip().endswith("data: [DONE]"):
                done += 1
            else:
                cut += 1
    return {"streams_read_to_the_end": done, "streams_left_by_the_client": cut}


def summarize(
    counts: dict[str, collections.Counter], report: dict, server_after: dict, wall: float, st_exit: int
) -> dict:
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    accepted = sum(
        rates.get("accepted", 0)
        for phases in report.get("valid_rates", {}).values()
        for rates in phases.values()
    )
    rejected = sum(
        rates.get("rejected", 0)
        for phases in report.get("valid_rates", {}).values()
        for rates in phases.values()
    )
    return {
        "requests": sum(total.values()),
        "statuses": {str(k): v for k, v in sorted(total.items())},
        "by_operation": {op: {str(k): v for k, v in sorted(c.items())} for op, c in sorted(counts.items())},
        "num_5xx": sum(v for k, v in total.items() if k >= 500),
        "no_answer": total.get(0, 0),
        "test_cases": report.get("test_cases", {}).get("generated"),
        "failures": [f"{f['code']} {f['title']}: {f['count']}" for f in report.get("failures", [])],
        "errors": [f"{e['title']}: {e['count']}" for e in report.get("errors", [])],
        "warnings": sorted(name for name, items in report.get("warnings", {}).items() if items),
        "valid_bodies_accepted": accepted,
        "valid_bodies_refused": rejected,
        "schemathesis_exit_status": st_exit,
        "wall_s": round(wall, 1),
        **server_after,
    }


def table(row: dict) -> str:
    def statuses(counts: dict[str, int]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in counts.items())

    lines = ["| operation | requests | statuses |", "|---|---:|---|"]
    for op, counts in row["by_operation"].items():
        lines.append(f"| {op} | {sum(counts.values())} | {statuses(counts)} |")
    lines.append(f"| **all** | **{row['requests']}** | {statuses(row['statuses'])} |")
    summary = (
        f"5xx: {row['num_5xx']}; no answer (timeout): {row['no_answer']}; schemathesis failures: "
        f"{len(row['failures'])}, errors: {len(row['errors'])}; wall {row['wall_s']} s; /health after: "
        f"{row['health_after']}; KV blocks held after: {row['kv_blocks_used_after']} of {row['kv_blocks_total']}; "
        f"SSE streams read to the end / left by the client: {row['streams_read_to_the_end']} / "
        f"{row['streams_left_by_the_client']}; engine requests aborted: {row['aborted']}; "
        f"server exit status {row['exit_status']}"
    )
    return "\n".join([*lines, "", summary])


def fuzz(args, out: Path) -> dict:
    server = ServeProcess(args.serve_args, args.threads)
    try:
        with httpx.Client(timeout=30) as http:
            schema = http.get(server.url + "/openapi.json").json()
        operations = {f"{m.upper()} {p}" for p, ops in schema["paths"].items() for m in ops}
        st_exit, wall = run_schemathesis(server.url, out, args)
        server.wait_idle(60)
        health = httpx.get(server.url + "/health", timeout=30)
        after = {
            "health_after": health.status_code,
            "kv_blocks_used_after": int(server.metric("kv_cache_blocks_used")),
            "kv_blocks_total": int(server.metric("kv_cache_blocks_total")),
            "requests_running_after": int(server.metric("num_requests_running")),
            "generated_tokens": int(server.metric("generation_tokens_total")),
            "aborted": int(server.metric("request_success_total", '{finished_reason="abort"}')),
        }
    finally:
        exit_status = server.stop()
    if any("Traceback" in line for line in server.log):
        (out / "server.log").write_text("".join(server.log))
    har = json.loads((out / "fuzz.har.json").read_text())
    report = json.loads((out / "schemathesis.json").read_text())
    row = summarize(count_statuses(har, operations), report, after, wall, st_exit)
    row.update(count_streams(har))
    row.update(
        exit_status=exit_status,
        server_tracebacks=sum("Traceback" in line for line in server.log),
        command=" ".join(args.serve_args),
        max_examples=args.max_examples,
        phases=args.phases,
    )
    return row


def is_clean(row: dict) -> bool:
    return (
        row["num_5xx"] == 0
        and row["no_answer"] == 0
        and not row["failures"]
        and not row["errors"]
        and row["health_after"] == 200
        and row["kv_blocks_used_after"] == 0
        and row["exit_status"] == 0
        and row["server_tracebacks"] == 0
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument(
        "--max-examples",
        type=int,
        default=300,
        help="generated cases per operation in the fuzzing phase (the coverage phase's boundary and type cases "
        "come on top)",
    )
    p.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=128,
        help="small, so that valid requests (up to n=128 choices) stay cheap on a CPU",
    )
    p.add_argument("--num-kv-blocks", type=int, default=256)
    p.add_argument(
        "--api-key",
        default="fuzz-key",
        help="the server requires it and schemathesis sends it, also checking that requests without it "
        "get 401 ('' for none)",
    )
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds; no answer by then is a hang")
    p.add_argument("--workers", type=int, default=1, help="concurrent schemathesis workers")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=None, help="directory for the reports (default: a temporary one)"
    )
    args = p.parse_args(argv)
    # the model explicit: `longreach serve` alone serves SmolLM2 when it is installed
    args.serve_args = (
        [args.model or str(BUNDLED_MODEL_DIR)]
        + [
            "--served-model-name",
            "demo",
            "--max-model-len",
            str(args.max_model_len),
            "--num-kv-blocks",
            str(args.num_kv_blocks),
        ]
        + (["--api-key", args.api_key] if args.api_key else [])
    )
    out = args.out or Path(tempfile.mkdtemp(prefix="fuzz-server-"))
    out.mkdir(parents=True, exist_ok=True)
    row = fuzz(args, out)
    (out / "fuzz.json").write_text(json.dumps(row, indent=2))
    (out / "fuzz.md").write_text(table(row) + "\n")
    print(table(row))
    for problem in row["failures"] + row["errors"]:
        print(f"schemathesis: {problem} (details in {out / 'schemathesis.log'})", file=sys.stderr)
    return 0 if is_clean(row) else 1


if __name__ == "__main__":
    sys.exit(main())
