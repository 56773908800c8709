"""What prepare learned about a job's audio (duration, codec, speech, time map), written on the job row."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update

from core import metrics
from core.db import session_scope
from core.models import Job
from core.statuses import JobStatus


@dataclass(frozen=True)
class ProbedJob:
    """What prepare learned about one job, written in bulk."""

    id: uuid.UUID
    duration_seconds: float
    codec: str | None
    sample_rate: int | None
    channels: int | None
    speech_seconds: float
    time_map: dict[str, Any]


def save_probes(probes: list[ProbedJob]) -> None:
    """Store decode/VAD results of processing jobs (not the fingerprint: `dedupe` writes that)."""
    if not probes:
        return
    with session_scope() as session:
        for p in probes:
            session.execute(
                update(Job)
                .where(Job.id == p.id, Job.status == JobStatus.PROCESSING.value)
                .values(**_probe_values(p))
            )
    metrics.AUDIO_SUBMITTED_SECONDS.inc(sum(p.duration_seconds for p in probes))


def _probe_values(p: ProbedJob) -> dict[str, Any]:
    return {
        "duration_seconds": p.duration_seconds,
        "codec": p.codec,
        "sample_rate": p.sample_rate,
        "channels": p.channels,
        "speech_seconds": p.speech_seconds,
        "time_map": p.time_map,
    }


def save_time_map(job_id: uuid.UUID, time_map: dict[str, Any]) -> None:
    """Replace a job's time map (after its chunk plan changed)."""
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(time_map=time_map))
