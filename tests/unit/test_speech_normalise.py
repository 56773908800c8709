"""The WER normaliser the speech tests rely on: formatting differences must not count as errors."""

from __future__ import annotations

import pytest

from tests.speech import normalise, word_error_rate
from worker.local_engine import default_cpu_threads


@pytest.mark.parametrize(
    ("spoken", "written"),
    [
        ("Please call me back at 5 5 5, 0 1 3 4.", "please call me back at 555-0134"),
        ("five five five zero one three four", "5550134"),
        ("invoice four thousand five hundred and twelve", "Invoice 4512."),
        ("the total is 240 dollars", "The total is $240."),
        ("two hundred and forty dollars", "$240"),
        ("twenty-five past 3 PM", "25 past 3 p.m."),
        ("It's David, I'm late", "it is david i am late"),
        ("one thousand dollars", "$1,000"),
    ],
)
def test_formatting_variants_normalise_equal(spoken: str, written: str) -> None:
    assert normalise(spoken) == normalise(written)


def test_real_errors_still_count() -> None:
    assert normalise("policy 8 8 2 1 0") != normalise("policy 8820")
    assert word_error_rate(["call me back"], ["call me mac"]) == pytest.approx(1 / 3)
    assert word_error_rate(["hello there"], [""]) == 1.0


def test_default_cpu_threads_share_the_cores() -> None:
    assert default_cpu_threads(1) >= 1
    assert default_cpu_threads(1_000) == 1
