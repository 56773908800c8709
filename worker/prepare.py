"""Prepare: claim queued jobs, normalise their audio once, dedupe, store FLAC, and group them.

For a list of job ids (one `prepare` task, ≤ 50 jobs from one API call):
1. Claim them all in one `UPDATE … RETURNING` (`queued → processing`, lease, run_count + 1).
2. Per job, with no database session open: get the source object from S3 and decode and bound it
   (worker.audio). A small upload (≤ `SMALL_SOURCE_BYTES`) is fetched into memory and audio up to
   `MEMORY_SECONDS` is decoded into memory; anything larger goes through temp files. Bad audio fails
   that job with `unsupported_media` / `empty_audio` / `audio_too_long` and the rest go on; a missing
   source object fails it with `source_missing`.
3. Dedupe within the tenant, writing each job's probe (duration, codec, speech seconds, time map) with
   its decision: a finished twin's transcript is copied (zero cost, no call); a twin still in flight is
   waited for (`deduplicated_from_id` set; worker.completion finishes it with the twin); otherwise this
   job leads. Audio in which the VAD finds nothing is finished at once with an empty transcript and no
   call. The task's small files are decided together, in one transaction (`dedupe_many`, in
   submission order); a long file, or one past the task's `MEMORY_BUDGET_BYTES` of held PCM, is decided
   and stored on its own as soon as it is decoded, so disk and memory stay bounded.
4. Leaders' trimmed audio is encoded as 16 kHz mono FLAC and stored under `{tenant}/derived/{job}.flac`
   (long files: one object per chunk, `{tenant}/derived/{job}/{index}.flac`, with `job_chunks` rows), so
   later stages never decode the original again. A whole small file's FLAC waits in Redis under that
   name instead (worker.derived; one pipelined round trip for the task's files).
5. Leaders are packed into groups (worker.grouping) in one transaction that also renews their leases
   and records each job's route (`route_model`, `route_reason`: worker.grouping.job_route);
   each group gets one transcribe task on its priority's queue — or, when its chain starts with `local`,
   one local task per job.

Jobs of one task are downloaded and decoded by `PREPARE_THREADS` threads at once (S3 round trips
overlap); identical audio in two tasks is still serialised by the advisory locks of `dedupe_many`.

Leases: while a job waits in the broker for its transcribe task its lease is the broker's visibility
timeout plus the job lease, since a queue backlog is not a dead worker; the transcribe task renews it.
An unexpected error leaves the job `processing` with a lease ending in 60 s x run_count; the sweeper then
re-queues it, until `VOXQ_JOB_MAX_ATTEMPTS` runs have been spent. An infrastructure outage (S3, Postgres
or Redis unreachable) is not the job's fault: that run is not counted, and the job waits longer each time
(`VOXQ_OUTAGE_RETRY_BASE_SECONDS` to `VOXQ_OUTAGE_RETRY_MAX_SECONDS`), so an outage delays jobs but never
fails them.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from botocore.exceptions import ClientError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError

from core.errors import AudioError
from core.names import LOCAL_MODEL, LOCAL_QUEUE_OWNER
from core.settings import Settings, get_settings
from core.statuses import JobStatus
from core.storage import Storage, parse_s3_uri, storage_outage
from worker import audio, completion, derived, dispatch, grouping
from worker.derived import derived_key
from worker.profiles import profile_plan
from worker.runtime import get_runtime
from worker.store.claims import ClaimedJob, claim_jobs, end_job, release_after_outage, release_soon
from worker.store.dedupe import DedupeRequest, copy_transcript, dedupe_many
from worker.store.groups import assign_groups, save_chunks
from worker.store.probes import ProbedJob, save_probes, save_time_map

log = logging.getLogger(__name__)

PREPARE_THREADS = 4
RETRY_AFTER_ERROR_SECONDS = 60.0
SMALL_SOURCE_BYTES = 4 * 1024 * 1024  # an upload up to this size is downloaded into memory, not to disk
MEMORY_SECONDS = 120.0  # audio up to this long is decoded in memory (3.84 MB of PCM), longer to a temp file
MEMORY_BUDGET_BYTES = 64 * 1024 * 1024  # decoded PCM one task keeps in memory to dedupe its files together


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


_T = TypeVar("_T")


def run_threaded(fn: Callable[[_T], None], items: Sequence[_T], threads: int) -> None:
    """`fn(item)` for every item, on up to `threads` threads of which the calling thread is one.

    The threads take the next item from a shared iterator, so the caller waits only once per extra
    thread (its join) instead of once per item: `ThreadPoolExecutor.map` woke the waiting task thread for
    every finished future, and each wake-up was a GIL hand-off (~10-14% of a prepare child's GIL time in
    P1). `fn` handles its own errors; one that escapes ends only the thread it ran on (the calling
    thread's is raised after the other threads are joined)."""
    pending = iter(items)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                try:
                    item = next(pending)
                except StopIteration:
                    return
            fn(item)

    extra = [threading.Thread(target=work, daemon=True) for _ in range(min(threads, len(items)) - 1)]
    for thread in extra:
        thread.start()
    try:
        work()
    finally:
        for thread in extra:
            thread.join()


def _download(storage: Storage, job: ClaimedJob, target: str) -> None:
    with open(target, "wb") as fh:
        if job.source_uri:
            bucket, key = parse_s3_uri(job.source_uri)
            storage.download_to(key, fh, bucket=bucket)
        elif job.object_key:
            storage.download_to(job.object_key, fh)
        else:
            raise FileNotFoundError("job has no audio object")


def _small_upload(job: ClaimedJob) -> bool:
    """Whether the job's source is an upload small enough to GET into memory."""
    return bool(
        not job.source_uri
        and job.object_key
        and job.size_bytes is not None
        and job.size_bytes <= SMALL_SOURCE_BYTES
    )


def _fail(job: ClaimedJob, code: str, message: str, report: PrepareReport) -> None:
    if end_job(job.id, status=JobStatus.FAILED, code=code, message=message):
        completion.job_finished(job.id, job.batch_id)
    report.add("failed")


class _PcmBudget:
    """Bytes of decoded PCM a prepare task may keep in memory across its jobs (see `MEMORY_BUDGET_BYTES`)."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if n > self.left:
                return False
            self.left -= n
            return True


@dataclass
class _Loaded:
    """A claimed job whose audio is decoded and trimmed, waiting for its dedupe decision."""

    job: ClaimedJob
    prepared: audio.PreparedAudio

    def probe(self) -> ProbedJob:
        p = self.prepared
        return ProbedJob(
            id=self.job.id,
            duration_seconds=p.decoded.duration,
            codec=p.decoded.probe.codec,
            sample_rate=p.decoded.probe.sample_rate,
            channels=p.decoded.probe.channels,
            speech_seconds=p.speech_seconds,
            time_map=p.time_map.to_json(),
        )


def _load(
    job: ClaimedJob, storage: Storage, settings: Settings, report: PrepareReport, tmp: str | None
) -> audio.PreparedAudio | None:
    """Download and decode one job's audio (None when the job failed: missing or bad audio)."""
    try:
        source: str | bytes
        if _small_upload(job):
            # A small upload (a voicemail): one GET into memory. `download_to` (s3transfer) sends a HEAD
            # first and builds a transfer manager with its own threads for every file.
            assert job.object_key is not None
            source = storage.get_bytes(job.object_key)
        else:
            assert tmp is not None, "a job downloaded to disk needs a temp directory"
            source = f"{tmp}/source"
            _download(storage, job, source)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}:
            _fail(job, "source_missing", "the uploaded audio object is missing from storage", report)
            return None
        raise
    except FileNotFoundError as exc:
        _fail(job, "source_missing", str(exc), report)
        return None
    plan = profile_plan(job.batch.profile, settings)  # what the batch's profile means (worker/profiles.py)
    try:
        return audio.prepare_audio(
            source,
            max_seconds=settings.max_audio_seconds,
            max_chunk_seconds=plan.max_chunk_seconds,
            trim=plan.trim,
            pause_pad_seconds=plan.pause_pad_seconds,
            tmp_dir=tmp,
            memory_seconds=MEMORY_SECONDS,
        )
    except AudioError as exc:
        _fail(job, exc.code, exc.message, report)
        return None


def _store(
    storage: Storage,
    job: ClaimedJob,
    prepared: audio.PreparedAudio,
    settings: Settings,
    inline: bool,
    to_redis: list[tuple[str, bytes]],
) -> None:
    """Encode and store a leader's FLAC; a whole small file's is appended to `to_redis` instead."""
    chunk_rows = []
    planned = len(prepared.time_map.chunks)
    single = planned == 1
    for chunk in prepared.iter_chunks():
        key = derived_key(job.tenant_id, job.id, None if single and chunk.index == 0 else chunk.index)
        # A whole small file waits in Redis (worker.derived); chunks and large files go to S3.
        if inline and single and len(chunk.flac) <= settings.derived_inline_max_bytes:
            to_redis.append((key, chunk.flac))
        else:
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
        save_chunks(job.id, chunk_rows)
    if len(chunk_rows) != planned:
        # iter_chunks halved a chunk that encoded above the upload limit: keep the final plan.
        save_time_map(job.id, prepared.time_map.to_json())


def _store_all(
    storage: Storage, leaders: list[_Loaded], settings: Settings, report: PrepareReport, inline: bool
) -> list[_Loaded]:
    """Store the leaders' FLACs, the ones kept in Redis in one round trip; returns the stored ones."""
    stored: list[tuple[_Loaded, list[tuple[str, bytes]]]] = []
    for loaded in leaders:
        to_redis: list[tuple[str, bytes]] = []
        try:
            _store(storage, loaded.job, loaded.prepared, settings, inline, to_redis)
        except Exception as exc:
            _release(loaded.job, report, exc)
            continue
        stored.append((loaded, to_redis))
    kept = iter(derived.put_inline_many(settings, [item for _, to_redis in stored for item in to_redis]))
    done: list[_Loaded] = []
    for loaded, to_redis in stored:
        try:
            for key, flac in to_redis:
                if not next(kept):  # Redis refused it: to S3, as any other FLAC
                    storage.upload_bytes(flac, key, content_type=audio.FLAC_CONTENT_TYPE)
        except Exception as exc:
            _release(loaded.job, report, exc)
            continue
        done.append(loaded)
    return done


def infrastructure_outage(exc: BaseException) -> bool:
    """Whether `exc` is an outage of what the pipeline runs on (S3, Postgres, Redis), not about the job."""
    return storage_outage(exc) or isinstance(exc, OperationalError | RedisConnectionError | RedisTimeoutError)


def _release(job: ClaimedJob, report: PrepareReport, exc: BaseException) -> None:
    """After an unexpected error: log it and let the job's lease run out, so the sweeper re-queues it.

    An infrastructure outage (S3 down for 15 minutes) only delays the job: the run is not counted and it
    waits longer each time (`release_after_outage`). Any other error counts the run (later on each one),
    so `VOXQ_JOB_MAX_ATTEMPTS` bounds a job that keeps failing.
    """
    report.add("errors")
    settings = get_settings()
    try:
        if infrastructure_outage(exc):
            wait = release_after_outage(
                job.id,
                owner=job.owner,
                group_id=None,
                base_seconds=settings.outage_retry_base_seconds,
                cap_seconds=settings.outage_retry_max_seconds,
            )
            log.warning(
                "prepare of job %s stopped by an outage (%s); again in %.0f s, the run not counted",
                job.id,
                type(exc).__name__,
                wait or 0.0,
            )
            return
        log.error("prepare failed for job %s: %s", job.id, type(exc).__name__, exc_info=exc)
        release_soon(
            job.id, owner=job.owner, group_id=None, after_seconds=RETRY_AFTER_ERROR_SECONDS * job.run_count
        )
    except Exception:
        log.exception("could not shorten the lease of job %s", job.id)


def _settle(
    loaded: list[_Loaded], storage: Storage, settings: Settings, report: PrepareReport, inline: bool
) -> list[grouping.GroupItem]:
    """Dedupe decoded jobs together (one transaction), finish twins and silence, store the leaders' FLAC."""
    silent = [x for x in loaded if not x.prepared.has_speech]
    speech = [x for x in loaded if x.prepared.has_speech]
    if silent:
        save_probes([x.probe() for x in silent])
    for x in silent:
        done = completion.succeed_job(
            x.job.id,
            group_id=None,
            text_="",
            segments=[],
            language=x.job.batch.language,
            model="none",
            attempt_id=None,
            provenance={"reason": "no speech found by the VAD; no provider was called"},
        )
        if done is not None:
            completion.job_finished(x.job.id, x.job.batch_id, succeeded=done)
        report.add("silent")
    # Each job's route: its chain ordered by the batch's `routing` for its trimmed seconds (worker.grouping).
    routes = {x.job.id: grouping.job_route(x.job.batch, x.prepared.speech_seconds, settings) for x in speech}
    chains = {job_id: r.chain for job_id, r in routes.items()}
    decisions = dedupe_many(
        [
            DedupeRequest(
                job_id=x.job.id,
                tenant_id=x.job.tenant_id,
                fingerprint=x.prepared.decoded.fingerprint,
                language=x.job.batch.language,
                prompt=x.job.batch.prompt,
                chain=chains[x.job.id],  # which twins' transcripts it may take
                probe=x.probe(),  # written with the decision, in the same transaction
            )
            for x in speech
        ]
    )
    leaders: list[_Loaded] = []
    for x, decision in zip(speech, decisions, strict=True):
        if (
            decision.kind == "copy"
            and decision.twin_id is not None
            and copy_transcript(x.job.id, decision.twin_id)
        ):
            completion.job_finished(x.job.id, x.job.batch_id)
            completion.request_alignments([x.job.id])
            report.add("deduplicated")
        elif decision.kind == "wait":
            report.add("waiting")
        else:
            leaders.append(x)
    local = [x for x in leaders if chains[x.job.id][0] == LOCAL_MODEL]
    hosted = [x for x in leaders if chains[x.job.id][0] != LOCAL_MODEL]
    stored = _store_all(storage, hosted, settings, report, inline)
    stored += _store_all(storage, local, settings, report, False)
    return [
        grouping.GroupItem(
            job_id=x.job.id,
            tenant_id=x.job.tenant_id,
            batch=x.job.batch,
            chain=chains[x.job.id],
            seconds=x.prepared.speech_seconds,
            route_reason=routes[x.job.id].reason,
        )
        for x in stored
    ]


def prepare_jobs(job_ids: list[uuid.UUID], *, owner: str) -> PrepareReport:
    """Run the prepare stage for these jobs (the ones still `queued`); see the module docstring."""
    settings = get_settings()
    report = PrepareReport()
    lease = settings.celery_visibility_timeout + settings.job_lease_seconds
    claimed = claim_jobs(job_ids, owner=owner, lease_seconds=lease)
    report.claimed = len(claimed)
    if not claimed:
        return report
    # The process's client (built once after fork): a new boto3 client per task was 30% of prepare's CPU.
    storage = get_runtime().storage
    inline = derived.inline_allowed(settings)
    budget = _PcmBudget(MEMORY_BUDGET_BYTES)
    items: list[grouping.GroupItem] = []
    held: list[_Loaded] = []
    lock = threading.Lock()

    def load(job: ClaimedJob, tmp: str | None) -> None:
        prepared = _load(job, storage, settings, report, tmp)
        if prepared is None:
            return
        loaded = _Loaded(job, prepared)
        if prepared.decoded.in_memory and budget.take(2 * prepared.decoded.samples):
            with lock:
                held.append(loaded)  # settled with the task's other small files
            return
        # A long file (its PCM in a temp file) or past the task's memory budget: on its own.
        try:
            got = _settle([loaded], storage, settings, report, inline)
        finally:
            prepared.close()
        with lock:
            items.extend(got)

    def run(job: ClaimedJob) -> None:
        try:
            if _small_upload(job):
                load(job, None)  # no temp directory: the source is in memory (a long decode spills to /tmp)
            else:
                with tempfile.TemporaryDirectory(prefix="voxq-prep-") as tmp:
                    load(job, tmp)
        except Exception as exc:
            _release(job, report, exc)

    # Download and decode are partly waiting on S3 and partly C codecs without the GIL: overlap a few jobs.
    # Each thread holds one long file's temp PCM at a time, so disk stays bounded by PREPARE_THREADS
    # files; small files' PCM stays in memory, bounded by MEMORY_BUDGET_BYTES.
    run_threaded(run, claimed, PREPARE_THREADS)
    order = {job.id: i for i, job in enumerate(claimed)}
    held.sort(key=lambda x: order[x.job.id])  # decided in the order the API submitted them
    try:
        items.extend(_settle(held, storage, settings, report, inline))
    except Exception as exc:
        for x in held:
            _release(x.job, report, exc)
    finally:
        for x in held:
            x.prepared.close()
    items.sort(key=lambda i: order[i.job_id])
    plans = grouping.plan_groups(items, settings)
    local = [p for p in plans if p.chain and p.chain[0] == LOCAL_MODEL]
    hosted = [p for p in plans if not (p.chain and p.chain[0] == LOCAL_MODEL)]
    # Jobs bound for the local engine wait in its queue leased to LOCAL_QUEUE_OWNER (worker.local).
    local_wait = dispatch.local_wait_seconds(settings)
    local_ids = assign_groups(local, owner=LOCAL_QUEUE_OWNER, lease_seconds=local_wait)
    hosted_ids = assign_groups(hosted, owner=owner, lease_seconds=lease)
    for plan, gid in zip(local, local_ids, strict=True):
        for job_id, _ in plan.members:
            dispatch.send_local(job_id, gid)
    for plan, gid in zip(hosted, hosted_ids, strict=True):
        dispatch.send_group(gid, priority=plan.priority)
    report.grouped = len(items)
    report.groups = local_ids + hosted_ids
    return report
