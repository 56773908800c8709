"""core.subtitles (worker.alignment.cues re-exports it): cues from timed words, SRT/WebVTT text."""

from __future__ import annotations

import itertools
import re

import pytest

from core.subtitles import (
    MAX_CUE_SECONDS,
    MAX_LINE_CHARS,
    Segment,
    Word,
    build_segments,
    render_srt,
    render_vtt,
    wrap_lines,
)


def speak(text: str, start: float = 0.0, per_word: float = 0.3, gap: float = 0.05) -> list[Word]:
    """Words of `text` one after another at a steady pace."""
    words = []
    t = start
    for w in text.split():
        words.append(Word(w, t, t + per_word))
        t += per_word + gap
    return words


def check_cues(segments: list[Segment], words: list[Word]) -> None:
    """What every cue list must satisfy."""
    assert " ".join(s.text for s in segments) == " ".join(w.word for w in words)
    for seg in segments:
        assert seg.end >= seg.start
        assert seg.end - seg.start <= MAX_CUE_SECONDS + 1e-9
        lines = wrap_lines(seg.text)
        assert lines is not None and len(lines) <= 2
        assert all(len(line) <= MAX_LINE_CHARS for line in lines)
    for a, b in itertools.pairwise(segments):
        assert b.start >= a.end  # in order, no overlap


def test_cues_break_after_sentence_ends() -> None:
    words = speak("Hello there. How are you? I am fine!")
    segments = build_segments(words)
    assert [s.text for s in segments] == ["Hello there.", "How are you?", "I am fine!"]
    check_cues(segments, words)


def test_cues_break_at_pauses() -> None:
    words = [*speak("so we went", 0.0), *speak("to the market", 3.0)]
    segments = build_segments(words)
    assert [s.text for s in segments] == ["so we went", "to the market"]
    assert segments[0].end == pytest.approx(words[2].end) and segments[1].start == 3.0
    # A short gap is not a pause.
    assert len(build_segments([*speak("so we went", 0.0), *speak("to the market", 1.2)])) == 1


def test_long_sentences_are_cut_into_cues_of_at_most_7_s_and_two_lines_of_42() -> None:
    text = " ".join(["word"] * 20 + ["elephantine", "circumstances,"] + ["and"] * 30 + ["end."])
    words = speak(text, per_word=0.45)
    segments = build_segments(words)
    assert len(segments) > 3
    check_cues(segments, words)
    # Slow speech: the 7 s limit, not the lines, makes the cut.
    slow = speak("a b c d e f g h i j k l m n o p", per_word=1.0)
    slow_cues = build_segments(slow)
    assert all(s.end - s.start <= MAX_CUE_SECONDS for s in slow_cues) and len(slow_cues) >= 3
    check_cues(slow_cues, slow)


def test_a_full_cue_ends_after_its_last_clause_mark() -> None:
    words = speak(
        "This sentence has quite a few words before the comma, and then it goes on for a good while longer"
    )
    segments = build_segments(words)
    assert segments[0].text.endswith("comma,")
    check_cues(segments, words)


def test_a_word_longer_than_a_line_gets_a_cue_of_its_own() -> None:
    url = "https://example.com/a/very/long/path/that/does/not/fit/on/one/line"
    words = speak(f"see {url} now")
    segments = build_segments(words)
    assert [s.text for s in segments] == ["see", url, "now"]


def test_short_cues_are_shown_longer_but_never_over_the_next_one() -> None:
    words = [Word("Yes.", 1.0, 1.2), Word("No.", 1.5, 1.7), Word("Maybe.", 5.0, 5.3)]
    segments = build_segments(words, duration=5.6)
    assert segments[0] == Segment(1.0, 1.5, "Yes.")  # up to the next cue's start
    assert segments[1] == Segment(1.5, 2.5, "No.")  # a full second
    assert segments[2] == Segment(5.0, 5.6, "Maybe.")  # not past the audio
    assert build_segments([Word("Last.", 5.0, 5.3)])[0].end == 5.3  # duration unknown: no stretch


def test_empty_words_are_skipped_and_no_words_give_no_cues() -> None:
    assert build_segments([]) == []
    assert [s.text for s in build_segments([Word("a", 0, 1), Word(" ", 1, 1), Word("b", 1, 2)])] == ["a b"]


def test_wrap_lines_balances_two_lines() -> None:
    assert wrap_lines("short line") == ["short line"]
    lines = wrap_lines("the quick brown fox jumps over the lazy dog and keeps on running")
    assert lines is not None and len(lines) == 2
    assert abs(len(lines[0]) - len(lines[1])) <= 12
    assert wrap_lines("x" * 50) is None
    assert wrap_lines(" ".join(["word"] * 30)) is None
    assert wrap_lines("") == []


def test_srt_and_vtt_formatting() -> None:
    segments = [
        Segment(0.0, 1.5, "Hello there."),
        Segment(3725.0049, 3727.0, "the quick brown fox jumps over the lazy dog and keeps on running"),
    ]
    srt = render_srt(segments)
    assert srt.startswith(
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n01:02:05,005 --> 01:02:07,000\n"
    )
    assert srt.endswith("\n") and not srt.endswith("\n\n")
    vtt = render_vtt(segments)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n01:02:05.005 --> ")
    for text in (srt, vtt):
        last_cue = text.split("\n\n")[-1].splitlines()
        assert len(last_cue[-2:]) == 2 and all(len(line) <= 42 for line in last_cue[-2:])
    assert re.fullmatch(r"WEBVTT\n", render_vtt([])) and render_srt([]) == ""
