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


def test_saved_checkpoint_has_a_plain_directory_mode(hf_checkpoint, tmp_path):
    """The scratch directory comes from mkdtemp (mode 0700); the saved checkpoint must get the umask's mode
    like any directory, or another user (a server account, a colleague) cannot read it."""
    import os

    src, _ = hf_checkpoint("llama")
    umask = os.umask(0o022)
    try:
        out = save_model(load_model(src), tmp_path / "out")
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
