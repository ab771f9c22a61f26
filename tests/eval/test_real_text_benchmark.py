"""benchmarks/real_context.py stays runnable: its smoke grid on the bundled demo model, into a scratch doc."""

import importlib.util
import sys
from pathlib import Path

from tests.eval.test_real_text import needs_real_text

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "real_context.py"


def _script():
    spec = importlib.util.spec_from_file_location("real_context", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@needs_real_text
def test_smoke_grid_fills_the_section_and_resumes(tmp_path):
    from longreach.model.bundled import BUNDLED_MODEL_DIR

    module = _script()
    doc = tmp_path / "real-models.md"
    doc.write_text("# Real models\n\nintro\n\n## Usable context (measured)\n\nold\n\n## Later\n\nkept\n")
    argv = ["--grid", "smoke", "--model", str(BUNDLED_MODEL_DIR), "--levers", "none,PI", "--quiet"]
    argv += ["--out", str(tmp_path / "out"), "--doc", str(doc), "--img-dir", str(tmp_path / "img")]
    assert module.main(argv) == 0
    text = doc.read_text()
    assert text.startswith("# Real models\n\nintro\n\n## Usable context (measured)\n") and "old" not in text
    assert text.rstrip().endswith("## Later\n\nkept")  # the next section is left alone
    assert "| none | 100% (1/1) | 100% (1/1) | 512 |" in text  # the demo model at its own length
    assert "### passkey (real text)" in text and "### Perplexity vs length (real text)" in text
    assert {p.name for p in (tmp_path / "img").iterdir()} == {
        "real-passkey--filler.png",
        "real-passkey--real-text.png",
        "real-ppl.png",
    }
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "passkey--filler--none.json" in saved and "ppl--pi.json" in saved
    doc.write_text(doc.read_text().replace("| none | 100%", "| none | edited"))
    assert module.main(argv + ["--report-only"]) == 0  # from the saved results, nothing re-measured
    assert "| none | 100% (1/1) | 100% (1/1) | 512 |" in doc.read_text()


def test_levers_share_one_factor():
    module = _script()
    settings = module.levers(4.0, 8192)
    assert settings["none"] is None and len(settings) == 6
    assert all(s["factor"] == 4.0 for s in settings.values() if s)
    assert settings["YaRN"]["original_max_position_embeddings"] == 8192
    grid = module.GRIDS["full"]
    assert all(run.lengths == (1024, 2048, 4096, 8192, 16384, 32768) for run in grid.runs)
    assert {run.task for run in grid.runs} == {"passkey", "niah_multikey", "variable_tracking"}
