"""Perplexity vs length: matches a transformers computation, scores the same tokens at every length."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longreach import load_model
from longreach.eval.ppl import evaluate_perplexity, perplexity_table, perplexity_vs_length


def test_matches_transformers_sliding_window(hf_checkpoint):
    path, theirs = hf_checkpoint("llama", max_position_embeddings=256)
    ours = load_model(path, dtype="fp32")
    doc = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    got, stride, num_windows, num_docs = perplexity_vs_length(
        ours, [doc], [64, 160], stride=16, max_windows=3, progress=False
    )
    assert (stride, num_windows, num_docs) == (16, 3, 1)
    for length in (64, 160):
        nll, count = 0.0, 0
        for w in range(3):
            end = len(doc) - w * 16
            window = torch.tensor([doc[end - length : end]])
            with torch.no_grad():
                logits = theirs(window).logits[0]  # (L, V)
            nll += F.cross_entropy(logits[-17:-1], window[0, -16:], reduction="sum").item()
            count += 16
        assert got[length] == pytest.approx(math.exp(nll / count), rel=1e-4)


class Bigram(nn.Module):
    """Logits depend on the current token only: perplexity is then the same at every context length
    exactly when every length scores the same tokens."""

    def __init__(self, vocab=50):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1)))

    def forward(self, input_ids, positions, meta, logits_indices=None):
        return self.table[input_ids[logits_indices]]


def test_every_length_scores_the_same_tokens():
    docs = [
        torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for n in (700, 900, 100)
    ]
    got, stride, num_windows, num_docs = perplexity_vs_length(
        Bigram(), docs, [128, 256, 512], stride=256, max_windows=4, progress=False
    )
    assert stride == 64 and num_docs == 2  # half the shortest length; 100 tokens dropped
    assert num_windows == 3  # 1 + (700 - 512) // 64: the shorter doc decides
    assert got[128] == pytest.approx(got[256], rel=1e-6) and got[256] == pytest.approx(got[512], rel=1e-6)


def test_data_too_short_is_a_clear_error():
    with pytest.raises(ValueError, match="no document has the 512 tokens.*longest document: 100 tokens"):
        perplexity_vs_length(Bigram(), [[1] * 100], [256, 512], progress=False)


def test_settings_table_and_cli(byte_checkpoint, tmp_path, capsys):
    data = tmp_path / "doc.txt"
    data.write_text("The lighthouse keeper counted ships every night. " * 60)
    base = evaluate_perplexity(
        byte_checkpoint, data=[data], lengths=[128, 512], stride=64, max_windows=2, progress=False
    )
    linear = evaluate_perplexity(
        byte_checkpoint,
        data=[data],
        lengths=[128, 512],
        stride=64,
        max_windows=2,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        setting="linear x4",
        progress=False,
    )
    assert base.setting == "tiny-byte" and base.num_scored_tokens == 128
    assert base.perplexity[128] != linear.perplexity[128]  # the rope override reached the model
    table = perplexity_table([base, linear])
    assert "tiny-byte" in table and "linear x4" in table and "512" in table

    from longreach.cli import main

    out = tmp_path / "ppl"
    rc = main(
        [
            "eval",
            "ppl",
            "--model",
            str(byte_checkpoint),
            "--data",
            str(data),
            "--lengths",
            "128,512",
            "--stride",
            "64",
            "--max-windows",
            "2",
            "--out",
            str(out),
            "--no-progress",
            "--setting",
            "base={}",
            "--setting",
            'ntk={"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}',
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "ntk" in printed
    saved = json.loads((out / "ppl.json").read_text())
    assert [r["setting"] for r in saved] == ["base", "ntk"]
    assert saved[0]["perplexity"]["128"] == pytest.approx(base.perplexity[128], rel=1e-5)
    assert (out / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
