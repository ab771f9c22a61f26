"""`longreach bench` runs end to end on a random model and reports what it generated."""

import json

import pytest

from longreach.cli import main


def test_bench_verb_on_a_random_model(capsys):
    rc = main(
        [
            "bench",
            "--random-model",
            "tiny",
            "--num-prompts",
            "4",
            "--min-input",
            "8",
            "--max-input",
            "64",
            "--output-len",
            "5",
            "--max-num-batched-tokens",
            "32",
            "--json",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_prompts"] == 4 and result["output_tokens"] == 20
    assert result["output_tokens_per_s"] > 0 and result["mean_ttft_s"] > 0


def test_bench_rejects_bad_ranges():
    with pytest.raises(SystemExit, match="--max-input=4 is below --min-input=8"):
        main(["bench", "--random-model", "tiny", "--min-input", "8", "--max-input", "4"])
