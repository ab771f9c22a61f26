"""What an eval run keeps on disk so that it can be understood later and continued after a crash.

An output directory holds:

    run.json        the run: task, the flags it was started with (never the API key), the command line,
                    the longreach version and the UTC start time; each --resume adds its own time
    samples.jsonl   one JSON line per finished sample, appended (and flushed to disk) as each batch ends;
                    a comparison keeps one per setting, in the setting's subdirectory
    results.json    written at the end; its "run" entry is the full setting of `run_setting`

`--resume DIR` reads run.json back (the recorded flags replace the defaults; a flag given again with another
value is an error), skips every sample samples.jsonl already holds with an answer, asks again the ones whose
request failed, and writes the same results.json an uninterrupted run would have written (only the
timings, `elapsed_s` and the run's times and command lines, differ). A directory that already holds files
is never written into without --resume.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from longreach.eval.results import SampleResult

RUN_FILE = "run.json"
SAMPLES_FILE = "samples.jsonl"
# flags that say how to run, not what is measured: a resumed run may change them
OPERATIONAL = {"resume", "out", "no_plot", "no_progress", "api_key", "concurrency", "timeout", "retries"}
SampleKey = tuple[int, float | None, int]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """The command as typed (`longreach eval ...` when run through the console script), API keys as ***."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("longreach", "__main__.py"):
        argv[0] = "longreach"
    for i, arg in enumerate(argv):
        if arg == "--api-key" and i + 1 < len(argv):
            argv[i + 1] = "***"
        elif arg.startswith("--api-key="):
            argv[i] = "--api-key=***"
        elif i and argv[i - 1] == "--setting":
            argv[i] = _without_api_key(arg, mask=True)
    return shlex.join(argv)


def _without_api_key(entry: str, mask: bool = False) -> str:
    """A --setting NAME=JSON entry with its api_key dropped (or masked): keys are never written to disk."""
    name, sep, text = entry.partition("=")
    try:
        options = json.loads(text)
    except ValueError:
        return entry
    if not sep or not isinstance(options, dict) or "api_key" not in options:
        return entry
    if mask:
        options["api_key"] = "***"
    else:
        del options["api_key"]
    return f"{name}={json.dumps(options)}"


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Never write into a directory holding files unless resuming; a resumed one must hold a run."""
    if resume:
        if not (out_dir / RUN_FILE).is_file():
            raise ValueError(f"--resume {out_dir}: no {RUN_FILE} there, so no eval run to continue")
        return
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(
            f"output directory {out_dir} already exists and is not empty; continue its run with "
            f"--resume {out_dir}, or give a new --out DIR"
        )


def recorded_arguments(args) -> dict[str, Any]:
    """The flags worth recording (JSON values; the API key never, nor a --setting's: a resumed run uses
    --api-key / the environment's)."""
    out = {k: v for k, v in sorted(vars(args).items()) if k not in OPERATIONAL and not callable(v)}
    if out.get("setting"):
        out["setting"] = [_without_api_key(entry) for entry in out["setting"]]
    return out


def write_run(out_dir: Path, args) -> dict[str, Any]:
    """run.json of a new run."""
    from longreach import __version__  # lazy: the package root imports the engine

    run = {
        "task": args.task,
        "arguments": recorded_arguments(args),
        "command": command_line(),
        "longreach_version": __version__,
        "started_utc": utc_now(),
        "resumed": [],
    }
    _write_json(out_dir / RUN_FILE, run)
    return run


def resume_run(out_dir: Path, args, defaults) -> dict[str, Any]:
    """Load run.json, put its recorded flags into `args` and note this resumption.

    defaults: the parser's defaults for args.task; a flag whose value differs from both its default and the
    recorded one was given again with another value, which is refused (naming it)."""
    run = json.loads((out_dir / RUN_FILE).read_text())
    if run["task"] != args.task:
        raise ValueError(f"--resume {out_dir}: that run is {run['task']!r}, not {args.task!r}")
    recorded = run["arguments"]
    clashes = [
        name
        for name, value in recorded_arguments(args).items()
        if name in recorded and value != recorded[name] and value != getattr(defaults, name, None)
    ]
    if clashes:
        detail = ", ".join(
            f"--{n.replace('_', '-')} {getattr(args, n)!r} (recorded {recorded[n]!r})" for n in clashes
        )
        raise ValueError(f"--resume {out_dir}: the run was started with other values: {detail}; drop them")
    for name, value in recorded.items():
        setattr(args, name, value)
    run["resumed"].append({"at_utc": utc_now(), "command": command_line()})
    _write_json(out_dir / RUN_FILE, run)
    return run


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def sample_key(sample) -> SampleKey:
    return (int(sample.length), None if sample.depth is None else float(sample.depth), int(sample.index))


class SampleLog:
    """samples.jsonl: appended per batch (flushed and fsynced), read back keyed by (length, depth, index)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, samples: Iterable[SampleResult]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(asdict(sample)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> dict[SampleKey, SampleResult]:
        """The recorded samples that got an answer (a later line for the same sample wins); a torn last line
        (the process died while writing it) is ignored."""
        if not self.path.is_file():
            return {}
        done: dict[SampleKey, SampleResult] = {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                sample = SampleResult(**json.loads(line))
            except (ValueError, TypeError):
                if number == len(lines):
                    break
                raise ValueError(f"{self.path}:{number}: not a sample record: {line[:120]!r}") from None
            if sample.error is None:
                done[sample_key(sample)] = sample
            else:
                done.pop(sample_key(sample), None)
        return done


def run_setting(options: dict, args, run: dict[str, Any], backend=None) -> dict[str, Any]:
    """The full setting of one grid, for results.json: what answered (model path or Hub id / endpoint) and
    how (rope, dtype, KV dtype, device, chat template), the checkpoint's own rope, and the run's facts."""
    model = options.get("model")
    setting = {
        "model": None if options.get("endpoint") else str(model or "bundled demo model"),
        "endpoint": options.get("endpoint"),
        "endpoint_api": getattr(backend, "api", None) if options.get("endpoint") else None,
        "model_name": getattr(backend, "model_name", None) or options.get("model_name"),
        "tokenizer": options.get("tokenizer"),
        "rope_scaling": options.get("rope_scaling") or "as in the checkpoint",
        "dtype": options.get("dtype") or "as stored",
        "kv_cache_dtype": options.get("kv_cache_dtype") or "auto",
        "device": None if options.get("endpoint") else args.device or _default_device(),
        "apply_chat_template": bool(args.apply_chat_template),
        "backend": getattr(backend, "kind", None),
    }
    setting.update(_checkpoint_facts(model))
    setting.update({k: run[k] for k in ("longreach_version", "started_utc", "command")})
    if run.get("resumed"):
        setting["resumed"] = run["resumed"]
    setting["finished_utc"] = utc_now()
    return setting


def _default_device() -> str:
    import torch  # lazy: keeps the record module light for --help

    return "cuda" if torch.cuda.is_available() else "cpu"


def _checkpoint_facts(model) -> dict[str, Any]:
    """The checkpoint's own rope config, window and stored dtype (from its config.json, when it has one)."""
    if model is None:
        return {}
    config = Path(model) / "config.json"
    if not config.is_file():
        return {}
    cfg = json.loads(config.read_text())
    return {
        "checkpoint_rope": cfg.get("rope_scaling") or cfg.get("rope_parameters"),
        "checkpoint_max_position_embeddings": cfg.get("max_position_embeddings"),
        "checkpoint_dtype": cfg.get("torch_dtype") or cfg.get("dtype"),
    }
