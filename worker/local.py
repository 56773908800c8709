"""The local engine's stage: transcribe one job on this worker's CPU with the offline Whisper model.

Runs on the `local` queue, in worker processes of their own, so slow CPU work never blocks the I/O-bound
hosted-provider workers. The model is loaded once per process (see worker.signals). A job arrives here
when its chain is `local` only (no API key) or when the hosted models of its chain gave up; the task
holds the job only while its `group_id` still matches (the same token as the group task). A job waits in
the local queue leased to `LOCAL_QUEUE_OWNER`; its run takes the lease (a local run's own owner name)
and renews it while it runs, so neither a long queue nor a long run sends the job back into the hosted
chain (the sweeper hands an expired one back to this queue).

Each call is an attempt (model `local:<name>`) with a cost record of USD 0 carrying the compute seconds,
closed together with its answer (`job_answers`, like a hosted one). Pieces with an answer kept by an
earlier run (hosted or local) are reused; the remaining ones are transcribed here in order.
The local engine transcribes whole chunks itself (no 25 MB limit), so a failure here fails the job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.names import LOCAL_LEASE_PREFIX, LOCAL_MODEL, LOCAL_MODEL_PREFIX, LOCAL_QUEUE_OWNER
from core.pricing import price_attempt
from core.providers.base import ProviderError, TranscriptionRequest
from core.settings import get_settings
from core.statuses import AttemptOutcome, JobStatus
from worker import audio, completion
from worker.pieces import Piece, compose_prompt, pieces_of
from worker.runtime import get_runtime
from worker.store.answers import KeptAnswer, stored_answer
from worker.store.attempts import close_attempt, open_attempt
from worker.store.batches import load_batches
from worker.store.claims import claim_group, end_job, extend_leases, finish_group
from worker.store.groups import GroupJob

if TYPE_CHECKING:
    from core.storage import Storage
    from worker.local_engine import LocalProvider

log = logging.getLogger(__name__)


def local_model_name(provider_name: str) -> str:
    """The model name recorded for local attempts: `local:<name>`."""
    if provider_name.startswith(LOCAL_MODEL_PREFIX):
        return provider_name
    return LOCAL_MODEL_PREFIX + provider_name


def _claim(job_id: uuid.UUID, group_id: uuid.UUID, owner: str) -> GroupJob | None:
    """Take the job from the local queue's lease (or a dead local run's): never from a live run."""
    jobs = claim_group(
        group_id,
        owner=owner,
        lease_seconds=get_settings().job_lease_seconds,
        only=[job_id],
        waiting=LOCAL_QUEUE_OWNER,
    )
    return jobs[0] if jobs else None


@contextlib.contextmanager
def _leased(job_id: uuid.UUID, group_id: uuid.UUID, owner: str) -> Iterator[None]:
    """Renew the job's lease every third of a lease while the local run goes on (a long file on a slow
    CPU runs past a lease; the sweeper would otherwise take the job from a live run)."""
    lease = get_settings().job_lease_seconds
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(max(lease / 3, 0.2)):
            try:
                if not extend_leases([job_id], owner=owner, group_id=group_id, lease_seconds=lease):
                    return  # no longer ours (ended, or taken by the sweeper): nothing to renew
            except Exception as exc:  # a database blip: try again sooner
                log.warning("lease renewal of local job %s failed (%s)", job_id, type(exc).__name__)

    thread = threading.Thread(target=renew, name="voxq-local-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


@dataclass
class _Stitched:
    """A job's pieces so far, in order: reused answers and the ones transcribed here."""

    texts: list[str] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    attempt_ids: list[uuid.UUID] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    language: str | None = None
    previous: str | None = None  # the last piece's text, which prompts the next

    def add(
        self,
        text: str,
        segments: list[dict[str, Any]],
        model: str,
        attempt_id: uuid.UUID | None,
        language: str | None,
    ) -> None:
        """Append one piece's answer."""
        self.texts.append(text)
        self.segments.extend(segments)
        self.models.append(model)
        if attempt_id is not None:
            self.attempt_ids.append(attempt_id)
        self.language = self.language or language
        self.previous = text


class _PieceFailed(Exception):
    """Raised when the local engine fails on a piece (its attempt is closed): the job fails with it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def transcribe_local(job_id: uuid.UUID, group_id: uuid.UUID, *, worker: str) -> str:
    """Transcribe a job with the local engine and finish it; returns the job's resulting status."""
    owner = LOCAL_LEASE_PREFIX + worker  # the sweeper sends a dead local run's job back to this stage
    job = _claim(job_id, group_id, owner)
    if job is None:
        return "not_claimed"
    with _leased(job.id, group_id, owner):
        return _run(job, group_id, worker)


def _run(job: GroupJob, group_id: uuid.UUID, worker: str) -> str:
    """The local run of a claimed job, to its end; the job's resulting status."""
    from worker.local_engine import get_local_provider

    batch = load_batches({job.batch_id})[job.batch_id]
    provider = get_local_provider()
    storage = get_runtime().storage  # this process's client: building a boto3 client costs tens of ms
    tmap = audio.TimeMap.from_json(job.time_map)
    done = _Stitched()
    try:
        for piece in pieces_of(job, batch):
            kept = stored_answer(job, piece.index, piece.offset, piece.offset + piece.seconds)
            if kept is not None:
                done.add(
                    kept["text"], kept["segments"] or [], kept["model"], kept["attempt_id"], kept["language"]
                )
            else:
                _transcribe_piece(provider, storage, piece, done, tmap, worker)
    except _PieceFailed as failed:
        if end_job(
            job.id, status=JobStatus.FAILED, code=failed.code, message=failed.message, group_id=group_id
        ):
            completion.job_finished(job.id, job.batch_id)
        return JobStatus.FAILED.value
    _succeed(job, group_id, batch.language, done, tmap)
    finish_group(group_id)
    return JobStatus.SUCCEEDED.value


def _transcribe_piece(
    provider: LocalProvider, storage: Storage, piece: Piece, done: _Stitched, tmap: audio.TimeMap, worker: str
) -> None:
    """Transcribe one piece with the local engine as an attempt (closed with its answer, or failed:
    `_PieceFailed`) and append it to `done`."""
    job, batch = piece.job, piece.batch
    data = b"".join(storage.iter_chunks(piece.object_key))
    provider.load()
    model = local_model_name(provider.name)
    attempt_id = open_attempt(
        tenant_id=job.tenant_id,
        job_id=job.id,
        chunk_index=piece.index,
        model=model,
        provider=LOCAL_MODEL,
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
                prompt=compose_prompt(batch.prompt, done.previous),
                request_id=str(attempt_id),
                want_timestamps=True,
            )
        )
    except Exception as exc:
        latency_ms = (time.monotonic() - started) * 1000
        raise _close_failed(exc, attempt_id, latency_ms, close) from exc
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
    done.add(result.text, mapped, model, attempt_id, result.language)


def _close_failed(
    exc: Exception, attempt_id: uuid.UUID, latency_ms: float, close: dict[str, Any]
) -> _PieceFailed:
    """Close a failed local attempt; the error that fails its job."""
    message = exc.message if isinstance(exc, ProviderError) else f"local engine error: {type(exc).__name__}"
    code = exc.code if isinstance(exc, ProviderError) else "local_engine_error"
    close_attempt(
        attempt_id,
        outcome=AttemptOutcome.FAILED,
        latency_ms=latency_ms,
        error_code=code,
        error_message=message,
        **close,
    )
    log.warning("local engine failed on job %s: %s", close["job_id"], type(exc).__name__)
    return _PieceFailed(code, message)


def _succeed(
    job: GroupJob, group_id: uuid.UUID, batch_language: str | None, done: _Stitched, tmap: audio.TimeMap
) -> None:
    """Store the stitched transcript (the job succeeds by CAS) and resolve what follows."""
    succeeded = completion.succeed_job(
        job.id,
        group_id=group_id,
        text_=" ".join(t.strip() for t in done.texts if t and t.strip()),
        segments=done.segments,
        language=done.language or batch_language,
        model=done.models[-1] if done.models else "none",
        attempt_id=done.attempt_ids[-1] if done.attempt_ids else None,
        provenance={
            "attempt_ids": [str(a) for a in done.attempt_ids],
            "models": done.models,
            "chunks": len(job.chunks) or 1,
            "trimmed_seconds": round(tmap.trimmed_seconds, 3),
            "original_seconds": job.duration_seconds,
        },
    )
    if succeeded:
        completion.job_finished(job.id, job.batch_id)
