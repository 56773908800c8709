"""Method (b)'s matching and the timing clean-up both methods share: pure functions, no model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from worker.alignment.speech import SpeechRegions, find_regions
from worker.alignment.timing import (
    cap_durations,
    chunk_clock,
    interpolate,
    monotonic,
    shift_segments,
    shift_words,
    snap_to_speech,
)
from worker.alignment.types import Segment, Word
from worker.alignment.whisper_align import plan_windows
from worker.alignment.words import TooLong, align_tokens, match_words


def local(*spec: tuple[str, float, float]) -> list[Word]:
    return [Word(w, s, e) for w, s, e in spec]


def test_align_tokens_is_a_fewest_edits_alignment() -> None:
    pairs = align_tokens(list("kitten"), list("sitting"))
    assert [p for p in pairs if p[0] is not None and p[1] is not None] == [(i, i) for i in range(6)]
    assert pairs[-1] == (None, 6)
    assert align_tokens([], ["a"]) == [(None, 0)]
    assert align_tokens(["a"], []) == [(0, None)]


def test_align_tokens_is_not_fooled_by_a_repeated_phrase() -> None:
    # difflib's longest block first would pair the hosted phrase with the local copy at the end.
    phrase = ["thanks", "for", "listening", "to", "the", "show"]
    hosted = ["one", *phrase, "two", "three", "four", "five", "six"]
    heard = ["one", *phrase, "two", "three", "four", "five", "six", *phrase, *phrase]
    pairs = align_tokens(hosted, heard)
    assert all(i == j for i, j in pairs if i is not None and j is not None)
    assert sum(1 for i, j in pairs if i is not None and j is not None) == len(hosted)


def test_align_tokens_refuses_a_grid_too_large() -> None:
    with pytest.raises(TooLong):
        align_tokens(["a"] * 6000, ["a"] * 6000)


def test_matched_words_take_the_local_times_numbers_and_punctuation_included() -> None:
    hosted = ["We", "had", "42", "listeners,", "right?"]
    heard = local(
        ("we", 1.0, 1.2), ("had", 1.2, 1.4), ("forty", 1.5, 1.8), ("two", 1.8, 2.0),
        ("listeners", 2.1, 2.6), ("right", 2.8, 3.0),
    )  # fmt: skip
    match = match_words(hosted, heard)
    assert match.matched_share == 1.0
    assert match.known == {
        0: (1.0, 1.2),
        1: (1.2, 1.4),
        2: (1.5, 2.0),
        3: (2.1, 2.6),
        4: (2.8, 3.0),
    }


def test_a_misheard_word_is_timed_by_its_counterpart_and_a_missed_one_is_left_out() -> None:
    hosted = ["hello", "Maria", "this", "is", "John"]
    heard = local(("hello", 0.0, 0.4), ("mariah", 0.5, 0.9), ("is", 1.2, 1.3), ("john", 1.4, 1.8))
    match = match_words(hosted, heard)
    assert match.known[1] == (0.5, 0.9)  # replaced 1:1
    assert 2 not in match.known  # "this": nothing heard
    assert match.known[3] == (1.2, 1.3) and match.known[4] == (1.4, 1.8)
    assert match.matched_share == pytest.approx(3 / 5)


def test_fillers_heard_locally_are_ignored() -> None:
    hosted = ["so", "we", "started"]
    heard = local(("so", 0.0, 0.2), ("um", 0.3, 0.6), ("we", 0.8, 0.9), ("started", 0.9, 1.4))
    assert match_words(hosted, heard).known == {0: (0.0, 0.2), 1: (0.8, 0.9), 2: (0.9, 1.4)}


def test_interpolation_spreads_unmatched_words_between_matched_neighbours_by_length() -> None:
    words = ["a", "bb", "cccc", "d"]
    timed = interpolate(words, {0: (0.0, 1.0), 3: (4.0, 5.0)}, start=0.0, end=5.0)
    assert [w.word for w in timed] == words
    assert timed[1].start == pytest.approx(1.0) and timed[2].end == pytest.approx(4.0)
    assert timed[1].end == pytest.approx(2.0)  # "bb" gets 2 of the 6 letters' 3 s
    starts = [w.start for w in timed]
    assert starts == sorted(starts)


def test_interpolation_before_the_first_and_after_the_last_known_word_stays_in_the_speech() -> None:
    timed = interpolate(["x", "y", "known", "z"], {2: (3.0, 3.5)}, start=2.5, end=4.0)
    assert 2.5 <= timed[0].start <= timed[1].start <= timed[1].end <= 3.0
    assert 3.5 <= timed[3].start <= timed[3].end <= 4.0
    nothing = interpolate(["a", "b"], {}, start=1.0, end=3.0)
    assert nothing[0].start == 1.0 and nothing[-1].end == pytest.approx(3.0)


def test_monotonic_never_goes_backwards_and_stays_inside_the_audio() -> None:
    words = local(("a", 1.0, 0.5), ("b", 0.8, 2.0), ("c", 1.5, 1.7), ("d", 9.0, 12.0))
    out = monotonic(words, duration=10.0)
    for prev, cur in itertools.pairwise(out):
        assert cur.start >= prev.end
    assert all(w.end >= w.start for w in out)
    assert out[-1].end <= 10.0 and out[-1].start <= 10.0


REGIONS = SpeechRegions(spans=((1.0, 2.0), (3.0, 4.5)), duration=6.0)


def test_edges_in_pauses_move_onto_the_speech() -> None:
    out = snap_to_speech(local(("early", 0.4, 1.5), ("late", 1.6, 2.6), ("next", 2.7, 3.5)), REGIONS)
    assert out[0] == Word("early", 1.0, 1.5)  # started in the lead-in
    assert out[1] == Word("late", 1.6, 2.0)  # ended in the pause
    assert out[2] == Word("next", 3.0, 3.5)  # started in the pause


def test_a_word_starting_just_after_an_onset_that_follows_a_pause_starts_at_the_onset() -> None:
    out = snap_to_speech(local(("one", 1.0, 2.0), ("two", 3.2, 3.6)), REGIONS)
    assert out[1].start == 3.0
    # Inside one voiced span (no pause before it), a start is left alone.
    inside = snap_to_speech(local(("one", 1.0, 1.3), ("two", 1.4, 1.8)), REGIONS)
    assert inside[1].start == 1.4
    # Too far after the onset: left alone.
    far = snap_to_speech(local(("one", 1.0, 2.0), ("two", 3.9, 4.2)), REGIONS)
    assert far[1].start == 3.9


def test_a_word_wholly_inside_a_pause_is_left_for_monotonic_to_handle() -> None:
    out = snap_to_speech(local(("x", 2.2, 2.5)), REGIONS)
    assert out == local(("x", 2.2, 2.5))


def test_overlong_words_are_cut_from_their_start() -> None:
    assert cap_durations(local(("long", 1.0, 5.0)), limit=2.0) == local(("long", 3.0, 5.0))
    assert cap_durations(local(("ok", 1.0, 2.0)), limit=2.0) == local(("ok", 1.0, 2.0))


def test_find_regions_sees_tone_bursts_and_ignores_short_dips() -> None:
    rate = 16_000
    t = np.arange(rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    dip = np.zeros(int(0.06 * rate), dtype=np.float32)
    silence = np.zeros(rate, dtype=np.float32)
    audio = np.concatenate([silence, tone, dip, tone, silence, tone, silence])
    regions = find_regions(audio)
    assert len(regions.spans) == 2
    (a0, a1), (b0, b1) = regions.spans
    assert a0 == pytest.approx(1.0, abs=0.05) and a1 == pytest.approx(3.06, abs=0.05)
    assert b0 == pytest.approx(4.06, abs=0.05) and b1 == pytest.approx(5.06, abs=0.05)
    assert find_regions(np.zeros(16_000, dtype=np.int16)).spans == ()
    int16 = (audio * 32767).astype(np.int16)
    assert find_regions(int16).spans == regions.spans


def test_windows_are_at_most_30_s_and_cut_in_the_latest_long_pause() -> None:
    # Speech with a pause every 4 s: 3.5 s spoken, 0.5 s quiet, for 100 s.
    spans = tuple((float(s), s + 3.5) for s in range(0, 100, 4))
    windows = plan_windows(SpeechRegions(spans=spans, duration=100.0), 100.0)
    assert windows[0][0] == 0.0 and windows[-1][1] == 100.0
    for (_a0, a1), (b0, _) in itertools.pairwise(windows):
        assert a1 == b0
    for t0, t1 in windows:
        assert t1 - t0 <= 30.0
        if t1 != 100.0:
            assert not any(s < t1 < e for s, e in spans)  # never inside speech
            assert t1 - t0 >= 26.0  # the latest pause, not the first
    # Speech without pauses: hard cuts at 30 s.
    solid = plan_windows(SpeechRegions(spans=((0.0, 70.0),), duration=70.0), 70.0)
    assert solid == [(0.0, 30.0), (30.0, 60.0), (60.0, 70.0)]
    assert plan_windows(SpeechRegions(spans=((0.0, 5.0),), duration=12.0), 12.0) == [(0.0, 12.0)]


def test_chunk_times_move_to_the_original_file_through_an_offset_function() -> None:
    calls: list[tuple[float, bool]] = []

    def to_original(t: float, *, end: bool = False) -> float:
        calls.append((t, end))
        return t + 100.0 if t < 12.0 else t + 200.0  # a trimmed pause after 12 s of trimmed time

    clock = chunk_clock(to_original, 10.0)
    words = shift_words(local(("a", 0.5, 1.0), ("b", 1.5, 2.5)), clock)
    assert words == local(("a", 110.5, 111.0), ("b", 111.5, 212.5))
    assert (12.5, True) in calls and (10.5, False) in calls
    segments = shift_segments([Segment(0.5, 1.0, "a"), Segment(1.5, 2.5, "b")], clock)
    assert segments == [Segment(110.5, 111.0, "a"), Segment(111.5, 212.5, "b")]
