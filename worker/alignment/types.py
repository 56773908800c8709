"""The values the alignment stage passes around: timed words, segments, and an alignment's outcome.

`Word` and `Segment` live in core.subtitles (the API renders them too); they are re-exported here.

An alignment either succeeds (`Aligned`: one `Word` per whitespace-separated word of the hosted text, in
order, with the hosted word's exact spelling and punctuation) or fails (`AlignmentFailed`: a reason code
and a sentence for the transcript's metadata). Failure is a value, not an exception, because the pipeline
keeps the text and falls back to chunk cues either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from core.subtitles import Segment, Word


class FailureReason(StrEnum):
    """Why an alignment gave no word times."""

    EMPTY_TEXT = "empty_text"  # the hosted text has no words
    NO_SPEECH = "no_speech"  # the audio is silent (or empty)
    TEXT_MISMATCH = "text_mismatch"  # the local words hardly match the hosted text (method b)
    TOO_LONG = "too_long"  # more text than one chunk can hold (method b's token grid)
    UNSUPPORTED_LANGUAGE = "unsupported_language"  # the local model does not know the language
    MODEL_ERROR = "model_error"  # the local model failed (load, encode, align)


@dataclass(frozen=True)
class Aligned:
    """A successful alignment: the hosted words with times, in the chunk's time."""

    words: tuple[Word, ...]
    method: str
    stats: dict[str, Any] = field(default_factory=dict)

    ok = True


@dataclass(frozen=True)
class AlignmentFailed:
    """An alignment that gave no times; `reason` is stable, `detail` is for people (no transcript text)."""

    reason: FailureReason
    detail: str
    method: str

    ok = False

    def to_metadata(self) -> dict[str, str]:
        """What the transcript's metadata says about it."""
        return {"status": "failed", "reason": self.reason.value, "detail": self.detail, "method": self.method}


AlignmentResult = Aligned | AlignmentFailed


class TimeFn(Protocol):
    """Maps a time to another clock; `end=True` for the end of a span (TimeMap.to_original's shape)."""

    def __call__(self, t: float, *, end: bool = False) -> float: ...


__all__ = ["Aligned", "AlignmentFailed", "AlignmentResult", "FailureReason", "Segment", "TimeFn", "Word"]
