"""`longreach eval TASK`: where does a model's context actually stop working?

    longreach eval passkey --model ckpt/ --lengths 1k,2k,4k,8k --depths 0,10,...,100 --samples 5 --out out/
    longreach eval niah --endpoint http://localhost:8000 --model-name my-model --tokenizer ckpt/ --lengths 4k,8k
    longreach eval passkey --model ckpt/ --rope-scaling none --rope-scaling '{"rope_type": "yarn", "factor": 4}'
    longreach eval ppl --model ckpt/ --data book.txt --lengths 1k,2k,4k,8k
    longreach eval niah --model instruct/ --apply-chat-template       # each prompt as one user turn
    longreach eval niah --endpoint http://localhost:8000 --endpoint-api chat --tokenizer instruct/
    longreach eval passkey --resume eval-results/passkey              # continue an interrupted run

TASK is one of the generated tasks (`longreach.eval.tasks.TASKS`) or `ppl`. Several `--model`,
`--rope-scaling` or `--kv-cache-dtype` values (their combinations), or `--setting NAME=JSON` entries, run a
comparison: one table and one figure with a line per setting, plus each setting's own report.
No --model and no --endpoint: the bundled demo model.
The output directory must be new or empty (or the run --resume continues); see `record.py` for what it
keeps (run.json, samples.jsonl appended as samples finish, results.json with the full setting).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from pathlib import Path

from longreach.eval.real_text import HAYSTACK_TEXTS, PPL_TEXTS, resolve_text_arg
from longreach.eval.tasks import TASKS
from longreach.rope import parse_rope_scaling_arg

SETTING_KEYS = (
    "model",
    "endpoint",
    "model_name",
    "api_key",
    "tokenizer",
    "rope_scaling",
    "kv_cache_dtype",
    "dtype",
)


def parse_lengths(text: str) -> list[int]:
    """'1k,2k,4096,1.5K' -> [1024, 2048, 4096, 1536] (k = 1024)."""
    out = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", item)
        if not match:
            raise ValueError(f"--lengths: {item!r} is not a length (examples: 512, 4k, 1.5k, 1M)")
        scale = {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
        value = float(match.group(1)) * scale
        if value != int(value) or value < 1:
            raise ValueError(f"--lengths: {item!r} is not a whole number of tokens")
        out.append(int(value))
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    """'0,25,50' or an arithmetic progression '0,10,...,100' -> percentages."""
    items = [s.strip() for s in text.split(",")]
    try:
        if "..." in items:
            i = items.index("...")
            if i < 2 or i != len(items) - 2:
                raise ValueError
            a, b, end = float(items[i - 2]), float(items[i - 1]), float(items[i + 1])
            step = b - a
            if step <= 0:
                raise ValueError
            values = [float(v) for v in items[: i - 2]]
            n = int(round((end - a) / step))
            values += [round(a + k * step, 6) for k in range(n + 1)]
            if values[-1] != end:
                raise ValueError
        else:
            values = [float(v) for v in items]
    except ValueError:
        raise ValueError(
            f"--depths: {text!r} must be percentages like '0,50,100' or '0,10,...,100'"
        ) from None
    bad = [v for v in values if not 0 <= v <= 100]
    if bad:
        raise ValueError(f"--depths: {bad} outside [0, 100]")
    return sorted(set(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=[*TASKS, "ppl"], help="what to measure: a generated task or ppl")
    _add_source_arguments(parser.add_argument_group("what to evaluate"))
    _add_grid_arguments(parser.add_argument_group("grid (generated tasks)"))
    _add_ppl_arguments(parser.add_argument_group("ppl"))
    _add_output_arguments(parser.add_argument_group("output"))


def _add_source_arguments(src) -> None:
    """The model or endpoint that answers, and the settings to compare it under."""
    src.add_argument(
        "--model",
        action="append",
        metavar="DIR",
        help="checkpoint directory (repeat to compare; default: the bundled demo model)",
    )
    src.add_argument(
        "--endpoint", metavar="URL", help="OpenAI-compatible server (…/v1/completions is POSTed)"
    )
    src.add_argument(
        "--endpoint-api",
        choices=["completions", "chat"],
        default="completions",
        help="what --endpoint is asked through: /v1/completions with the raw prompt, or "
        "/v1/chat/completions with the prompt as one user message (the server's chat template)",
    )
    src.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="instruct models as used: each prompt as one user turn of the checkpoint's chat template "
        "(its tokens count toward the length); with --endpoint it means --endpoint-api chat",
    )
    src.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY") or os.environ.get("LONGREACH_API_KEY"),
        help="bearer token for --endpoint (default: $OPENAI_API_KEY, else $LONGREACH_API_KEY)",
    )
    src.add_argument("--model-name", help="model name sent to --endpoint (default: the first of /v1/models)")
    src.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer sizing the prompts for --endpoint (default: an approximate count)",
    )
    src.add_argument("--concurrency", type=int, default=8, help="parallel requests to --endpoint (default 8)")
    src.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per request to --endpoint (default 600)"
    )
    src.add_argument("--retries", type=int, default=2, help="retries per failed request (default 2)")
    src.add_argument(
        "--rope-scaling",
        action="append",
        metavar="JSON",
        help="rope dict overriding the checkpoint's, or 'none' (repeat to compare)",
    )
    src.add_argument(
        "--kv-cache-dtype",
        action="append",
        metavar="D",
        help="KV cache dtype for the engine, e.g. int8 (repeat to compare)",
    )
    src.add_argument("--dtype", help="fp32 | bf16 | fp16 (default: as stored)")
    src.add_argument("--device", help="cpu | cuda | cuda:N for local models (default: CUDA when available)")
    src.add_argument(
        "--setting",
        action="append",
        metavar="NAME=JSON",
        help="a named setting to compare, JSON keys among " + ", ".join(SETTING_KEYS),
    )


def _add_grid_arguments(grid) -> None:
    """The length x depth grid of the generated tasks and how its prompts are batched and judged."""
    grid.add_argument("--lengths", default="1k,2k,4k", help="context lengths, k = 1024 (default 1k,2k,4k)")
    grid.add_argument("--depths", default="0,10,...,100", help="needle depths in %% (default 0,10,...,100)")
    grid.add_argument("--samples", type=int, default=3, help="samples per (length, depth) cell (default 3)")
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument(
        "--haystack",
        action="append",
        metavar="filler|real|FILE",
        help="filler: the built-in text (default); real: Alice in Wonderland (longreach.eval.real_text); "
        "or text file(s)",
    )
    grid.add_argument("--max-tokens", type=int, help="answer budget (default: the task's)")
    grid.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    grid.add_argument(
        "--threshold",
        type=float,
        default=85.0,
        help="accuracy for the effective context length, %% or fraction (default 85)",
    )


def _add_ppl_arguments(ppl) -> None:
    """The documents and windows perplexity is measured on."""
    ppl.add_argument(
        "--data",
        action="append",
        metavar="real|FILE",
        help="text file(s), one document each; real: three public-domain books "
        "(longreach.eval.real_text) (default: built-in synthetic text)",
    )
    ppl.add_argument("--stride", type=int, default=256, help="tokens scored per window (default 256)")
    ppl.add_argument("--max-windows", type=int, default=4, help="windows per document (default 4)")


def _add_output_arguments(out) -> None:
    out.add_argument(
        "--out",
        metavar="DIR",
        help="output directory, new or empty (default: eval-results/TASK); never overwritten",
    )
    out.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR with its recorded flags: samples already answered (samples.jsonl) "
        "are skipped",
    )
    out.add_argument("--no-plot", action="store_true", help="skip the PNG")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def _rope_name(rope: dict | None) -> str:
    if rope is None:
        return "rope=checkpoint"
    kind = rope.get("rope_type", rope.get("type", "?"))
    return f"rope={kind}" + (f" x{rope['factor']:g}" if isinstance(rope.get("factor"), (int, float)) else "")


def build_settings(args) -> dict[str | None, dict]:
    """name -> backend options. One unnamed entry (None) when nothing is compared."""
    if args.endpoint and args.model:
        raise ValueError("give --model or --endpoint, not both (compare them with --setting)")
    if args.endpoint and (args.rope_scaling or args.kv_cache_dtype or args.dtype or args.device):
        raise ValueError(
            "--rope-scaling, --kv-cache-dtype, --dtype and --device apply to local models; "
            "configure the server behind --endpoint instead"
        )
    base = {
        "endpoint": args.endpoint,
        "api_key": args.api_key,
        "model_name": args.model_name,
        "tokenizer": args.tokenizer,
        "dtype": args.dtype,
    }
    if args.setting:
        return _named_settings(args, base)
    return _flag_combinations(args, base)


def _named_settings(args, base: dict) -> dict[str, dict]:
    """One setting per --setting NAME=JSON; the keys it leaves out come from the flags (the first value
    of a repeated flag)."""
    settings = {}
    for entry in args.setting:
        name, options = _parse_setting(entry)
        defaults = {
            **base,
            "model": (args.model or [None])[0],
            "rope_scaling": parse_rope_scaling_arg(args.rope_scaling[0]) if args.rope_scaling else None,
            "kv_cache_dtype": (args.kv_cache_dtype or [None])[0],
        }
        if name in settings:
            raise ValueError(f"--setting name {name!r} is given twice")
        settings[name] = {**defaults, **options}
    return settings


def _parse_setting(entry: str) -> tuple[str, dict]:
    """'NAME=JSON' -> (NAME, the JSON object), its keys checked against SETTING_KEYS."""
    name, sep, text = entry.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--setting {entry!r} must look like NAME=JSON")
    try:
        options = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--setting {name}: not valid JSON ({exc}): {text!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--setting {name}: must be a JSON object")
    unknown = sorted(set(options) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(f"--setting {name}: unknown key(s) {unknown}; accepted: {list(SETTING_KEYS)}")
    return name.strip(), options


def _flag_combinations(args, base: dict) -> dict[str | None, dict]:
    """Every combination of the repeated --model, --rope-scaling and --kv-cache-dtype values, named by the
    flags that vary; a single combination is the one unnamed (None) setting."""
    models = args.model or [None]
    ropes = [parse_rope_scaling_arg(r) for r in args.rope_scaling] if args.rope_scaling else [None]
    kv_dtypes = args.kv_cache_dtype or [None]
    combos = list(itertools.product(models, ropes, kv_dtypes))
    if len(combos) == 1:
        model, rope, kv = combos[0]
        return {None: {**base, "model": model, "rope_scaling": rope, "kv_cache_dtype": kv}}
    settings = {}
    for model, rope, kv in combos:
        parts = []
        if len(models) > 1:
            parts.append(Path(model).name if model else "bundled")
        if len(ropes) > 1:
            parts.append(_rope_name(rope))
        if len(kv_dtypes) > 1:
            parts.append(f"kv={kv or 'default'}")
        name = " ".join(parts)
        while name in settings:
            name += "'"
        settings[name] = {**base, "model": model, "rope_scaling": rope, "kv_cache_dtype": kv}
    return settings


def _check_flags(args) -> None:
    if args.task == "ppl":
        if args.endpoint or any(o.get("endpoint") for o in _setting_options(args)):
            raise ValueError("ppl needs the model's logits: give --model DIR, not --endpoint")
        if args.kv_cache_dtype:
            raise ValueError("ppl runs whole windows without a KV cache: --kv-cache-dtype does not apply")
        if args.haystack:
            raise ValueError("--haystack is for the generated tasks; ppl reads --data")
    elif args.data:
        raise ValueError(f"--data is for ppl; {args.task} takes its haystack from --haystack")
    has_endpoint = args.endpoint or any(o.get("endpoint") for o in _setting_options(args))
    if args.task == "ppl" and args.apply_chat_template:
        raise ValueError("ppl scores raw text windows: --apply-chat-template does not apply")
    if args.endpoint_api != "completions" and not has_endpoint:
        raise ValueError(f"--endpoint-api {args.endpoint_api} needs --endpoint URL")
    for name in ("samples", "batch_size", "concurrency", "stride", "max_windows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")


def _setting_options(args) -> list[dict]:
    out = []
    for entry in args.setting or []:
        try:
            value = json.loads(entry.partition("=")[2] or "{}")
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def main(args) -> int:
    try:
        return _main(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"longreach eval: error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    from longreach.eval import record  # lazy: CLI verb, keeps --help fast

    out_dir, run = _resume(args) if args.resume else (None, None)  # its recorded flags come first
    _check_flags(args)
    lengths = parse_lengths(args.lengths)
    threshold = args.threshold / 100.0 if args.threshold > 1 else args.threshold
    settings = build_settings(args)
    depths = None if args.task == "ppl" else parse_depths(args.depths)
    if out_dir is None:
        out_dir = Path(args.out or Path("eval-results") / args.task)
        record.check_out_dir(out_dir, resume=False)
    if args.task == "ppl":
        return _main_ppl(args, settings, lengths, out_dir)
    from longreach.eval.grid_command import run_settings  # lazy: CLI verb, keeps --help fast

    grid = dict(
        depths=depths,
        num_samples=args.samples,
        seed=args.seed,
        haystack=resolve_text_arg(args.haystack, HAYSTACK_TEXTS),
        max_new_tokens=args.max_tokens,
        batch_size=args.batch_size,
        threshold=threshold,
        progress=not args.no_progress,
    )
    return run_settings(args, settings, lengths, grid, out_dir, run)


def _resume(args) -> tuple[Path, dict]:
    """--resume DIR: the directory, checked, and its run's record, whose flags replace the defaults in
    `args`."""
    from longreach.eval import record  # lazy: CLI verb, keeps --help fast

    if args.out and Path(args.out) != Path(args.resume):
        raise ValueError(f"--resume {args.resume} writes into that directory; drop --out {args.out}")
    if args.task == "ppl":
        raise ValueError("--resume continues the generated tasks' grids; ppl runs are not resumable")
    out_dir = Path(args.resume)
    record.check_out_dir(out_dir, resume=True)
    return out_dir, record.resume_run(out_dir, args, _defaults(args.task))


def _defaults(task: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([task])


def _main_ppl(args, settings, lengths, out_dir) -> int:
    from longreach.eval.ppl import (  # lazy: CLI verb, keeps --help fast
        evaluate_perplexity,
        perplexity_table,
        write_perplexity_report,
    )
    from longreach.model.tokenizer import load_tokenizer  # lazy: CLI verb, keeps --help fast

    results = []
    for name, options in settings.items():
        if options.get("kv_cache_dtype") or options.get("endpoint"):
            raise ValueError(f"setting {name}: ppl takes local models without KV-cache options")
        tokenizer = load_tokenizer(options["tokenizer"]) if options.get("tokenizer") else None
        results.append(
            evaluate_perplexity(
                options.get("model"),
                data=resolve_text_arg(args.data, PPL_TEXTS),
                lengths=lengths,
                stride=args.stride,
                max_windows=args.max_windows,
                tokenizer=tokenizer,
                dtype=options.get("dtype"),
                rope_scaling=options.get("rope_scaling"),
                setting=name,
                seed=args.seed,
                device=args.device,
                progress=not args.no_progress,
            )
        )
    print(perplexity_table(results))
    paths = write_perplexity_report(results, out_dir, plot=not args.no_plot)
    from longreach.eval.record import RUN_FILE, write_run  # lazy: CLI verb, keeps --help fast

    write_run(out_dir, args)  # what was measured, how, when and by which command
    paths["run"] = out_dir / RUN_FILE
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
