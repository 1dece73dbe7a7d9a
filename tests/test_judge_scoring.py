"""Scoring against the judge's transcripts: digits the listener wrote are read the way they were said."""

import pytest

from speechlm.training.textnorm import scoring_readings

jiwer = pytest.importorskip("jiwer")
from speechlm.judge import answer_heard, word_error_rate  # noqa: E402


@pytest.mark.parametrize(
    ("said", "written"),
    [
        ("The house was built in nineteen thirteen.", "The house was built in 1913."),
        ("She was born in nineteen oh one.", "She was born in 1901."),
        ("It happened in nineteen hundred.", "It happened in 1900."),
        ("Lunch is at three thirty.", "Lunch is at 3.30."),
        ("It is five oh five.", "It is 5.05."),
        ("I counted two thousand seventy two of them.", "I counted 2072 of them."),  # a cardinal stays one
        ("It costs three point five.", "It costs 3.5."),
    ],
)
def test_the_listeners_digits_match_what_was_said(said, written):
    assert word_error_rate(said, written) == 0.0


def test_a_wrong_number_is_still_an_error():
    assert word_error_rate("The house was built in nineteen thirteen.", "The house was built in 1914.") == pytest.approx(1 / 7)
    assert word_error_rate("Lunch is at three thirty.", "Lunch is at 3.40.") == pytest.approx(1 / 5)
    assert word_error_rate("hello there", "") == 1.0 and word_error_rate("", "") == 0.0


def test_readings_are_every_combination_and_bounded():
    assert scoring_readings("no digits") == ["no digits"]
    readings = scoring_readings("In 1913 at 3.30, 2.5 kg and 10,000 people.")
    assert readings[0] == "In 1913 at 3.30, 2.5 kg and 10,000 people." and len(readings) == 4  # not 2.5, not 10,000
    assert "In nineteen thirteen at three thirty, 2.5 kg and 10,000 people." in readings
    assert len(scoring_readings(" ".join(["1999"] * 12))) == 2  # past MAX_READINGS: as written, and all read as years


def test_answer_heard_reads_the_digits_too():
    assert answer_heard("nineteen thirteen", "It was built in 1913.")
    assert answer_heard("five", "Two plus three is 5.")
    assert not answer_heard("five", "Two plus three is 6.") and not answer_heard("", "anything")
