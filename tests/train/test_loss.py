"""Chunked cross-entropy equals the full-logits loss and its gradients."""

import pytest
import torch
import torch.nn.functional as F

from longreach.train.config import TrainConfig
from longreach.train.data import IGNORE_INDEX
from longreach.train.loss import chunked_cross_entropy
from longreach.train.trainer import Trainer
from tests.train.conftest import tiny_config_dict


def _problem(num_tokens=53, hidden=24, vocab=301, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(num_tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (num_tokens,), generator=g)
    labels[torch.rand(num_tokens, generator=g) < 0.3] = IGNORE_INDEX
    return h, w, labels


def _full(h, w, labels, reduction):
    logits = F.linear(h, w).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction=reduction)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 53, 1000])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_full_logits_and_gradients_fp32(chunk_size, reduction):
    h, w, labels = _problem()
    full = _full(h, w, labels, reduction)
    grad_h, grad_w = torch.autograd.grad(full * 1.7, (h, w))
    chunked = chunked_cross_entropy(h, w, labels, chunk_size, reduction=reduction)
    c_h, c_w = torch.autograd.grad(chunked * 1.7, (h, w))
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_h, grad_h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_w, grad_w, rtol=1e-6, atol=1e-6)


def test_ignored_tokens_get_no_gradient_and_all_ignored_sums_to_zero():
    h, w, labels = _problem()
    labels[:10] = IGNORE_INDEX
    (grad_h,) = torch.autograd.grad(chunked_cross_entropy(h, w, labels, 4), (h,))
    assert torch.all(grad_h[:10] == 0) and grad_h[10:].abs().sum() > 0
    loss = chunked_cross_entropy(h, w, torch.full_like(labels, IGNORE_INDEX), 8)
    assert loss.item() == 0.0


def test_tied_weight_accumulates_both_gradients():
    """The LM head tied to the embedding: the head's gradient adds to the embedding's."""
    h, w, labels = _problem()
    ids = torch.randint(0, w.shape[0], (h.shape[0],))

    def run(loss_fn):
        x = F.embedding(ids, w) + h
        return torch.autograd.grad(loss_fn(x), (w, h))

    full = run(lambda x: _full(x, w, labels, "sum"))
    chunked = run(lambda x: chunked_cross_entropy(x, w, labels, 10))
    for a, b in zip(chunked, full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bf16_weights_match_the_full_bf16_loss():
    """bf16 operands: both paths round the same bf16 logits, so the loss agrees to fp32 summation
    order; the gradients differ by bf16 rounding of the (softmax - one_hot) products, which autograd
    rounds per op in bf16 and we accumulate in fp32, so they are compared at bf16's resolution (2^-8)
    relative to the largest entry."""
    h, w, labels = _problem(dtype=torch.bfloat16)
    full = _full(h, w, labels, "sum")
    grad_h, grad_w = torch.autograd.grad(full, (h, w))
    chunked = chunked_cross_entropy(h, w, labels, 11)
    c_h, c_w = torch.autograd.grad(chunked, (h, w))
    assert c_h.dtype == torch.bfloat16 and c_w.dtype == torch.bfloat16
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-4)
    for ours, ref in ((c_h, grad_h), (c_w, grad_w)):
        scale = ref.float().abs().max()
        assert (ours.float() - ref.float()).abs().max() <= 2**-7 * scale


def test_autocast_uses_the_autocast_dtype():
    h, w, labels = _problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        chunked = chunked_cross_entropy(h, w, labels, 9)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-4)
    assert abs(chunked.item() - _full(h, w, labels, "sum").item()) > 1e-4  # bf16 logits really were used


@pytest.mark.parametrize(
    "kwargs, message", [({"chunk_size": 0}, "chunk_size=0"), ({"reduction": "none"}, "reduction='none'")]
)
def test_bad_arguments_are_named(kwargs, message):
    h, w, labels = _problem()
    with pytest.raises(ValueError, match=message):
        chunked_cross_entropy(h, w, labels, **kwargs)
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(h, w, labels[:-1])


def test_trainer_chunked_loss_matches_full_logits(corpus, tmp_path):
    """Three training steps with 16-token loss chunks follow the full-logits run (same losses, weights)."""
    runs = {}
    for chunk in (0, 16):
        d = tiny_config_dict(
            corpus, tmp_path / str(chunk), schedule={"max_steps": 3}, training={"loss_chunk_size": chunk}
        )
        trainer = Trainer(TrainConfig.from_dict(d))
        runs[chunk] = ([r["loss"] for r in trainer.train()], trainer.model.state_dict())
    assert runs[16][0] == pytest.approx(runs[0][0], rel=1e-6)
    for name, tensor in runs[0][1].items():
        torch.testing.assert_close(runs[16][1][name], tensor, rtol=1e-5, atol=1e-6)
