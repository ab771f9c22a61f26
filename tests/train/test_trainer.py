"""The loop: exact resume (in process and after SIGKILL), accumulation, checkpointing, bf16, schedule, CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from longreach.cli import main as cli_main
from longreach.model.loader import load_model
from longreach.train.config import ScheduleConfig, TrainConfig
from longreach.train.trainer import Trainer, lr_multiplier
from tests.train.conftest import tiny_config_dict, to_toml


def _losses(records):
    return [r["loss"] for r in records]


def test_schedule_warmup_then_cosine():
    s = ScheduleConfig(max_steps=10, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_multiplier(i, s) for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_multiplier(4, s) == 1.0 and lr_multiplier(10, s) == pytest.approx(0.1)
    assert lr_multiplier(7, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(9, ScheduleConfig(max_steps=10, decay="constant")) == 1.0


def test_resume_in_process_is_bit_identical(corpus, tmp_path):
    full = Trainer(TrainConfig.from_dict(tiny_config_dict(corpus, tmp_path / "a"))).train()
    first = Trainer(
        TrainConfig.from_dict(tiny_config_dict(corpus, tmp_path / "b", schedule={"max_steps": 3}))
    )
    first.train()
    resumed = Trainer(
        TrainConfig.from_dict(tiny_config_dict(corpus, tmp_path / "b", checkpoint={"resume": True}))
    )
    assert resumed.step == 3
    rest = resumed.train()
    assert _losses(full)[3:] == _losses(rest)
    assert [r["grad_norm"] for r in full][3:] == [r["grad_norm"] for r in rest]
    logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == _losses(full)
    final_a, final_b = load_model(tmp_path / "a" / "final"), load_model(tmp_path / "b" / "final")
    assert all(torch.equal(final_a.state_dict()[k], v) for k, v in final_b.state_dict().items())


def test_accumulation_and_activation_checkpointing_give_the_same_step(corpus, tmp_path):
    base = tiny_config_dict(corpus, tmp_path / "x", schedule={"max_steps": 3})
    reference = _losses(Trainer(TrainConfig.from_dict(base)).train())  # 4 micro-batches of 1
    for training in ({"micro_batch_size": 4}, {"micro_batch_size": 2, "activation_checkpointing": True}):
        cfg = TrainConfig.from_dict({**base, "training": {**base["training"], **training}})
        assert _losses(Trainer(cfg).train()) == pytest.approx(reference, rel=1e-6), training


def test_bf16_autocast_keeps_fp32_master_weights_and_logs_eval(corpus, tmp_path):
    cfg = TrainConfig.from_dict(
        tiny_config_dict(
            corpus,
            tmp_path / "bf",
            training={"dtype": "bf16", "eval_every": 3},
            data={"eval_paths": [str(corpus / "book.txt")], "eval_sequences": 2},
        )
    )
    trainer = Trainer(cfg)
    records = trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert records[-1]["loss"] < records[0]["loss"] and all(math.isfinite(r["loss"]) for r in records)
    logged = [json.loads(line) for line in (tmp_path / "bf" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_loss" in r] == [3, 6]


def test_kill_and_resume_gives_the_same_loss_curve(corpus, tmp_path):
    d = tiny_config_dict(corpus, tmp_path / "run", schedule={"max_steps": 60}, checkpoint={"save_every": 3})
    (tmp_path / "run.toml").write_text(to_toml(d))
    cmd = [sys.executable, "-m", "longreach", "train", "--config", str(tmp_path / "run.toml")]
    proc = subprocess.Popen(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    latest = tmp_path / "run" / "latest"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if latest.exists() and latest.read_text().strip() >= "step-0000006":
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    (tmp_path / "run" / ".step-0000099.tmp").mkdir()  # debris of a save cut short: ignored
    resumed = Trainer(TrainConfig.from_toml(tmp_path / "run.toml", ["checkpoint.resume=true"]))
    assert 6 <= resumed.step < 60
    resumed.train()
    reference = Trainer(
        TrainConfig.from_dict({**d, "checkpoint": {"output_dir": str(tmp_path / "ref")}})
    ).train()
    curve = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert curve == _losses(reference) and len(curve) == 60


def test_cli_toml_overrides_and_errors(corpus, tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(to_toml(tiny_config_dict(corpus, tmp_path / "out")))
    assert cli_main(["train", "--config", str(path), "--set", "schedule.max_steps=2", "--lr", "0.001"]) == 0
    assert load_model(tmp_path / "out" / "final").config.vocab_size == 259
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2
    assert cli_main(["train", "--config", str(path), "--seq-len", "1"]) == 2
    assert "data.seq_len=1" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(path), "--data", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"extra": {}}, "unknown config section"),
        ({"optimizer": {"lrr": 1}}, "unknown key"),
        ({"training": {"batch_size": 3, "micro_batch_size": 2}}, "multiple of micro_batch_size"),
        ({"training": {"dtype": "fp8"}}, "training.dtype='fp8'"),
        ({"schedule": {"max_steps": 2, "warmup_steps": 5}}, "warmup_steps=5"),
        ({"model": {"config": None}}, "exactly one of path"),
    ],
)
def test_config_errors_name_the_bad_value(corpus, tmp_path, change, message):
    d = tiny_config_dict(corpus, tmp_path)
    for name, values in change.items():
        d[name] = {**d.get(name, {}), **values}
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(d)
