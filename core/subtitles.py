"""Timed words and subtitle cues: cues built from words, and SRT/WebVTT text from cues (pure functions).

The worker's alignment stage (worker.alignment, worker.align_stage) builds `Word`s and `Segment`s; the API
(api/transcripts.py) renders the stored ones. Both import them from here, so the API never imports the
worker.

A cue (`Segment`) ends after a word that ends a sentence (`.`, `?`, `!`, `…`), before a pause of at least
`PAUSE_SECONDS`, and before the word that would make it longer than `MAX_CUE_SECONDS` or too long for
`MAX_LINES` lines of `MAX_LINE_CHARS` characters (common subtitle practice: 42 x 2, at most ~7 s). When a
cue has to end because it is full, it ends after its last clause mark (`,` `;` `:` or a dash) or its
longest pause in its second half when there is one, so a line does not stop mid-phrase. A single word
longer than a line gets a cue of its own. Cues are in order and never overlap; a cue shorter than
`MIN_CUE_SECONDS` is shown until the next one starts, up to that long (and never past `duration`).

Rendering wraps a cue's text into at most two balanced lines and formats times as api/transcripts.py
does (`HH:MM:SS,mmm` for SRT, `HH:MM:SS.mmm` for WebVTT), so a transcript's cues and its chunk cues look
alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_CUE_SECONDS = 7.0
MAX_LINE_CHARS = 42
MAX_LINES = 2
PAUSE_SECONDS = 0.6
MIN_CUE_SECONDS = 1.0
_SENTENCE_END = (".", "?", "!", "…", '."', '?"', '!"', ".”", "?”", "!”")
_CLAUSE_END = (",", ";", ":", "-", "\u2013", "\u2014")  # and en/em dashes


@dataclass(frozen=True)
class Word:
    """One hosted word and its time span in seconds."""

    word: str
    start: float
    end: float

    def to_dict(self) -> dict[str, Any]:
        """`{word, start, end}` with millisecond times (the transcript's json form)."""
        return {"word": self.word, "start": round(self.start, 3), "end": round(self.end, 3)}


@dataclass(frozen=True)
class Segment:
    """A subtitle cue's worth of words: its time span and its text on one line."""

    start: float
    end: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        """`{start, end, text}` with millisecond times."""
        return {"start": round(self.start, 3), "end": round(self.end, 3), "text": self.text}


def wrap_lines(text: str, width: int = MAX_LINE_CHARS, max_lines: int = MAX_LINES) -> list[str] | None:
    """`text` in at most `max_lines` balanced lines of at most `width` characters, or None if it can't be."""
    words = text.split()
    if not words:
        return []
    if len(text) <= width:
        return [" ".join(words)]
    if max(len(w) for w in words) > width:
        return None

    def fill(limit: int) -> list[str]:
        lines: list[str] = []
        for word in words:
            if lines and len(lines[-1]) + 1 + len(word) <= limit:
                lines[-1] += " " + word
            else:
                lines.append(word)
        return lines

    if len(fill(width)) > max_lines:
        return None
    # The narrowest fill that still takes no more lines gives the most even lines.
    low, high = max(len(w) for w in words), width
    while low < high:
        mid = (low + high) // 2
        if len(fill(mid)) <= max_lines:
            high = mid
        else:
            low = mid + 1
    return fill(low)


def _fits(words: Sequence[Word], width: int, max_lines: int) -> bool:
    return len(words) == 1 or wrap_lines(" ".join(w.word for w in words), width, max_lines) is not None


def _split_point(cue: list[Word]) -> int:
    """Where a full cue should end: after its last clause mark or its longest pause in its second half."""
    half = (len(cue) + 1) // 2
    for k in range(len(cue) - 1, half - 1, -1):
        if cue[k - 1].word.endswith(_CLAUSE_END):
            return k
    gaps = [(cue[k].start - cue[k - 1].end, k) for k in range(half, len(cue))]
    best = max(gaps, default=(0.0, len(cue)))
    return best[1] if best[0] >= 0.2 else len(cue)


def _segment(words: Sequence[Word]) -> Segment:
    return Segment(words[0].start, words[-1].end, " ".join(w.word for w in words))


def build_segments(
    words: Sequence[Word],
    *,
    max_seconds: float = MAX_CUE_SECONDS,
    width: int = MAX_LINE_CHARS,
    max_lines: int = MAX_LINES,
    pause: float = PAUSE_SECONDS,
    duration: float | None = None,
) -> list[Segment]:
    """Subtitle cues from timed words (in order); see the module doc for where cues break."""
    cues: list[list[Word]] = []
    cue: list[Word] = []
    for word in words:
        if not word.word.strip():
            continue
        if cue and (word.start - cue[-1].end >= pause or cue[-1].word.endswith(_SENTENCE_END)):
            cues.append(cue)
            cue = []
        while cue and (word.end - cue[0].start > max_seconds or not _fits([*cue, word], width, max_lines)):
            k = _split_point(cue)
            cues.append(cue[:k])
            cue = cue[k:]
        cue.append(word)
    if cue:
        cues.append(cue)
    segments = [_segment(c) for c in cues]
    return _stretch_short(segments, max_seconds, duration)


def _stretch_short(segments: list[Segment], max_seconds: float, duration: float | None) -> list[Segment]:
    """Short cues shown a little longer, up to the next cue's start (never overlapping it)."""
    out: list[Segment] = []
    for i, seg in enumerate(segments):
        end = seg.end
        if end - seg.start < MIN_CUE_SECONDS:
            limit = segments[i + 1].start if i + 1 < len(segments) else (duration if duration else seg.end)
            end = max(end, min(seg.start + min(MIN_CUE_SECONDS, max_seconds), limit))
        if out and seg.start < out[-1].end:
            seg = Segment(out[-1].end, max(end, out[-1].end), seg.text)
        out.append(Segment(seg.start, max(end, seg.start), seg.text))
    return out


def _timestamp(seconds: float, sep: str) -> str:
    millis = max(0, round(float(seconds) * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"


def _lines(text: str, width: int, max_lines: int) -> str:
    wrapped = wrap_lines(text, width, max_lines)
    return "\n".join(wrapped) if wrapped is not None else text.strip()


def render_srt(
    segments: Sequence[Segment], *, width: int = MAX_LINE_CHARS, max_lines: int = MAX_LINES
) -> str:
    """SubRip text: cues numbered from 1, each wrapped into at most `max_lines` lines."""
    cues = []
    for number, seg in enumerate(segments, start=1):
        start, end = _timestamp(seg.start, ","), _timestamp(seg.end, ",")
        cues.append(f"{number}\n{start} --> {end}\n{_lines(seg.text, width, max_lines)}\n")
    return "\n".join(cues)


def render_vtt(
    segments: Sequence[Segment], *, width: int = MAX_LINE_CHARS, max_lines: int = MAX_LINES
) -> str:
    """WebVTT text: the header, then one cue per segment wrapped into at most `max_lines` lines."""
    cues = ["WEBVTT\n"]
    for seg in segments:
        start, end = _timestamp(seg.start, "."), _timestamp(seg.end, ".")
        cues.append(f"{start} --> {end}\n{_lines(seg.text, width, max_lines)}\n")
    return "\n".join(cues)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def segments_from_json(items: object) -> list[Segment]:
    """Stored segments (`[{start, end, text}]`, extra keys ignored) with text, in order; junk skipped."""
    out: list[Segment] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        start, end, text = _number(item.get("start")), _number(item.get("end")), str(item.get("text") or "")
        if start is not None and end is not None and text.strip():
            out.append(Segment(start, max(end, start), text.strip()))
    return out


def words_from_json(items: object) -> list[Word]:
    """Stored words (`[{word, start, end}]`), in order; junk skipped."""
    out: list[Word] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        start, end, word = _number(item.get("start")), _number(item.get("end")), str(item.get("word") or "")
        if start is not None and end is not None and word.strip():
            out.append(Word(word.strip(), start, max(end, start)))
    return out
