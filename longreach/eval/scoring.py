"""String-match scoring of model outputs against known answers (no judge model).

Two rules, as in the passkey papers and RULER:

- `first_number` (passkey): the first integer in the output must equal the expected number exactly —
  "12345." and "The pass key is 12345" score 1, "123456" and "1234" score 0.
- `all` (RULER's `string_match_all`): the share of expected strings found in the output, each matched
  case-insensitively as a whole word (so "1234567" does not match inside "91234567"); extra text is
  allowed. A sample is *correct* only when every expected string is there (score 1.0).
"""

from __future__ import annotations

import re
from typing import Sequence

SCORING_RULES = ("first_number", "all")
_NUMBER = re.compile(r"\d+")


def first_number(text: str) -> str | None:
    """The first run of digits in `text`, or None."""
    match = _NUMBER.search(text)
    return match.group(0) if match else None


def _contains_word(text: str, phrase: str) -> bool:
    words = [re.escape(w) for w in phrase.split()]
    if not words:
        raise ValueError("an expected answer is empty")
    pattern = r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def score_output(output: str, expected: Sequence[str], rule: str) -> float:
    """Score in [0, 1] of one output against its expected answers under `rule` (see the module docstring)."""
    if rule not in SCORING_RULES:
        raise ValueError(f"unknown scoring rule {rule!r}; choose one of {list(SCORING_RULES)}")
    if not expected:
        raise ValueError("expected answers are empty")
    if rule == "first_number":
        if len(expected) != 1:
            raise ValueError(f"first_number scoring takes one expected number, got {list(expected)}")
        return float(first_number(output) == str(expected[0]).strip())
    return sum(_contains_word(output, e) for e in expected) / len(expected)


def is_correct(score: float) -> bool:
    return score >= 1.0
