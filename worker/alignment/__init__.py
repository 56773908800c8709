"""Word timestamps for text that came without them: align a hosted transcript to its chunk's audio locally.

Public surface (everything else in this package is an implementation detail):

- `align_words(model, audio, text, *, language, method)` -> `Aligned | AlignmentFailed`: one timed `Word`
  per whitespace-separated word of `text`, exactly as written, in the chunk's time; `model` is a loaded
  faster-whisper `WhisperModel` (the local engine's, `worker.local_engine.get_local_provider().load()`).
  `make_aligner(...)` builds the same thing once for many chunks.
- methods: `whisper_align` (a, the default: Whisper's alignment heads force the text onto 30 s windows)
  and `local_words` (b: a local transcription with word times, matched to the text). docs/benchmarks.md
  (section `align_words`) has both measured and says why (a) is the default.
- `build_segments(words)` -> subtitle cues (≤ 7 s, ≤ 2 lines of 42, breaks at sentence ends and pauses);
  `render_srt` / `render_vtt` format them.
- `chunk_clock(time_map.to_original, chunk_offset)` and `shift_words` / `shift_segments`: chunk time to the
  original file's time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from worker.alignment.cues import build_segments, render_srt, render_vtt, wrap_lines
from worker.alignment.speech import Audio
from worker.alignment.timing import chunk_clock, shift_segments, shift_words
from worker.alignment.types import (
    Aligned,
    AlignmentFailed,
    AlignmentResult,
    FailureReason,
    Segment,
    TimeFn,
    Word,
)
from worker.alignment.whisper_align import METHOD as WHISPER_ALIGN
from worker.alignment.whisper_align import WhisperAligner
from worker.alignment.words import METHOD as LOCAL_WORDS
from worker.alignment.words import TranscriptAligner

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

DEFAULT_METHOD = WHISPER_ALIGN
METHODS = (WHISPER_ALIGN, LOCAL_WORDS)


class Aligner(Protocol):
    """Anything that times a hosted text on a chunk's audio."""

    method: str

    def align(self, audio: Audio, text: str) -> AlignmentResult:
        """Word times for `text` on `audio`, or why there are none."""
        ...


def make_aligner(
    model: WhisperModel, *, language: str | None = None, method: str = DEFAULT_METHOD
) -> Aligner:
    """An aligner of `method` on a loaded model; raises ValueError for an unknown method or language."""
    lang = (language or "en").lower()
    if method == WHISPER_ALIGN:
        return WhisperAligner(model, language=lang)
    if method == LOCAL_WORDS:
        return TranscriptAligner(model, language=lang)
    raise ValueError(f"unknown alignment method {method!r}; known: {', '.join(METHODS)}")


def align_words(
    model: WhisperModel, audio: Audio, text: str, *, language: str | None = None, method: str = DEFAULT_METHOD
) -> AlignmentResult:
    """Time every word of `text` on `audio` (16 kHz mono, chunk time); failure is a value, never raised."""
    try:
        aligner = make_aligner(model, language=language, method=method)
    except ValueError as exc:
        return AlignmentFailed(FailureReason.UNSUPPORTED_LANGUAGE, str(exc)[:300], method)
    return aligner.align(audio, text)


__all__ = [
    "DEFAULT_METHOD",
    "LOCAL_WORDS",
    "METHODS",
    "WHISPER_ALIGN",
    "Aligned",
    "Aligner",
    "AlignmentFailed",
    "AlignmentResult",
    "FailureReason",
    "Segment",
    "TimeFn",
    "TranscriptAligner",
    "WhisperAligner",
    "Word",
    "align_words",
    "build_segments",
    "chunk_clock",
    "make_aligner",
    "render_srt",
    "render_vtt",
    "shift_segments",
    "shift_words",
    "wrap_lines",
]
