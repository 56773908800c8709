"""Transcript export: txt, json, srt and vtt, with subtitle cues from the transcript's timings.

Cues come from `Transcript.alignment` (word times from the align stage, or the model's own, built into
cues of at most ~7 s and two lines of 42 characters by core.subtitles) when its status is `aligned` or
`partial`; otherwise (no timestamps asked, alignment pending or failed) from `Transcript.segments` as the
model gave them: for a text-only model, one cue per chunk. Every srt/vtt answer says which in the
`X-Voxq-Cues` header (`aligned`, `partial` or `transcript`) and the alignment's state in
`X-Voxq-Alignment` (`none`, `pending`, `aligned`, `partial`, `failed`; `; reason=<code>` when a chunk
failed); a WebVTT file whose batch asked for timings also says it in a NOTE when they are not all there.
A transcript without any timing is 409 `timestamps_unavailable`, never a 500.
"""

from __future__ import annotations

from typing import Any

from api.problems import Problem
from core.languages import iso_language
from core.models import Job, Transcript
from core.statuses import AlignmentStatus
from core.subtitles import Segment, render_srt, render_vtt, segments_from_json, words_from_json

MEDIA_TYPES = {
    "txt": "text/plain; charset=utf-8",
    "json": "application/json",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}
CUES_HEADER = "X-Voxq-Cues"
ALIGNMENT_HEADER = "X-Voxq-Alignment"
TIMED = (AlignmentStatus.ALIGNED.value, AlignmentStatus.PARTIAL.value)
# What the json answer's `alignment` leaves out: the timings are top-level, the token is internal.
_PRIVATE_KEYS = ("words", "segments", "token")


def alignment_of(transcript: Transcript) -> dict[str, Any]:
    """The transcript's alignment document (`{}` when none was asked for)."""
    return transcript.alignment if isinstance(transcript.alignment, dict) else {}


def alignment_state(transcript: Transcript) -> str:
    """`none`, or the alignment's status with `; reason=<code>` when it failed somewhere."""
    doc = alignment_of(transcript)
    status = str(doc.get("status") or "none")
    reason = doc.get("reason")
    return f"{status}; reason={reason}" if reason and status != AlignmentStatus.ALIGNED.value else status


def cues(transcript: Transcript) -> tuple[list[Segment], str]:
    """The subtitle cues and where they come from (`aligned`, `partial` or `transcript`)."""
    doc = alignment_of(transcript)
    status = str(doc.get("status") or "")
    if status in TIMED:
        timed = segments_from_json(doc.get("segments"))
        if timed:
            return timed, status
    segments = segments_from_json(transcript.segments)
    if not segments:
        raise Problem(
            409,
            "timestamps_unavailable",
            f"the model that produced this transcript ({transcript.model}) gave no timestamps and none "
            f"were aligned (alignment: {alignment_state(transcript)}); use txt/json, or "
            "POST /v1/jobs/{id}/align",
        )
    return segments, "transcript"


def cue_headers(transcript: Transcript) -> dict[str, str]:
    """`X-Voxq-Cues` (where srt/vtt cues come from) and `X-Voxq-Alignment` (the alignment's state)."""
    doc = alignment_of(transcript)
    status = str(doc.get("status") or "")
    source = status if status in TIMED and segments_from_json(doc.get("segments")) else "transcript"
    return {CUES_HEADER: source, ALIGNMENT_HEADER: alignment_state(transcript)}


def to_srt(transcript: Transcript) -> str:
    """SubRip cues, numbered from 1."""
    return render_srt(cues(transcript)[0])


def to_vtt(transcript: Transcript) -> str:
    """WebVTT cues, with a NOTE when alignment was asked for but not every cue is word-timed."""
    segments, source = cues(transcript)
    body = render_vtt(segments)
    if alignment_of(transcript) and source != AlignmentStatus.ALIGNED.value:
        what = (
            "cues are the transcript's own segments (whole chunks for a text-only model)"
            if source == "transcript"
            else "chunks that could not be aligned are whole-chunk cues"
        )
        header, _, rest = body.partition("\n")
        body = f"{header}\n\nNOTE voxq: {what}; alignment: {alignment_state(transcript)}\n{rest}"
    return body


def to_json(job: Job, transcript: Transcript) -> dict[str, Any]:
    """The json export: text, language, model, duration, segments, words and the alignment's state."""
    doc = alignment_of(transcript)
    timed = str(doc.get("status") or "") in TIMED
    segments = (
        [s.to_dict() for s in segments_from_json(doc.get("segments"))] if timed else transcript.segments
    )
    words = [w.to_dict() for w in words_from_json(doc.get("words"))] if timed else []
    meta = {k: v for k, v in doc.items() if k not in _PRIVATE_KEYS}
    return {
        "job_id": str(job.id),
        "text": transcript.text,
        "language": iso_language(transcript.language),  # rows kept before codes were enforced
        "model": transcript.model,
        "duration_seconds": job.duration_seconds,
        "segments": segments,
        "words": words,
        "alignment": meta or {"status": "none"},
    }


def render(job: Job, transcript: Transcript, fmt: str) -> tuple[Any, str]:
    """(body, media type) of a transcript in `fmt` (srt/vtt answers add `cue_headers`)."""
    if fmt == "json":
        return to_json(job, transcript), MEDIA_TYPES["json"]
    if fmt == "srt":
        return to_srt(transcript), MEDIA_TYPES["srt"]
    if fmt == "vtt":
        return to_vtt(transcript), MEDIA_TYPES["vtt"]
    return transcript.text, MEDIA_TYPES["txt"]
