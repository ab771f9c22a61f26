"""FSDP2 on CPU: two gloo ranks under torchrun reproduce one process, and sharded checkpoints resume exactly."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from longreach.model.loader import load_model
from longreach.train.config import TrainConfig
from longreach.train.trainer import Trainer
from tests.train.conftest import tiny_config_dict, to_toml

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _curve(directory: Path) -> list[float]:
    return [
        json.loads(line)["loss"]
        for line in (directory / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


def test_two_ranks_match_one_process_and_resume_from_shards(corpus, tmp_path):
    d = tiny_config_dict(
        corpus, tmp_path / "unused", schedule={"max_steps": 10}, checkpoint={"save_every": 5}
    )
    (tmp_path / "c.toml").write_text(to_toml(d))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("_fsdp_worker.py")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(worker),
            str(tmp_path / "c.toml"),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    single = Trainer(
        TrainConfig.from_dict({**d, "checkpoint": {"output_dir": str(tmp_path / "single")}})
    ).train()
    single_losses = [r["loss"] for r in single]
    fsdp_losses = _curve(tmp_path / "fsdp")
    assert len(fsdp_losses) == 10
    assert max(abs(a - b) for a, b in zip(fsdp_losses, single_losses)) < 1e-5
    # the sharded checkpoint at step 5 resumes (2 ranks) to the uninterrupted run's losses
    assert (tmp_path / "fsdp" / "step-0000005" / "sharded").is_dir()
    assert _curve(tmp_path / "resumed") == pytest.approx(fsdp_losses[5:], abs=1e-6)
    # ... and one process can read the 2-rank shards too (torch.distributed.checkpoint reshards)
    one = Trainer(
        TrainConfig.from_dict(
            {
                **d,
                "checkpoint": {
                    "output_dir": str(tmp_path / "one"),
                    "resume": str(tmp_path / "fsdp" / "step-0000005"),
                },
            }
        )
    )
    assert [r["loss"] for r in one.train()] == pytest.approx(fsdp_losses[5:], abs=1e-5)
    # the gathered export is one Hugging Face directory equal to the single-process weights
    exported, reference = load_model(tmp_path / "fsdp" / "final"), load_model(tmp_path / "single" / "final")
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, atol=1e-5, rtol=1e-4)
    bf16 = _curve(tmp_path / "bf16")
    assert len(bf16) == 2 and all(math.isfinite(x) for x in bf16)
