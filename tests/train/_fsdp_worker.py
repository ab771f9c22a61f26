"""Run under `torchrun --nproc-per-node 2`: the CLI three times on one process group.

1. 10 steps from scratch, sharded checkpoint at step 5;  2. resume that checkpoint into a second
output directory, with activation checkpointing (exact recompute: same losses);  3. two bf16 steps (FSDP2
mixed precision). argv: config.toml workdir
"""

import sys

from longreach.cli import main

config, work = sys.argv[1], sys.argv[2]
assert main(["train", "--config", config, "--output", f"{work}/fsdp"]) == 0
assert (
    main(
        [
            "train",
            "--config",
            config,
            "--output",
            f"{work}/resumed",
            "--resume",
            f"{work}/fsdp/step-0000005",
            "--activation-checkpointing",
        ]
    )
    == 0
)
assert (
    main(
        [
            "train",
            "--config",
            config,
            "--output",
            f"{work}/bf16",
            "--dtype",
            "bf16",
            "--max-steps",
            "2",
            "--set",
            "checkpoint.save_every=100",
        ]
    )
    == 0
)
