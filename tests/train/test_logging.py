"""What a run reports: TensorBoard scalars (flushed and closed however the run ends) and the progress bar."""

import re
import sys
import types

import pytest

from longreach.train.config import TrainConfig
from longreach.train.trainer import Trainer
from tests.train.conftest import tiny_config_dict


class FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is not a test dependency)."""

    instances: list["FakeSummaryWriter"] = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.close_calls = log_dir, [], 0
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        assert self.close_calls == 0, "add_scalar on a closed writer"
        self.scalars.append((tag, value, step))

    def close(self):
        self.close_calls += 1


@pytest.fixture
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    FakeSummaryWriter.instances = []
    return FakeSummaryWriter.instances


def test_tensorboard_gets_the_loss_and_is_closed_at_the_end(corpus, tmp_path, fake_tensorboard):
    records = Trainer(TrainConfig.from_dict(tiny_config_dict(corpus, tmp_path / "out"))).train()
    [writer] = fake_tensorboard
    assert writer.log_dir == str(tmp_path / "out" / "tensorboard")
    assert [(step, value) for tag, value, step in writer.scalars if tag == "loss"] == [
        (r["step"], r["loss"]) for r in records
    ]
    assert {"lr", "grad_norm", "tokens_per_s"} <= {tag for tag, _, _ in writer.scalars}
    assert writer.close_calls == 1


def test_tensorboard_is_closed_when_training_fails(corpus, tmp_path, fake_tensorboard, monkeypatch):
    trainer = Trainer(TrainConfig.from_dict(tiny_config_dict(corpus, tmp_path / "out")))
    real_step = trainer.train_step

    def failing_step():
        if trainer.step == 2:
            raise RuntimeError("boom at step 3")
        return real_step()

    monkeypatch.setattr(trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    [writer] = fake_tensorboard
    assert [step for tag, _, step in writer.scalars if tag == "loss"] == [1, 2]
    assert writer.close_calls == 1


def test_tensorboard_reopens_after_close_and_only_on_rank_zero(corpus, tmp_path, fake_tensorboard):
    trainer = Trainer(
        TrainConfig.from_dict(tiny_config_dict(corpus, tmp_path / "out", schedule={"max_steps": 2}))
    )
    trainer.train()
    trainer.cfg = trainer.cfg.replace(schedule={"max_steps": 3})  # a second call continues the run
    trainer.train()
    assert [w.close_calls for w in fake_tensorboard] == [1, 1]
    assert [step for tag, _, step in fake_tensorboard[1].scalars if tag == "loss"] == [3]
    from longreach.train.trainer import MetricsLog

    silent = MetricsLog(tmp_path / "other", enabled=False)  # ranks > 0
    silent.write({"step": 1, "loss": 1.0})
    silent.close()
    assert len(fake_tensorboard) == 2 and not (tmp_path / "other").exists()


def test_progress_bar_shows_loss_and_tokens_per_second(corpus, tmp_path, capsys):
    cfg = TrainConfig.from_dict(
        tiny_config_dict(corpus, tmp_path / "bar", schedule={"max_steps": 3}, training={"progress": True})
    )
    records = Trainer(cfg).train()
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]  # the bar's last redraw
    assert re.search(r"\b3/3\b", final), final
    assert f"loss={records[-1]['loss']:.4f}" in final, final
    assert f"tok_s={records[-1]['tokens_per_s']:,.0f}" in final and records[-1]["tokens_per_s"] > 0, final
    # a redraw shows the figures of the step it counts, never the previous step's
    for line in err.replace("\r", "\n").splitlines():
        if "loss=" in line:
            done = int(re.search(r"\b(\d)/3\b", line).group(1))
            assert f"loss={records[done - 1]['loss']:.4f}" in line, line


def test_no_progress_bar_when_disabled(corpus, tmp_path, capsys):
    Trainer(
        TrainConfig.from_dict(tiny_config_dict(corpus, tmp_path / "quiet", schedule={"max_steps": 2}))
    ).train()
    assert "loss=" not in capsys.readouterr().err
