"""`longreach <verb>`: one entry point, one module per verb.

Each verb lives next to the code it drives and exposes two functions,
`add_arguments(parser)` and `main(args) -> int`; this file only maps verb names
to those modules, so adding a verb never touches another verb's code and a
verb's heavy imports happen only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "generate": ("longreach.model.generate", "generate text with a simple contiguous KV cache"),
    "kv-size": (
        "longreach.kvcache.size_report",
        "KV-cache bytes, prefill FLOPs and $ per request for a model",
    ),
    "serve": ("longreach.serve.cli", "OpenAI-compatible HTTP server"),
    "train": ("longreach.train.cli", "train / continue pretraining (packing, bf16, FSDP2)"),
    "extend": (
        "longreach.train.extend",
        "extend a checkpoint's context: rewrite its rope config and continue pretraining",
    ),
    "eval": ("longreach.eval.cli", "passkey / needle-in-a-haystack / RULER-style / perplexity evaluation"),
    "bench": ("longreach.engine.bench", "throughput benchmark of the serving engine"),
    "convert": (
        "longreach.model.gguf_convert",
        "convert a GGUF file into a Hugging Face checkpoint directory",
    ),
    "demo": (
        "longreach.demo",
        "the bundled demo model: train it, reproduce the context-extension experiment",
    ),
}


def _load(verb: str):
    module_name, _ = VERBS[verb]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="longreach", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    modules = {}
    for verb, (_, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if argv[:1] == [verb]:
            modules[verb] = _load(verb)
            if modules[verb] is not None:
                modules[verb].add_arguments(p)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    module = modules.get(args.verb)
    if module is None:
        print(f"longreach {args.verb}: not available in this build", file=sys.stderr)
        return 2
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
