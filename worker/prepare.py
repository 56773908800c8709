"""Prepare: claim queued jobs, normalise their audio once, dedupe, store FLAC, and group them.

For a list of job ids (one `prepare` task, ≤ 50 jobs from one API call):
1. Claim them all in one `UPDATE … RETURNING` (`queued → processing`, lease, run_count + 1).
2. Per job, with no database session open: stream the source object from S3 to a temp file, decode and
   bound it (worker.audio). Bad audio fails that job with `unsupported_media` / `empty_audio` /
   `audio_too_long` and the rest go on; a missing source object fails it with `source_missing`.
3. Save the probe (duration, codec, speech seconds, time map), then dedupe within the tenant:
   a finished twin's transcript is copied (zero cost, no call); a twin still in flight is waited for
   (`deduplicated_from_id` set; worker.completion finishes it with the twin); otherwise this job leads.
   Audio in which the VAD finds nothing is finished at once with an empty transcript and no call.
4. Leaders' trimmed audio is encoded as 16 kHz mono FLAC and stored under `{tenant}/derived/{job}.flac`
   (long files: one object per chunk, `{tenant}/derived/{job}/{index}.flac`, with `job_chunks` rows), so
   later stages never decode the original again. A whole small file's FLAC waits in Redis under that
   name instead (worker.derived).
5. Leaders are packed into groups (worker.grouping); each group gets one transcribe task on its
   priority's queue — or, when its chain starts with `local`, one local task per job.

Jobs of one task are prepared by `PREPARE_THREADS` threads at once (S3 and Postgres round trips overlap;
PyAV decodes without the GIL); identical audio in two threads is still serialised by `records.dedupe`.

Leases: while a job waits in the broker for its transcribe task its lease is the broker's visibility
timeout plus the job lease, since a queue backlog is not a dead worker; the transcribe task renews it.
An unexpected error (S3 down) leaves the job `processing` with a lease ending in 60 s x run_count; the
sweeper then re-queues it, until `VOXQ_JOB_MAX_ATTEMPTS` runs have been spent.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from botocore.exceptions import ClientError

from core.errors import AudioError
from core.settings import Settings, get_settings
from core.statuses import JobStatus
from core.storage import Storage, parse_s3_uri
from worker import audio, completion, derived, dispatch, grouping, records
from worker.runtime import get_runtime
from worker.transcribe import derived_key

log = logging.getLogger(__name__)

PREPARE_THREADS = 4
RETRY_AFTER_ERROR_SECONDS = 60.0


@dataclass
class PrepareReport:
    """What one prepare run did, by outcome."""

    claimed: int = 0
    failed: int = 0
    deduplicated: int = 0
    waiting: int = 0
    silent: int = 0
    grouped: int = 0
    groups: list[uuid.UUID] = field(default_factory=list)
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, outcome: str) -> None:
        """Count one job's outcome (called from the prepare threads)."""
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)


def _download(storage: Storage, job: records.ClaimedJob, target: str, settings: Settings) -> None:
    with open(target, "wb") as fh:
        if job.source_uri:
            bucket, key = parse_s3_uri(job.source_uri)
            storage.download_to(key, fh, bucket=bucket)
        elif (
            job.object_key
            and job.size_bytes is not None
            and job.size_bytes < settings.s3_multipart_threshold_bytes
        ):
            # A small upload (a voicemail): one streamed GET. `download_to` (s3transfer) sends a HEAD first
            # and builds a transfer manager with its own threads for every file.
            for part in storage.iter_chunks(job.object_key):
                fh.write(part)
        elif job.object_key:
            storage.download_to(job.object_key, fh)
        else:
            raise FileNotFoundError("job has no audio object")


def _fail(job: records.ClaimedJob, code: str, message: str, report: PrepareReport) -> None:
    if records.end_job(job.id, status=JobStatus.FAILED, code=code, message=message):
        completion.job_finished(job.id, job.batch_id)
    report.add("failed")


def _store(
    storage: Storage, job: records.ClaimedJob, prepared: audio.PreparedAudio, settings: Settings, inline: bool
) -> None:
    chunk_rows = []
    planned = len(prepared.time_map.chunks)
    single = planned == 1
    for chunk in prepared.iter_chunks():
        key = derived_key(job.tenant_id, job.id, None if single and chunk.index == 0 else chunk.index)
        # A whole small file waits in Redis (worker.derived); chunks and large files go to S3.
        if not (inline and single and derived.put_inline(settings, key, chunk.flac)):
            storage.upload_bytes(chunk.flac, key, content_type=audio.FLAC_CONTENT_TYPE)
        chunk_rows.append(
            {
                "index": chunk.index,
                "start_seconds": chunk.original_start,
                "end_seconds": chunk.original_end,
                "object_key": key,
            }
        )
    if len(chunk_rows) > 1:
        records.save_chunks(job.id, chunk_rows)
    if len(chunk_rows) != planned:
        # iter_chunks halved a chunk that encoded above the upload limit: keep the final plan.
        records.save_time_map(job.id, prepared.time_map.to_json())


def prepare_one(
    job: records.ClaimedJob,
    storage: Storage,
    settings: Settings,
    report: PrepareReport,
    inline: bool = False,
) -> grouping.GroupItem | None:
    """Normalise, dedupe and store one claimed job; returns it when it needs transcribing."""
    with tempfile.TemporaryDirectory(prefix="voxq-prep-") as tmp:
        source = f"{tmp}/source"
        try:
            _download(storage, job, source, settings)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}:
                _fail(job, "source_missing", "the uploaded audio object is missing from storage", report)
                return None
            raise
        except FileNotFoundError as exc:
            _fail(job, "source_missing", str(exc), report)
            return None
        try:
            prepared = audio.prepare_audio(
                source,
                max_seconds=settings.max_audio_seconds,
                max_chunk_seconds=settings.max_chunk_seconds,
                trim=settings.trim_silence,
                tmp_dir=tmp,
            )
        except AudioError as exc:
            _fail(job, exc.code, exc.message, report)
            return None
        try:
            probe = records.ProbedJob(
                id=job.id,
                duration_seconds=prepared.decoded.duration,
                codec=prepared.decoded.probe.codec,
                sample_rate=prepared.decoded.probe.sample_rate,
                channels=prepared.decoded.probe.channels,
                speech_seconds=prepared.speech_seconds,
                time_map=prepared.time_map.to_json(),
            )
            if not prepared.has_speech:
                records.save_probes([probe])
                done = records.succeed_job(
                    job.id,
                    group_id=None,
                    text_="",
                    segments=[],
                    language=job.batch.language,
                    model="none",
                    attempt_id=None,
                    provenance={"reason": "no speech found by the VAD; no provider was called"},
                )
                if done is not None:
                    completion.job_finished(job.id, job.batch_id, succeeded=done)
                report.add("silent")
                return None
            decision = records.dedupe(
                job_id=job.id,
                tenant_id=job.tenant_id,
                fingerprint=prepared.decoded.fingerprint,
                language=job.batch.language,
                prompt=job.batch.prompt,
                probe=probe,  # written with the decision, in the same transaction
            )
            if (
                decision.kind == "copy"
                and decision.twin_id is not None
                and records.copy_transcript(job.id, decision.twin_id)
            ):
                completion.job_finished(job.id, job.batch_id)
                report.add("deduplicated")
                return None
            if decision.kind == "wait":
                report.add("waiting")
                return None
            chain = grouping.model_chain(job.batch.models, settings)
            _store(storage, job, prepared, settings, inline and chain[0] != "local")
            return grouping.GroupItem(
                job_id=job.id,
                tenant_id=job.tenant_id,
                batch=job.batch,
                chain=tuple(chain),
                seconds=prepared.speech_seconds,
            )
        finally:
            prepared.close()


def prepare_jobs(job_ids: list[uuid.UUID], *, owner: str) -> PrepareReport:
    """Run the prepare stage for these jobs (the ones still `queued`); see the module docstring."""
    settings = get_settings()
    report = PrepareReport()
    lease = settings.celery_visibility_timeout + settings.job_lease_seconds
    claimed = records.claim_jobs(job_ids, owner=owner, lease_seconds=lease)
    report.claimed = len(claimed)
    if not claimed:
        return report
    # The process's client (built once after fork): a new boto3 client per task was 30% of prepare's CPU.
    storage = get_runtime().storage
    inline = derived.inline_allowed(settings)

    def run(job: records.ClaimedJob) -> grouping.GroupItem | None:
        try:
            return prepare_one(job, storage, settings, report, inline)
        except Exception:
            # Left processing with a lease ending soon (later on each run): the sweeper re-queues it, and
            # run_count bounds the loop.
            log.exception("prepare failed for job %s", job.id)
            report.add("errors")
            try:
                records.release_soon(job.id, after_seconds=RETRY_AFTER_ERROR_SECONDS * job.run_count)
            except Exception:
                log.exception("could not shorten the lease of job %s", job.id)
            return None

    # Download, decode and upload are mostly waiting on S3 and Postgres: overlap a few jobs. Each thread
    # holds one file's temp PCM at a time, so disk and memory stay bounded by PREPARE_THREADS files.
    with ThreadPoolExecutor(max_workers=min(PREPARE_THREADS, len(claimed))) as pool:
        items = [item for item in pool.map(run, claimed) if item is not None]
    plans = grouping.plan_groups(items, settings)
    group_ids = records.assign_groups(plans)
    records.extend_leases([i.job_id for i in items], owner=owner, lease_seconds=lease)
    for plan, gid in zip(plans, group_ids, strict=True):
        if plan.chain and plan.chain[0] == "local":
            for job_id, _ in plan.members:
                dispatch.send_local(job_id, gid)
        else:
            dispatch.send_group(gid, priority=plan.priority)
    report.grouped = len(items)
    report.groups = group_ids
    return report
