"""The trimmed→original time map: where each kept run of audio sat in the original file.

What the VAD keeps is a list of original-time intervals; `TimeMap` maps a time in the trimmed audio (what
the provider heard) back to the original file, and `map_segments` moves a provider's segments and words
there.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from worker.audio.codecs import SAMPLE_RATE
from worker.audio.speech import FRAME_SAMPLES


@dataclass
class TimeMap:
    """Maps seconds in the trimmed audio to seconds in the original file.

    `intervals` holds `(trimmed_start, original_start, length)` triples in order; `chunks` holds the
    `(trimmed_start, trimmed_end)` bounds of each chunk.
    """

    intervals: list[tuple[float, float, float]]
    chunks: list[tuple[float, float]] = field(default_factory=list)

    @property
    def trimmed_seconds(self) -> float:
        """Length of the trimmed audio."""
        if not self.intervals:
            return 0.0
        start, _, length = self.intervals[-1]
        return start + length

    def to_original(self, t: float, *, end: bool = False) -> float:
        """The original-file time of trimmed time `t` (clamped into the kept audio).

        At a join between two kept intervals, `end=True` picks the end of the earlier one (for the end of
        a span), else the start of the later one.
        """
        if not self.intervals:
            return 0.0
        starts = [iv[0] for iv in self.intervals]
        i = max((bisect.bisect_left if end else bisect.bisect_right)(starts, t) - 1, 0)
        trim_start, orig_start, length = self.intervals[i]
        return round(orig_start + min(max(t - trim_start, 0.0), length), 3)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form for `jobs.time_map`."""
        return {
            "intervals": [[round(a, 4), round(b, 4), round(c, 4)] for a, b, c in self.intervals],
            "chunks": [[round(a, 4), round(b, 4)] for a, b in self.chunks],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> TimeMap:
        """Read back what `to_json` wrote."""
        if not data:
            return cls(intervals=[])
        return cls(
            intervals=[(float(a), float(b), float(c)) for a, b, c in data.get("intervals", [])],
            chunks=[(float(a), float(b)) for a, b in data.get("chunks", [])],
        )


def build_time_map(runs: list[tuple[int, int]], total_samples: int) -> TimeMap:
    """The trimmed→original map for these kept frame ranges."""
    intervals: list[tuple[float, float, float]] = []
    t = 0.0
    for start, end in runs:
        s0 = start * FRAME_SAMPLES
        s1 = min(end * FRAME_SAMPLES, total_samples)
        length = (s1 - s0) / SAMPLE_RATE
        intervals.append((t, s0 / SAMPLE_RATE, length))
        t += length
    return TimeMap(intervals=intervals)


def map_segments(
    segments: list[dict[str, Any]] | None,
    *,
    text: str,
    offset: float,
    duration: float,
    tmap: TimeMap,
) -> list[dict[str, Any]]:
    """Segments (times relative to a piece starting at trimmed `offset`) in original-file time.

    A provider that returns no segments (gpt-4o-*) gets one segment spanning the piece.
    """
    if not segments:
        if not text.strip():
            return []
        return [
            {
                "start": tmap.to_original(offset),
                "end": tmap.to_original(offset + duration, end=True),
                "text": text.strip(),
            }
        ]
    out: list[dict[str, Any]] = []
    for seg in segments:
        mapped: dict[str, Any] = {
            "start": tmap.to_original(offset + float(seg.get("start", 0.0))),
            "end": tmap.to_original(offset + float(seg.get("end", 0.0)), end=True),
            "text": str(seg.get("text", "")).strip(),
        }
        words = seg.get("words")
        if words:
            mapped["words"] = [
                {
                    "start": tmap.to_original(offset + float(w.get("start", 0.0))),
                    "end": tmap.to_original(offset + float(w.get("end", 0.0)), end=True),
                    "word": str(w.get("word", "")),
                }
                for w in words
            ]
        out.append(mapped)
    return out
