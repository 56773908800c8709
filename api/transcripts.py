"""Transcript export: txt, json, srt and vtt from `Transcript.segments` (times in the original file)."""

from __future__ import annotations

from typing import Any

from api.problems import Problem
from core.languages import iso_language
from core.models import Job, Transcript

MEDIA_TYPES = {
    "txt": "text/plain; charset=utf-8",
    "json": "application/json",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


def _timestamp(seconds: float, sep: str) -> str:
    millis = max(0, round(float(seconds) * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"


def _segments(transcript: Transcript) -> list[dict[str, Any]]:
    segments = [
        s
        for s in (transcript.segments or [])
        if isinstance(s, dict) and "start" in s and "end" in s and str(s.get("text", "")).strip()
    ]
    if not segments:
        raise Problem(
            409,
            "timestamps_unavailable",
            f"the model that produced this transcript ({transcript.model}) gave no timestamps; use txt/json",
        )
    return segments


def to_srt(transcript: Transcript) -> str:
    """SubRip cues, numbered from 1."""
    cues = []
    for number, seg in enumerate(_segments(transcript), start=1):
        start, end = _timestamp(seg["start"], ","), _timestamp(seg["end"], ",")
        cues.append(f"{number}\n{start} --> {end}\n{str(seg['text']).strip()}\n")
    return "\n".join(cues)


def to_vtt(transcript: Transcript) -> str:
    """WebVTT cues."""
    cues = ["WEBVTT\n"]
    for seg in _segments(transcript):
        start, end = _timestamp(seg["start"], "."), _timestamp(seg["end"], ".")
        cues.append(f"{start} --> {end}\n{str(seg['text']).strip()}\n")
    return "\n".join(cues)


def render(job: Job, transcript: Transcript, fmt: str) -> tuple[Any, str]:
    """(body, media type) of a transcript in `fmt`."""
    if fmt == "json":
        return (
            {
                "job_id": str(job.id),
                "text": transcript.text,
                "language": iso_language(transcript.language),  # rows kept before codes were enforced
                "model": transcript.model,
                "duration_seconds": job.duration_seconds,
                "segments": transcript.segments,
            },
            MEDIA_TYPES["json"],
        )
    if fmt == "srt":
        return to_srt(transcript), MEDIA_TYPES["srt"]
    if fmt == "vtt":
        return to_vtt(transcript), MEDIA_TYPES["vtt"]
    return transcript.text, MEDIA_TYPES["txt"]
