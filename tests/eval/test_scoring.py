"""String-match scoring with canned outputs: right, wrong, partially right, extra text."""

import pytest

from longreach.eval.scoring import first_number, is_correct, score_output


@pytest.mark.parametrize(
    "output, expected_score",
    [
        (" 48213", 1.0),  # right
        (" 48213. Remember it. 48213 is the pass key.", 1.0),  # extra text after the number
        ("The pass key is 48213", 1.0),
        (" 48213", 1.0),
        (" 482131", 0.0),  # a longer number is not the key
        (" 4821", 0.0),  # a prefix is not the key
        (" 11111 48213", 0.0),  # only the first number counts
        ("I do not know", 0.0),
        ("", 0.0),
    ],
)
def test_passkey_first_number(output, expected_score):
    assert score_output(output, ["48213"], "first_number") == expected_score


@pytest.mark.parametrize(
    "output, expected_score",
    [
        (" 1234567, 7654321, 1111111 and 2222222.", 1.0),  # all four values
        (" 2222222 1111111 7654321 1234567", 1.0),  # order does not matter
        (" 1234567 and 7654321", 0.5),  # partially right
        (" 91234567 and 12345678", 0.0),  # digits inside longer numbers do not count
        (" none of them", 0.0),
    ],
)
def test_all_values_present(output, expected_score):
    assert score_output(output, ["1234567", "7654321", "1111111", "2222222"], "all") == expected_score


def test_words_and_phrases_match_whole_words_case_insensitively():
    assert score_output(" Bluefield   labs, I think.", ["Bluefield Labs"], "all") == 1.0
    assert score_output(" Bluefield Laboratories", ["Bluefield Labs"], "all") == 0.0
    assert score_output(" RODOS, TDCMX and wHRQD", ["RODOS", "TDCMX", "WHRQD", "QYLHO"], "all") == 0.75
    assert score_output(" gelotic", ["gelo"], "all") == 0.0


def test_correct_means_everything_found():
    assert is_correct(1.0) and not is_correct(0.75) and not is_correct(0.0)
    assert first_number("abc 12 and 13") == "12" and first_number("none") is None


def test_bad_rules_and_answers():
    with pytest.raises(ValueError, match="unknown scoring rule 'fuzzy'"):
        score_output("x", ["1"], "fuzzy")
    with pytest.raises(ValueError, match="expected answers are empty"):
        score_output("x", [], "all")
    with pytest.raises(ValueError, match="one expected number"):
        score_output("x", ["1", "2"], "first_number")
