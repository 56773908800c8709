"""What a batch's `profile` changes in the pipeline, in one table (README "Profiles" shows it to users).

- `voicemail`: silence trimmed whatever `VOXQ_TRIM_SILENCE` says; pauses inside speech collapsed to
  0.6 s; chunks of `VOXQ_MAX_CHUNK_SECONDS`; chunk context `none`.
- `podcast`: trimming as `VOXQ_TRIM_SILENCE` says (lead-in and tail); pauses inside speech kept up to
  2 s; chunks of at most 300 s, cut at pauses; chunk context `VOXQ_CHUNK_CONTEXT`, never `none`.
- `auto`: trimming as `VOXQ_TRIM_SILENCE` says; pauses collapsed to 0.6 s; chunks of
  `VOXQ_MAX_CHUNK_SECONDS`; chunk context `VOXQ_CHUNK_CONTEXT`.
- Every profile: the batch's language, else the model detects it; timestamps asked of every model.

Why: a voicemail is short, mostly silence and billed by the second, so it is always trimmed hard, and it
is one piece (no context to carry). A podcast's pauses are part of its speech (the rhythm of an
interview, a pause before an answer): only long pauses shrink, to 2 s. Its chunks always carry the
previous chunk's text as context (names and spelling across a cut), and are at most 5 minutes, so that
even a model that gives no segment timestamps (gpt-4o-*: one segment per piece) leaves a timestamp at
least every 5 minutes of the transcript; a model that gives segments (whisper-1, local) gives them as
always. Profiles also keep batches apart when grouping (worker/grouping.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import ChunkContext, Settings
from core.statuses import Profile
from worker.audio import PAD_SECONDS

PODCAST_PAUSE_PAD_SECONDS = 1.0  # each side of speech: a pause longer than 2 s collapses to 2 s
PODCAST_MAX_CHUNK_SECONDS = 300.0


@dataclass(frozen=True)
class ProfilePlan:
    """How the worker treats a batch's audio."""

    trim: bool
    pause_pad_seconds: float
    max_chunk_seconds: float
    chunk_context: ChunkContext


def profile_plan(profile: str, settings: Settings) -> ProfilePlan:
    """The plan for a batch of this profile (an unknown name is treated as `auto`)."""
    if profile == Profile.VOICEMAIL:
        return ProfilePlan(True, PAD_SECONDS, settings.max_chunk_seconds, "none")
    if profile == Profile.PODCAST:
        return ProfilePlan(
            settings.trim_silence,
            PODCAST_PAUSE_PAD_SECONDS,
            min(settings.max_chunk_seconds, PODCAST_MAX_CHUNK_SECONDS),
            "alternate" if settings.chunk_context == "none" else settings.chunk_context,
        )
    return ProfilePlan(settings.trim_silence, PAD_SECONDS, settings.max_chunk_seconds, settings.chunk_context)
