"""Packed documents are isolated: no gradient flows between them and the loss equals per-document runs."""

import json

import pytest
import torch
import torch.nn.functional as F

from longreach.config import ModelConfig
from longreach.model.loader import build_model
from longreach.model.tokenizer import ByteTokenizer
from longreach.train.data import IGNORE_INDEX, SequenceStream, collate
from tests.train.conftest import TINY_MODEL

DOCS = ["alpha beta", "gamma delta epsilon zeta", "eta", "theta iota kappa"]


@pytest.fixture(params=["auto", "reference", "tiled"])
def backend(request, monkeypatch):
    if request.param == "auto":
        monkeypatch.delenv("LONGREACH_ATTENTION_BACKEND", raising=False)
    else:
        monkeypatch.setenv("LONGREACH_ATTENTION_BACKEND", request.param)
    return request.param


def _packed_row(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    lengths = [len(t.encode()) + 2 for t in DOCS]  # <bos> text <eos>
    stream = SequenceStream([str(path)], ByteTokenizer(), seq_len=sum(lengths), shuffle=False)
    return collate([next(stream)]), lengths


def test_no_gradient_crosses_documents(tmp_path, backend):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf_dict(TINY_MODEL))
    batch, lengths = _packed_row(tmp_path)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch.meta.cu_seqlens_q.tolist() == starts
    assert batch.positions.tolist() == [p for n in lengths for p in range(n)]  # restart per document

    captured = {}
    model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: captured.setdefault("x", out))
    logits = model(batch.input_ids, batch.positions, meta=batch.meta)
    per_token = F.cross_entropy(logits, batch.labels, ignore_index=IGNORE_INDEX, reduction="none")
    for d in range(len(DOCS)):
        lo, hi = starts[d], starts[d + 1]
        (grad,) = torch.autograd.grad(per_token[lo:hi].sum(), captured["x"], retain_graph=True)
        outside = torch.cat([grad[:lo], grad[hi:]])
        assert torch.count_nonzero(outside) == 0, f"document {d}'s loss reaches other documents' tokens"
        assert torch.count_nonzero(grad[lo : hi - 1]) > 0


def test_packed_loss_equals_per_document_loss(tmp_path, backend):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf_dict(TINY_MODEL))
    batch, lengths = _packed_row(tmp_path)
    with torch.no_grad():
        packed = F.cross_entropy(
            model(batch.input_ids, batch.positions, meta=batch.meta),
            batch.labels,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total, count, start = 0.0, 0, 0
        for n in lengths:  # each document alone, unpadded
            ids = batch.input_ids[start : start + n]
            total += F.cross_entropy(model(ids)[:-1], ids[1:], reduction="sum").item()
            count += n - 1
            start += n
    assert batch.num_targets == count
    assert packed.item() / count == pytest.approx(total / count, rel=1e-5, abs=1e-6)
