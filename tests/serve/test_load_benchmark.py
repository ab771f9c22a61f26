"""benchmarks/serve_load.py stays runnable: a small burst through the real `longreach serve` command."""

import importlib.util
import json
from pathlib import Path

import pytest

from longreach.model.bundled import BUNDLED_MODEL_DIR

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


@pytest.mark.skipif(
    not (BUNDLED_MODEL_DIR / "config.json").is_file(), reason="no bundled demo model in this build"
)
def test_small_burst_completes_with_the_texts_alone_and_frees_every_block(tmp_path):
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(
        [
            "--clients",
            "5",
            "--leavers",
            "1",
            "--min-len",
            "100",
            "--max-len",
            "300",
            "--max-tokens",
            "8",
            "--tight-blocks",
            "21",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads((tmp_path / "load.json").read_text())
    assert code == 0 and [r["setting"] for r in rows] == ["roomy", "tight"]
    for r in rows:
        assert (r["completed"], r["same_as_alone"], r["kv_blocks_used_after"]) == (4, 4, 0)
        assert r["aborted"] <= 1  # the leaver's request, unless it finished before the server noticed
        assert r["exit_status"] == 0 and r["ttft_p99_s"] >= r["ttft_p50_s"] > 0
    assert "| tight (21 blocks of 16) | 5 (1) | 4, 4 |" in (tmp_path / "load.md").read_text()
