"""Subtitle cues from timed words: the implementation is core.subtitles (the API renders cues too)."""

from __future__ import annotations

from core.subtitles import (
    MAX_CUE_SECONDS,
    MAX_LINE_CHARS,
    MAX_LINES,
    MIN_CUE_SECONDS,
    PAUSE_SECONDS,
    Segment,
    Word,
    build_segments,
    render_srt,
    render_vtt,
    wrap_lines,
)

__all__ = [
    "MAX_CUE_SECONDS",
    "MAX_LINES",
    "MAX_LINE_CHARS",
    "MIN_CUE_SECONDS",
    "PAUSE_SECONDS",
    "Segment",
    "Word",
    "build_segments",
    "render_srt",
    "render_vtt",
    "wrap_lines",
]
