"""Checkpoint file I/O: an interrupted save leaves nothing behind (no partial checkpoint, no temporary directory)."""

import pytest

from longreach.model import safetensors_io
from longreach.model.loader import load_model, save_model


def test_save_is_atomic(hf_checkpoint, tmp_path, monkeypatch):
    src, _ = hf_checkpoint("llama")
    ours = load_model(src)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [src.name]  # no temporary directory left behind
