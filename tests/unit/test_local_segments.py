"""The local engine's segment conversion: plain dicts in seconds, never going backwards in time."""

from __future__ import annotations

from types import SimpleNamespace

from worker.local_engine import segments_to_dicts


def _word(start: float, end: float, word: str, probability: float = 0.9) -> SimpleNamespace:
    return SimpleNamespace(start=start, end=end, word=word, probability=probability)


def test_segments_become_dicts_with_stripped_words() -> None:
    raw = [
        SimpleNamespace(
            start=0.5,
            end=1.5,
            text=" Hello there.",
            words=[_word(0.5, 0.9, " Hello"), _word(0.9, 1.5, " there.")],
        )
    ]
    assert segments_to_dicts(raw) == [
        {
            "start": 0.5,
            "end": 1.5,
            "text": "Hello there.",
            "words": [
                {"start": 0.5, "end": 0.9, "word": "Hello", "probability": 0.9},
                {"start": 0.9, "end": 1.5, "word": "there.", "probability": 0.9},
            ],
        }
    ]


def test_overlapping_times_are_clamped_monotonic_and_blank_segments_dropped() -> None:
    raw = [
        SimpleNamespace(
            start=0.0, end=2.0, text=" One two.", words=[_word(0.0, 1.2, " One"), _word(1.0, 2.0, " two.")]
        ),
        SimpleNamespace(start=1.8, end=1.9, text="  ", words=[]),
        SimpleNamespace(start=1.9, end=3.0, text=" Three.", words=[_word(1.9, 3.0, " Three.")]),
    ]
    out = segments_to_dicts(raw)
    assert [s["text"] for s in out] == ["One two.", "Three."]
    words = [w for s in out for w in s["words"]]
    assert [w["start"] for w in words] == [0.0, 1.2, 2.0]
    assert all(w["start"] <= w["end"] for w in words)
    assert out[1]["start"] >= out[0]["end"]
