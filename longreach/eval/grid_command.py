"""`longreach eval TASK` for the generated tasks: build each setting's backend, run its grid while appending
every finished sample to samples.jsonl, and write the report with the full setting in results.json.

Kept apart from `cli.py` (flags and their checks) so that the command's flow reads in one place; what is
kept on disk and how a run resumes is `record.py`'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

from longreach.eval.record import SAMPLES_FILE, SampleLog, run_setting, write_run
from longreach.eval.results import GridResult
from longreach.eval.runner import comparison_table, run_grid, setting_dir, write_comparison, write_report


def make_backend(options: dict, args, max_len: int):
    """The backend of one setting: an endpoint (completions or chat API) or a local model."""
    from longreach.eval.backends import EndpointBackend, LocalBackend  # lazy: the engine is heavy
    from longreach.model.tokenizer import load_tokenizer  # lazy: the engine is heavy

    tokenizer = load_tokenizer(options["tokenizer"]) if options.get("tokenizer") else None
    if options.get("endpoint"):
        api = "chat" if args.apply_chat_template else args.endpoint_api
        if api == "chat" and tokenizer is not None:
            from longreach.eval.chat import ChatTemplateTokenizer  # lazy: with a chat template only

            tokenizer = ChatTemplateTokenizer(tokenizer)  # size prompts with the template's tokens
        backend = EndpointBackend(
            options["endpoint"],
            api_key=options.get("api_key"),
            model_name=options.get("model_name"),
            tokenizer=tokenizer,
            concurrency=args.concurrency,
            timeout=args.timeout,
            retries=args.retries,
            api=api,
        )
        if backend.is_approximate_tokenizer:
            print(
                "note: prompt lengths are approximate (no --tokenizer given for the endpoint)",
                file=sys.stderr,
            )
        return backend
    return LocalBackend(
        options.get("model"),
        tokenizer=tokenizer,
        dtype=options.get("dtype"),
        rope_scaling=options.get("rope_scaling"),
        kv_cache_dtype=options.get("kv_cache_dtype"),
        device=args.device,
        max_model_len=max_len,
        batch_size=args.batch_size,
        apply_chat_template=bool(args.apply_chat_template),
    )


def run_settings(
    args, settings: dict, lengths: list[int], grid: dict, out_dir: Path, run: dict | None
) -> int:
    """Every setting's grid (resuming from its samples.jsonl), the reports, and the exit status.

    run: the record of the run being resumed; None for a new run, whose run.json is written once the first
    backend is built (a bad model path leaves the output directory untouched)."""
    results = []
    for name, options in settings.items():
        log = SampleLog(setting_dir(out_dir, name) / SAMPLES_FILE)
        done = log.read()
        backend = make_backend(options, args, max(lengths))
        run = run or write_run(out_dir, args)
        try:
            result = run_grid(
                backend, args.task, lengths, setting=name, done=done, on_samples=log.append, **grid
            )
        finally:
            backend.close()
        result.run = run_setting(options, args, run, backend)
        results.append(result)
        print(result.table() + "\n")
    if len(results) == 1:
        paths = write_report(results[0], out_dir, plot=not args.no_plot)
    else:
        paths = write_comparison(results, out_dir, plot=not args.no_plot)
        print(comparison_table(results) + "\n")
    _warn_about_failures(results)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    answered = sum(s.error is None for r in results for s in r.samples)
    return 0 if answered else 1


def _warn_about_failures(results: list[GridResult]) -> None:
    for r in results:
        num_errors = sum(s.error is not None for s in r.samples)
        if num_errors:
            first = next(s.error for s in r.samples if s.error)
            print(
                f"warning: {num_errors} of {len(r.samples)} request(s) failed"
                + (f" [{r.setting}]" if r.setting else "")
                + f" and count as misses; first: {first}",
                file=sys.stderr,
            )
