"""Clean-up shared by both alignment methods: word edges snapped to speech, kept in order, interpolated.

Models put word edges a little into pauses (the first word after a pause starts early, the last word before
one ends late) or a little late (a smaller model's first word after a pause starts ~0.1 s into its speech);
the energy VAD knows where the pauses are to the frame, so an edge inside a pause moves to the speech it
belongs to, as long as the word keeps some speech, and a word that starts shortly after the onset of a
voiced span, with the previous word ending before that onset, starts at the onset. Times are then made
monotonic (each word starts at or after the previous one's end) so subtitles never go backwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.alignment.speech import SpeechRegions
from worker.alignment.types import Segment, TimeFn, Word

MAX_WORD_SECONDS = 2.0  # a word longer than this has swallowed a pause (or a missing word)
ONSET_PULL_SECONDS = 0.5  # how far after a voiced span's onset a word's start is pulled back to it


def snap_to_speech(words: list[Word], regions: SpeechRegions) -> list[Word]:
    """Each word with its start moved out of a pause onto the next speech, its end back onto the last."""
    out: list[Word] = []
    previous_end = 0.0
    for w in words:
        start, end = w.start, w.end
        if end > start:
            onset = regions.onset_of(start)
            if onset is None:
                onset = regions.next_onset(start)
                if onset is not None and onset < end:
                    start = onset
            elif previous_end <= onset < start <= onset + ONSET_PULL_SECONDS:
                start = onset
            if not regions.is_speech(end):
                offset = regions.previous_offset(end)
                if offset is not None and offset > start:
                    end = offset
        out.append(Word(w.word, start, end))
        previous_end = max(previous_end, end)
    return out


def cap_durations(words: list[Word], limit: float = MAX_WORD_SECONDS) -> list[Word]:
    """Words longer than `limit` shortened from the side that touches a pause-like gap (their start)."""
    return [Word(w.word, max(w.start, w.end - limit), w.end) if w.end - w.start > limit else w for w in words]


def monotonic(words: list[Word], duration: float | None = None) -> list[Word]:
    """Times clamped into `[0, duration]`, each start at or after the previous end, each end ≥ its start."""
    out: list[Word] = []
    floor = 0.0
    for w in words:
        start = max(w.start, floor)
        end = max(w.end, start)
        if duration is not None:
            start, end = min(start, duration), min(end, duration)
        out.append(Word(w.word, round(start, 3), round(end, 3)))
        floor = end
    return out


def interpolate(
    words: list[str], known: dict[int, tuple[float, float]], *, start: float, end: float
) -> list[Word]:
    """Times for every word: known ones as given, runs of unknown ones spread over the gap around them.

    A run of unknown words between two known neighbours shares the time from the earlier one's end to the
    later one's start in proportion to the words' lengths; before the first known word the run ends at its
    start, after the last it starts at its end (both bounded by `start`/`end`, the speech's extent).
    """
    out: list[Word] = []
    i = 0
    n = len(words)
    while i < n:
        if i in known:
            out.append(Word(words[i], *known[i]))
            i += 1
            continue
        j = i
        while j < n and j not in known:
            j += 1
        left = out[-1].end if out else None
        right = known[j][0] if j < n else None
        weights = [max(1, len(w)) for w in words[i:j]]
        if left is None and right is None:
            left, right = start, end
        elif left is None:
            assert right is not None
            left = max(start, right - 0.3 * sum(weights) / 4)
        elif right is None:
            right = min(end, left + 0.3 * sum(weights) / 4)
        right = max(right, left)
        total = float(sum(weights))
        t = left
        for word, weight in zip(words[i:j], weights, strict=True):
            step = (right - left) * weight / total
            out.append(Word(word, t, t + step))
            t += step
        i = j
    return out


def chunk_clock(to_original: TimeFn, offset: float) -> TimeFn:
    """A chunk's clock: chunk time `t` is `to_original(offset + t)` (e.g. a TimeMap and the chunk's start)."""

    def clock(t: float, *, end: bool = False) -> float:
        return to_original(offset + t, end=end)

    return clock


def shift_words(words: Sequence[Word], clock: TimeFn) -> list[Word]:
    """Words moved onto another clock (starts with `end=False`, ends with `end=True`), kept monotonic."""
    return monotonic([Word(w.word, clock(w.start), clock(w.end, end=True)) for w in words])


def shift_segments(segments: Sequence[Segment], clock: TimeFn) -> list[Segment]:
    """Segments moved onto another clock, in order and never overlapping."""
    out: list[Segment] = []
    floor = 0.0
    for seg in segments:
        start = max(clock(seg.start), floor)
        end = max(clock(seg.end, end=True), start)
        out.append(Segment(round(start, 3), round(end, 3), seg.text))
        floor = end
    return out
