"""`longreach generate` as a user runs it: the bundled model, a rope override, and bad input."""

import pytest

from longreach.cli import main
from longreach.model.bundled import resolve_model_path

PROMPT = (
    "The grass is green. The pass key is 60417. Remember it. 60417 is the pass key. The sky is blue. "
    "What is the pass key? The pass key is"
)


def test_bundled_model_answers_the_readme_prompt(capsys):
    assert main(["generate", "--prompt", PROMPT, "--prompt", "The sky is", "--max-tokens", "7"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == PROMPT + " 60417."  # greedy, no escape codes when stdout is not a terminal
    assert lines[1].startswith("The sky is") and len(lines) == 2
    assert "tokens/s" in err


def test_rope_override_is_what_load_model_does(capsys):
    from longreach.model.generate import generate
    from longreach.model.loader import load_model
    from longreach.model.tokenizer import load_tokenizer

    rope = '{"rope_type": "linear", "factor": 8}'  # PI x8 on a model that was not trained for it
    assert main(["generate", "--prompt", PROMPT, "--max-tokens", "6", "--rope-scaling", rope]) == 0
    got = capsys.readouterr().out.splitlines()[0][len(PROMPT) :]
    path = resolve_model_path(None)
    model = load_model(path, rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert model.config.rope.rope_type == "linear"
    tok = load_tokenizer(path)
    expected = tok.decode(
        generate(model, [tok.encode(PROMPT)], 6, stop_token_ids=tuple(model.config.eos_token_ids))[0]
    )
    assert got == expected


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--rope-scaling", "{not json"], "{not json"),
        (["--rope-scaling", '{"rope_type": "warp", "factor": 2}'], "warp"),
        (["--model", "/no/such/checkpoint"], "/no/such/checkpoint"),
    ],
)
def test_bad_input_names_the_value(argv, needle):
    with pytest.raises((SystemExit, FileNotFoundError, ValueError)) as info:
        main(["generate", "--prompt", "hi", "--max-tokens", "2", *argv])
    assert needle in str(info.value)
