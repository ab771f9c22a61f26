"""`longreach demo`: the bundled demo model — train it, extend it, reproduce the extension experiment, tour.

longreach demo                      # the two-minute tour on CPU (kv-size, passkey heatmap, extension table)
longreach demo train --export DIR   # the base model from scratch (recipes/demo.toml), exported in bf16
longreach demo retrieval --base DIR --export DIR   # stage 2: passkey documents finish the copy circuit
longreach demo extend --base DIR --export DIR   # YaRN x8 + continued pretraining at 8x the base length
longreach demo experiment --base DIR --extended DIR   # the table + plot of docs/extension.md
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="demo_verb", metavar="STEP")
    sub.add_parser("tour", help="the two-minute tour (default)")
    p = sub.add_parser("train", help="train the base demo model from scratch with recipes/demo.toml")
    p.add_argument("--run-dir", default="runs/demo", help="corpus, checkpoints and logs (default: runs/demo)")
    p.add_argument("--max-steps", type=int, help="override the recipe's step count")
    p.add_argument("--export", help="also save the final weights in bf16 with the tokenizer here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p = sub.add_parser(
        "retrieval", help="stage 2: continue the base model on passkey documents (CPU is enough)"
    )
    p.add_argument("--base", required=True, help="the base model directory (stage 1)")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument(
        "--max-steps", type=int, default=450, help="phase 1 steps, short documents (default 450; 0 skips it)"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="phase 1 learning rate (default 1e-3)")
    p.add_argument(
        "--min-bytes", type=int, default=80, help="phase 1's shortest passkey document (default 80)"
    )
    p.add_argument(
        "--max-bytes", type=int, default=320, help="phase 1's longest passkey document (default 320)"
    )
    p.add_argument(
        "--prompt-steps",
        type=int,
        default=150,
        help="phase 2 steps: 100-512 byte documents, half in the eval prompt's layout (default 150)",
    )
    p.add_argument("--export", help="also save the final weights in bf16 with the tokenizer here")
    p = sub.add_parser("extend", help="YaRN + continued pretraining of the base model")
    p.add_argument("--base", required=True, help="the base model directory")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--factor", type=float, default=8.0)
    p.add_argument(
        "--seq-len", type=int, default=4096, help="continued-pretraining length (default 4096 = 8x)"
    )
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument(
        "--mix",
        default="base",
        choices=["base", "passkey", "passkey-prompt", "passkey-edges"],
        help="corpus mix (default base; the bundled model: passkey-prompt, then passkey-edges)",
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--export", help="also save the final weights in bf16 with the tokenizer here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p = sub.add_parser(
        "experiment", help="evaluate no scaling / PI / NTK / dynamic NTK / YaRN / YaRN+training"
    )
    p.add_argument("--base", help="base model (default: the bundled base model)")
    p.add_argument("--extended", help="extended model (default: the bundled model)")
    p.add_argument("--samples", type=int, default=10, help="passkey samples per length (default 10)")
    p.add_argument(
        "--multiples", default="1,2,4,8,16", help="lengths as multiples of the base training length"
    )
    p.add_argument("--out", default="docs", help="where extension.md and its plot go (default: docs)")


def main(args: argparse.Namespace) -> int:
    verb = args.demo_verb or "tour"
    if verb == "train":
        from longreach.demo.train import export_bf16, train_base  # lazy: CLI verb, keeps --help fast

        final = train_base(args.run_dir, args.max_steps, overrides=args.overrides)
        if args.export:
            print(f"exported: {export_bf16(final, args.export)}")
        return 0
    if verb == "retrieval":
        from longreach.demo.train import export_bf16, train_retrieval  # lazy: CLI verb, keeps --help fast

        final = train_retrieval(
            args.base,
            args.run_dir,
            args.max_steps,
            args.prompt_steps,
            lr=args.lr,
            min_bytes=args.min_bytes,
            max_bytes=args.max_bytes,
        )
        if args.export:
            print(f"exported: {export_bf16(final, args.export)}")
        return 0
    if verb == "extend":
        from longreach.demo.train import export_bf16, extend_base  # lazy: CLI verb, keeps --help fast

        final = extend_base(
            args.base,
            args.run_dir,
            args.factor,
            args.seq_len,
            args.max_steps,
            lr=args.lr,
            batch_size=args.batch_size,
            mix=args.mix,
            dtype=args.dtype,
            overrides=args.overrides,
        )
        if args.export:
            print(f"exported: {export_bf16(final, args.export)}")
        return 0
    if verb == "experiment":
        from longreach.demo.experiment import run_experiment  # lazy: CLI verb, keeps --help fast

        return run_experiment(args)
    from longreach.demo.tour import tour  # lazy: CLI verb, keeps --help fast

    return tour()
