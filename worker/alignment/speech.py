"""Where a chunk has speech: the pipeline's energy VAD (worker.audio) as time regions, and snapping to them.

The regions are unpadded voiced runs of 30 ms frames (a frame is voiced above worker.audio's adaptive
threshold), with gaps shorter than `MIN_GAP_SECONDS` closed. Alignment uses them to pick window cuts in
pauses, to estimate how many words fit in a window, and to move a word edge that landed in a pause onto
the speech next to it (a model's word edges drift into pauses; the first word after a pause most).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from worker.audio import FRAME_SECONDS, frame_levels_db, speech_threshold_db

SAMPLE_RATE = 16_000
MIN_GAP_SECONDS = 0.12  # shorter dips are stop consonants, not pauses
MIN_RUN_FRAMES = 2

Audio = npt.NDArray[np.float32] | npt.NDArray[np.int16] | npt.NDArray[np.float64]


def as_float32(audio: Audio) -> npt.NDArray[np.float32]:
    """16 kHz mono samples as float32 in [-1, 1] (int16 is scaled)."""
    if audio.dtype == np.int16:
        return (audio.astype(np.float32) / 32768.0).reshape(-1)
    return np.asarray(audio, dtype=np.float32).reshape(-1)


def _as_int16(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


@dataclass(frozen=True)
class SpeechRegions:
    """Voiced time spans `[(start, end), ...]` in seconds, in order, not overlapping."""

    spans: tuple[tuple[float, float], ...]
    duration: float

    @property
    def speech_seconds(self) -> float:
        """Total voiced time."""
        return sum(end - start for start, end in self.spans)

    def speech_between(self, t0: float, t1: float) -> float:
        """Voiced seconds inside `[t0, t1]`."""
        return sum(max(0.0, min(end, t1) - max(start, t0)) for start, end in self.spans)

    def last_speech_end(self, t0: float, t1: float) -> float | None:
        """The end of the last voiced span that starts inside `[t0, t1)`, clipped to `t1`."""
        inside = [min(end, t1) for start, end in self.spans if t0 <= start < t1 or start < t0 < end]
        return inside[-1] if inside else None

    def pauses(self, t0: float, t1: float) -> list[tuple[float, float]]:
        """Unvoiced gaps between voiced spans that lie inside `[t0, t1]`."""
        gaps = [(a[1], b[0]) for a, b in zip(self.spans, self.spans[1:], strict=False)]
        return [(s, e) for s, e in gaps if s >= t0 and e <= t1]

    def is_speech(self, t: float) -> bool:
        """Whether `t` lies in a voiced span."""
        i = bisect.bisect_right([s for s, _ in self.spans], t) - 1
        return i >= 0 and t <= self.spans[i][1]

    def onset_of(self, t: float) -> float | None:
        """The start of the voiced span that contains `t`, or None when `t` is in a pause."""
        i = bisect.bisect_right([s for s, _ in self.spans], t) - 1
        return self.spans[i][0] if i >= 0 and t <= self.spans[i][1] else None

    def next_onset(self, t: float) -> float | None:
        """The start of the first voiced span at or after `t`."""
        starts = [s for s, _ in self.spans]
        i = bisect.bisect_left(starts, t)
        return starts[i] if i < len(starts) else None

    def previous_offset(self, t: float) -> float | None:
        """The end of the last voiced span at or before `t`."""
        ends = [e for _, e in self.spans]
        i = bisect.bisect_right(ends, t) - 1
        return ends[i] if i >= 0 else None


def find_regions(audio: Audio) -> SpeechRegions:
    """The voiced regions of a chunk's 16 kHz mono samples."""
    samples = as_float32(audio)
    duration = len(samples) / SAMPLE_RATE
    if len(samples) == 0 or not np.any(samples):
        return SpeechRegions(spans=(), duration=duration)
    levels = frame_levels_db(_as_int16(samples))
    voiced = levels > speech_threshold_db(levels)
    edges = np.diff(voiced.astype(np.int8), prepend=0, append=0)
    spans: list[tuple[float, float]] = []
    for i, j in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True):
        if j - i < MIN_RUN_FRAMES:
            continue
        start, end = i * FRAME_SECONDS, min(j * FRAME_SECONDS, duration)
        if spans and start - spans[-1][1] < MIN_GAP_SECONDS:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return SpeechRegions(spans=tuple(spans), duration=duration)
