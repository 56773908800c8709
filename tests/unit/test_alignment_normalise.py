"""worker.alignment.normalise: hosted words kept as written, canonical tokens that compare spellings."""

from __future__ import annotations

import pytest

from worker.alignment.normalise import canonical_tokens, split_words, spoken_weight


def texts(text: str) -> list[str]:
    return [t.text for t in canonical_tokens(split_words(text))]


def test_split_words_keeps_every_word_exactly_as_written() -> None:
    text = "  Hello, Maria!  It's $240 —\tsee you at 6.\n"
    assert split_words(text) == ["Hello,", "Maria!", "It's", "$240", "—", "see", "you", "at", "6."]
    assert split_words("   \n\t") == []


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("We had 42 listeners, right?", "we had forty two listeners right"),
        ("We had 42 listeners", "We had forty-two listeners"),
        ("Call 555-0134.", "call five five five zero one three four"),
        ("Call 555-0134.", "Call 5 5 5, 0 1 3 4"),
        ("In 1990 we", "in nineteen ninety we"),
        ("It was 512 pages", "it was five hundred and twelve pages"),
        ("Our budget is 3,400 dollars", "our budget is three thousand four hundred dollars"),
        ("It's $240.", "it is 240 dollars"),
        ("5% off", "five percent off"),
        ("OK, Dr. Smith can't", "okay doctor smith can not"),
        ("the 3rd day", "the three day"),
        ("HELLO… “world”", "hello world"),
    ],
)
def test_spellings_of_the_same_speech_compare_equal(a: str, b: str) -> None:
    assert texts(a) == texts(b)


def test_different_numbers_and_words_stay_different() -> None:
    assert texts("42 listeners") != texts("24 listeners")
    assert texts("forty two") != texts("forty three")
    assert texts("its") == ["its"] and texts("it's") == ["it", "is"]


def test_each_token_remembers_its_word() -> None:
    tokens = canonical_tokens(["Hello,", "forty", "two", "—", "$5"])
    assert [(t.text, t.word) for t in tokens] == [
        ("hello", 0),
        ("4", 1),
        ("2", 2),
        ("5", 4),
        ("dollars", 4),
    ]


def test_a_spelled_number_spreads_its_digits_over_its_words_in_order() -> None:
    tokens = canonical_tokens(["five", "hundred", "fifty", "five"])
    assert [t.text for t in tokens] == ["5", "5", "5"]
    owners = [t.word for t in tokens]
    assert owners == sorted(owners) and owners[0] == 0


def test_spoken_weight_counts_digits_as_spoken_words() -> None:
    assert spoken_weight("42") > spoken_weight("ok")
    assert spoken_weight("Hello,") == spoken_weight("hello")
    assert spoken_weight("—") == 1
