"""The engine's host time per decode step: step wall time minus the model's forward time, on a tiny model.

With a model this small the forward pass is cheap, so what is left of a step is ours: scheduling, building the
step's input tensors (`runner.prepare`), sampling, appending tokens and output processing. Measured for 1, 64
and 256 running sequences, every one decoding (their 16-token prompts are prefilled before the timing starts);
`--context N` puts a shared N-token prefix before every prompt (a prefix-cache hit), so each request's block
table is long, as in long-context serving, while the prefill stays cheap.

    python benchmarks/host_overhead.py                       # this tree
    python benchmarks/host_overhead.py --baseline 5522bf4    # and a git ref side by side, alternating
    python benchmarks/host_overhead.py --compare-legacy      # and this tree with the old step inputs

`--baseline REF` checks REF out into a git worktree under /tmp (once) and runs this script against that tree's
package in a subprocess, alternating with this tree round by round, so both see the same machine load. Each figure is
the median over rounds of a per-round median over steps. One torch thread by default. "host CPU ms" is the
same difference in the main thread's CPU time (time.thread_time): on a loaded machine wall time also counts
the time other processes held the core, CPU time does not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=4096,
)
PROMPT_LEN = 16


class _TimedModel:
    """Wraps the runner's model: the seconds each forward call took (synchronised on CUDA)."""

    def __init__(self, model, device):
        import torch

        self.model = model
        self.sync = torch.cuda.synchronize if device == "cuda" else None
        self.seconds = self.cpu_seconds = 0.0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        if self.sync:
            self.sync()
        start, cpu = time.perf_counter(), time.thread_time()
        out = self.model(*args, **kwargs)
        if self.sync:
            self.sync()
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.thread_time() - cpu
        return out


def _engine(num_seqs: int, num_steps: int, device: str, context: int = 0):
    import torch

    from longreach.config import CacheConfig, ModelConfig, SchedulerConfig
    from longreach.engine.llm import LLMEngine
    from longreach.engine.sampling_params import SamplingParams
    from longreach.model.loader import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf_dict(TINY), dtype=torch.float32, device=device)
    blocks_per_seq = -(-(PROMPT_LEN + num_steps + 8) // 16) + 2
    engine = LLMEngine(
        model,
        cache_config=CacheConfig(
            block_size=16, num_blocks=num_seqs * blocks_per_seq + 4 * (context // 16 + 1)
        ),
        scheduler_config=SchedulerConfig(
            max_model_len=4096, max_num_seqs=max(num_seqs, 1), max_num_batched_tokens=2048
        ),
    )
    params = SamplingParams(max_tokens=num_steps + 8, temperature=0, ignore_eos=True)
    prefix = [(3 * j + 1) % TINY["vocab_size"] for j in range(context)]  # shared: a prefix-cache hit
    for i in range(num_seqs):
        engine.add_request(prefix + [(7 * i + j) % TINY["vocab_size"] for j in range(PROMPT_LEN)], params)
    return engine


def measure(num_seqs: int, num_steps: int, device: str, context: int = 0, legacy: bool = False) -> dict:
    """Per-step medians (ms) of `num_steps` decode steps with `num_seqs` sequences running, each holding a
    shared `context`-token prefix (a prefix-cache hit: long block tables, cheap prefill) and its own prompt."""
    engine = _engine(num_seqs, num_steps, device, context)
    if legacy:
        from host_overhead_legacy import use_legacy_path  # the old path, from this script's folder

        use_legacy_path(engine)
    while not all(s.num_output_tokens for s in engine.requests.values()):
        engine.step()  # prefill (in chunks of the token budget) until every request decodes
    for _ in range(3):  # warm-up decode steps
        engine.step()
    timed = engine.runner.model = _TimedModel(engine.runner.model, device)
    prepare, steps, forwards = engine.runner.prepare, [], []
    prepare_times: list[float] = []

    def timed_prepare(batch):
        start = time.perf_counter()
        out = prepare(batch)
        prepare_times.append(time.perf_counter() - start)
        return out

    engine.runner.prepare = timed_prepare
    host_cpu = []
    for _ in range(num_steps):
        before, before_cpu = timed.seconds, timed.cpu_seconds
        start, cpu = time.perf_counter(), time.thread_time()
        engine.step()
        steps.append(time.perf_counter() - start)
        forwards.append(timed.seconds - before)
        host_cpu.append(time.thread_time() - cpu - (timed.cpu_seconds - before_cpu))
    hosts = [s - f for s, f in zip(steps, forwards)]
    ms = lambda xs: round(1e3 * statistics.median(xs), 3)  # noqa: E731
    return dict(
        num_seqs=num_seqs,
        step_ms=ms(steps),
        forward_ms=ms(forwards),
        host_ms=ms(hosts),
        host_cpu_ms=ms(host_cpu),
        prepare_ms=ms(prepare_times),
    )


def _worker(args) -> None:
    import torch

    import longreach

    torch.set_num_threads(args.threads)
    rows = [measure(n, args.steps, args.device, args.context, args.legacy) for n in args.seqs]
    print(json.dumps(dict(package=longreach.__file__, rows=rows)))


def _baseline_tree(ref: str) -> Path:
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", ref], check=True, capture_output=True, text=True
    ).stdout.strip()
    tree = Path(f"/tmp/longreach-baseline-{sha}")
    if not tree.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), sha],
            check=True,
            capture_output=True,
        )
    return tree


def _run_tree(tree: Path, args, legacy: bool = False) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]  # this script, the tree's package
    cmd += ["--legacy"] if legacy else []
    cmd += ["--seqs", *map(str, args.seqs), "--steps", str(args.steps), "--threads", str(args.threads)]
    cmd += ["--device", args.device, "--context", str(args.context)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tree, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if not result["package"].startswith(str(tree)):
        raise RuntimeError(f"the worker imported longreach from {result['package']}, not from {tree}")
    return result["rows"]


def _median_rows(rounds: list[list[dict]]) -> list[dict]:
    rows = []
    for per_n in zip(*rounds):
        row = {"num_seqs": per_n[0]["num_seqs"]}
        for key in ("step_ms", "forward_ms", "host_ms", "host_cpu_ms", "prepare_ms"):
            row[key] = round(statistics.median(r[key] for r in per_n), 3)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per size")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (with --baseline)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--context", type=int, default=0, help="tokens of a shared prompt prefix every sequence holds"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline", help="a git ref measured side by side in a worktree")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--compare-legacy",
        action="store_true",
        help="also this tree with the old list-built step inputs (host_overhead_legacy.py), alternating",
    )
    parser.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if any(n < 1 for n in args.seqs) or args.steps < 1 or args.context < 0:
        raise SystemExit(
            f"--seqs {args.seqs} and --steps {args.steps} must all be >= 1, --context {args.context} >= 0"
        )
    trees = {"this tree": (ROOT, False)}
    if args.compare_legacy:
        trees = {"this tree, old step inputs": (ROOT, True), **trees}
    if args.baseline:
        trees = {f"baseline {args.baseline}": (_baseline_tree(args.baseline), False), **trees}
    rounds: dict[str, list] = {name: [] for name in trees}
    for _ in range(args.rounds if len(trees) > 1 else 1):
        for name, (tree, legacy) in trees.items():
            rounds[name].append(_run_tree(tree, args, legacy))
    results = {name: _median_rows(r) for name, r in rounds.items()}
    print("| tree | running sequences | step ms | forward ms | host ms | host CPU ms | prepare ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rows in results.items():
        for r in rows:
            print(
                f"| {name} | {r['num_seqs']} | {r['step_ms']} | {r['forward_ms']} | {r['host_ms']} "
                f"| {r['host_cpu_ms']} | {r['prepare_ms']} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
