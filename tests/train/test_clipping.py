"""Global-norm gradient clipping (optimizer.grad_clip, on by default): the optimizer sees clipped gradients
and the logged grad_norm is the norm before clipping."""

import pytest
import torch

from longreach.train.config import OptimizerConfig, TrainConfig
from longreach.train.trainer import Trainer
from tests.train.conftest import tiny_config_dict


def _run(corpus, output_dir, steps=2, **optimizer):
    """Train `steps` steps; returns the records and the gradients the optimizer saw at each step."""
    trainer = Trainer(
        TrainConfig.from_dict(
            tiny_config_dict(corpus, output_dir, schedule={"max_steps": steps}, optimizer=optimizer)
        )
    )
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([p.grad.detach().clone() for p in trainer.model.parameters()])
    )
    return trainer, trainer.train(), seen


def _norm(grads):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


@pytest.mark.parametrize("grad_clip", [None, 0.05], ids=["default", "0.05"])
def test_the_optimizer_sees_clipped_gradients(corpus, tmp_path, grad_clip):
    optimizer = {} if grad_clip is None else {"grad_clip": grad_clip}
    trainer, records, seen = _run(corpus, tmp_path / "clip", **optimizer)
    limit = trainer.cfg.optimizer.grad_clip
    assert limit == (OptimizerConfig().grad_clip if grad_clip is None else grad_clip)
    assert OptimizerConfig().grad_clip == 1.0  # on by default
    _, free_records, free_seen = _run(corpus, tmp_path / "free", grad_clip=None)
    raw = _norm(free_seen[0])  # step 1: same weights, same data
    assert free_records[0]["grad_norm"] == pytest.approx(raw, rel=1e-5)
    assert records[0]["grad_norm"] == pytest.approx(raw, rel=1e-5)  # logged: the norm before clipping
    assert len(seen) == 2
    for grads, record in zip(seen, records):
        assert record["grad_norm"] > limit, "the premise: this step needed clipping"
        assert _norm(grads) == pytest.approx(limit, rel=1e-4)  # scaled down onto the threshold
    # the same as torch's clip_grad_norm_ applied by hand to the unclipped gradients
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in free_seen[0]]
    for p, g in zip(params, free_seen[0]):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, limit)
    for p, g in zip(params, seen[0]):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)


def test_without_clipping_the_optimizer_sees_the_raw_gradients(corpus, tmp_path):
    _, records, seen = _run(corpus, tmp_path / "free", grad_clip=None)
    for grads, record in zip(seen, records):
        assert record["grad_norm"] > 1.0  # the default threshold would have clipped
        assert _norm(grads) == pytest.approx(record["grad_norm"], rel=1e-5)
