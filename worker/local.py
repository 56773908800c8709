"""The local engine's stage: transcribe one job on this worker's CPU with the offline Whisper model.

Runs on the `local` queue, in worker processes of their own, so slow CPU work never blocks the I/O-bound
hosted-provider workers. The model is loaded once per process (see worker.signals). A job arrives here
when its chain is `local` only (no API key) or when the hosted models of its chain gave up; the task
holds the job only while its `group_id` still matches (the same token as the group task).

Each call is an attempt (model `local:<name>`) with a cost record of USD 0 carrying the compute seconds,
closed together with its answer (`job_answers`, like a hosted one). Pieces with an answer kept by an
earlier run (hosted or local) are reused; the remaining ones are transcribed here in order.
The local engine transcribes whole chunks itself (no 25 MB limit), so a failure here fails the job.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from core.pricing import price_attempt
from core.providers.base import ProviderError, TranscriptionRequest
from core.settings import get_settings
from core.statuses import AttemptOutcome, JobStatus
from worker import audio, completion
from worker.pieces import compose_prompt, pieces_of
from worker.runtime import get_runtime
from worker.store.answers import KeptAnswer, stored_answer
from worker.store.attempts import close_attempt, open_attempt
from worker.store.batches import load_batches
from worker.store.claims import claim_group, end_job, finish_group
from worker.store.groups import GroupJob

log = logging.getLogger(__name__)


def local_model_name(provider_name: str) -> str:
    """The model name recorded for local attempts: `local:<name>`."""
    return provider_name if provider_name.startswith("local:") else f"local:{provider_name}"


def _claim(job_id: uuid.UUID, group_id: uuid.UUID, owner: str) -> GroupJob | None:
    jobs = claim_group(group_id, owner=owner, lease_seconds=get_settings().job_lease_seconds, only=[job_id])
    return jobs[0] if jobs else None


def transcribe_local(job_id: uuid.UUID, group_id: uuid.UUID, *, worker: str) -> str:
    """Transcribe a job with the local engine and finish it; returns the job's resulting status."""
    from worker.local_engine import get_local_provider

    job = _claim(job_id, group_id, worker)
    if job is None:
        return "not_claimed"
    batch = load_batches({job.batch_id})[job.batch_id]
    provider = get_local_provider()
    storage = get_runtime().storage  # this process's client: building a boto3 client costs tens of ms
    tmap = audio.TimeMap.from_json(job.time_map)
    texts: list[str] = []
    segments: list[dict[str, Any]] = []
    attempt_ids: list[uuid.UUID] = []
    models: list[str] = []
    language: str | None = None
    previous: str | None = None
    for piece in pieces_of(job, batch):
        kept = stored_answer(job, piece.index, piece.offset, piece.offset + piece.seconds)
        if kept is not None:
            texts.append(kept["text"])
            segments.extend(kept["segments"] or [])
            models.append(kept["model"])
            if kept["attempt_id"] is not None:
                attempt_ids.append(kept["attempt_id"])
            language = language or kept["language"]
            previous = kept["text"]
            continue
        data = b"".join(storage.iter_chunks(piece.object_key))
        provider.load()
        model = local_model_name(provider.name)
        attempt_id = open_attempt(
            tenant_id=job.tenant_id,
            job_id=job.id,
            chunk_index=piece.index,
            model=model,
            provider="local",
            retry_number=0,
            audio_seconds=piece.seconds,
            request_bytes=len(data),
            worker=worker,
        )
        close: dict[str, Any] = {
            "tenant_id": job.tenant_id,
            "batch_id": job.batch_id,
            "job_id": job.id,
            "model": model,
        }
        started = time.monotonic()
        try:
            result = provider.transcribe_sync(
                TranscriptionRequest(
                    audio=data,
                    filename=audio.FLAC_FILENAME,
                    content_type=audio.FLAC_CONTENT_TYPE,
                    model=model,
                    audio_seconds=piece.seconds,
                    language=batch.language,
                    prompt=compose_prompt(batch.prompt, previous),
                    request_id=str(attempt_id),
                    want_timestamps=True,
                )
            )
        except Exception as exc:
            message = (
                exc.message if isinstance(exc, ProviderError) else f"local engine error: {type(exc).__name__}"
            )
            code = exc.code if isinstance(exc, ProviderError) else "local_engine_error"
            close_attempt(
                attempt_id,
                outcome=AttemptOutcome.FAILED,
                latency_ms=(time.monotonic() - started) * 1000,
                error_code=code,
                error_message=message,
                **close,
            )
            log.warning("local engine failed on job %s: %s", job.id, type(exc).__name__)
            if end_job(job.id, status=JobStatus.FAILED, code=code, message=message, group_id=group_id):
                completion.job_finished(job.id, job.batch_id)
            return JobStatus.FAILED.value
        elapsed = time.monotonic() - started
        mapped = audio.map_segments(
            result.segments, text=result.text, offset=piece.offset, duration=piece.seconds, tmap=tmap
        )
        close_attempt(
            attempt_id,
            outcome=AttemptOutcome.SUCCESS,
            latency_ms=elapsed * 1000,
            http_status=None,
            priced=price_attempt(model, None, piece.seconds),
            compute_seconds=result.compute_seconds if result.compute_seconds is not None else elapsed,
            answer=KeptAnswer(
                job_id=job.id,
                index=piece.index,
                start_seconds=piece.offset,
                end_seconds=piece.offset + piece.seconds,
                text=result.text,
                segments=mapped,
                language=result.language,
                model=model,
                attempt_id=attempt_id,
            ),
            **close,
        )
        texts.append(result.text)
        segments.extend(mapped)
        attempt_ids.append(attempt_id)
        models.append(model)
        language = language or result.language
        previous = result.text
    done = completion.succeed_job(
        job.id,
        group_id=group_id,
        text_=" ".join(t.strip() for t in texts if t and t.strip()),
        segments=segments,
        language=language or batch.language,
        model=models[-1] if models else "none",
        attempt_id=attempt_ids[-1] if attempt_ids else None,
        provenance={
            "attempt_ids": [str(a) for a in attempt_ids],
            "models": models,
            "chunks": len(job.chunks) or 1,
            "trimmed_seconds": round(tmap.trimmed_seconds, 3),
            "original_seconds": job.duration_seconds,
        },
    )
    if done:
        completion.job_finished(job.id, job.batch_id)
    finish_group(group_id)
    return JobStatus.SUCCEEDED.value
