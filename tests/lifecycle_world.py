"""The world of the lifecycle property test (tests/integration/test_lifecycle_property.py).

Real servers throughout: the API is the session's uvicorn process (two tenants, each with its own key),
the pipeline stages are the plain functions behind the Celery tasks, run in this process one message at
a time, taken from the real broker queues in Redis (the API's submit, prepare's group sends, the
transcribe stage's local handoffs and the sweeper's requeues all land there). A worker that stops at a
step is simply a message taken and not run (the worker died), or a group run cut while its calls hang at
the provider (the worker died mid-call). Time passes by moving the rows' clocks back (leases, queue and
submit times, attempt starts), never by sleeping.

`World` holds the operations (each a method, so regression tests replay a failing sequence by calling
them in order) and `check` the invariants, run after every step; `drain` is the end of every example:
work stops (no new faults), the sweeper and the workers run until quiet, the provider's usage export is
settled, and the strict end-state invariants are checked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import redis
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from core import names
from core.models import Attempt, Batch, CostRecord, Job, Tenant, Transcript
from core.statuses import JOB_TERMINAL, AttemptOutcome, BatchStatus, JobStatus, Settlement
from tests.api_helpers import ApiServer, make_key
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import PRIMARY, SECOND, Pipeline, tones

TERMINAL = {s.value for s in JOB_TERMINAL}
LIVE = {JobStatus.QUEUED.value, JobStatus.PROCESSING.value}
# Tones the uploads are made of: few, so identical audio (dedupe twins) comes up often.
FREQS = (300, 420, 560, 700)
MODELS = (PRIMARY, SECOND)
FAULTS = ("rate_limit", "server_error", "server_error:503", "timeout", "quota", "invalid_file")
# Settings of the in-process worker (on top of tests.pipeline_support.hosted_env): the chain ends with
# the local engine, calls time out after 1 s, and a circuit opens only after many failures in a row.
WORKER_ENV = {
    "VOXQ_FALLBACK_MODELS": f"{SECOND},local",
    "VOXQ_PROVIDER_TIMEOUT_SECONDS": "1",
    "VOXQ_MAX_RETRIES": "1",
    "VOXQ_CIRCUIT_OPEN_SECONDS": "1",
}
TRIGGER = "voxq_lifecycle_fail_transcripts"
LONG_PAUSE = timedelta(days=2)  # past every lease, visibility timeout, stale-attempt and batch-check bound


@dataclass
class Slot:
    """A presigned upload slot the API handed out."""

    tenant: int
    batch_id: str
    job_id: str
    url: str
    headers: dict[str, str]
    put: bool = False
    late_put: bool = False


@dataclass
class Message:
    """One Celery message taken from a broker queue."""

    queue: str
    task: str
    kwargs: dict[str, Any]


@dataclass
class World:
    """Two tenants' batches and jobs over the real stack, and the invariants over them."""

    api: ApiServer
    pipeline: Pipeline
    fake: FakeOpenAI
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    keys: list[str] = field(default_factory=list)
    tenant_ids: list[uuid.UUID] = field(default_factory=list)
    clients: list[httpx.Client] = field(default_factory=list)
    batches: list[tuple[int, str]] = field(default_factory=list)  # (tenant index, batch id)
    jobs: list[tuple[int, str]] = field(default_factory=list)  # (tenant index, job id)
    slots: list[Slot] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    heard: dict[str, str] = field(default_factory=dict)  # job id -> what the fake hears in its audio
    runs: int = 0
    _since: float = 0.0
    last_sweep: datetime | None = None  # the database's clock when the sweeper last ran
    log: list[str] = field(default_factory=list)  # the steps taken, for a failure's report

    # ---- setup ----

    def start(self) -> World:
        """Fresh stack state and two tenants with their API keys."""
        stack = self.pipeline.stack
        stack.truncate_database()
        stack.flush_redis()
        self._drop_trigger()  # an earlier test that crashed mid-step may have left it
        self._empty_bucket()
        self.fake.reset()
        self.started = datetime.now(UTC)
        for name in ("acme", "globex"):
            key = make_key(f"{name}-{uuid.uuid4().hex[:6]}")
            self.keys.append(key)
            self.clients.append(self.api.client(key, timeout=60))
        with Session(self.pipeline.engine) as s:
            by_name = {t.name: t.id for t in s.execute(select(Tenant)).scalars()}
        self.tenant_ids = [by_name[n] for n in sorted(by_name, key=lambda n: not n.startswith("acme"))]
        return self

    def close(self) -> None:
        """Close the API clients and remove any injected fault."""
        self._drop_trigger()
        for c in self.clients:
            c.close()

    def _empty_bucket(self) -> None:
        storage = self.pipeline.storage
        for page in storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket):
            for obj in page.get("Contents", []):
                storage.client.delete_object(Bucket=storage.bucket, Key=obj["Key"])

    def _note(self, step: str) -> None:
        now = time.monotonic()
        if self.log:
            self.log[-1] += f" [{now - self._since:.1f}s]"
        self._since = now
        self.log.append(step)

    # ---- API operations ----

    def new_batch(self, tenant: int) -> None:
        """POST /v1/batches."""
        r = self.clients[tenant].post("/v1/batches", json={})
        assert r.status_code == 201, r.text
        self.batches.append((tenant, r.json()["id"]))
        self._note(f"new_batch(tenant={tenant})")

    def _batch(self, pick: int) -> tuple[int, str] | None:
        return self.batches[pick % len(self.batches)] if self.batches else None

    def _job(self, pick: int) -> tuple[int, str] | None:
        return self.jobs[pick % len(self.jobs)] if self.jobs else None

    def upload(self, pick: int, freq: int) -> None:
        """Upload one file (tones of `freq`) to a batch; a batch that no longer accepts files says 409."""
        self._note(f"upload(pick={pick}, freq={freq})")
        chosen = self._batch(pick)
        if chosen is None:
            return
        tenant, batch_id = chosen
        files = {"file": (f"f{freq}.wav", tones(freq), "audio/wav")}
        r = self.clients[tenant].post(f"/v1/batches/{batch_id}/files", files=files)
        assert r.status_code in (201, 409), r.text
        if r.status_code == 201:
            self.jobs += [(tenant, j["id"]) for j in r.json()["jobs"]]
            self.heard.update({j["id"]: f"tone{freq}" for j in r.json()["jobs"]})

    def twin(self, pick: int) -> None:
        """Upload again the very audio of an existing job (a dedupe twin), to the newest batch of the job's
        tenant."""
        self._note(f"twin(pick={pick})")
        chosen = self._job(pick)
        if chosen is None:
            return
        tenant, job_id = chosen
        with Session(self.pipeline.engine) as s:
            job = s.get(Job, uuid.UUID(job_id))
            assert job is not None
            sha = job.sha256
        freq = next((f for f in FREQS if hashlib.sha256(tones(f)).hexdigest() == sha), None)
        if freq is None:
            return  # a presigned upload whose audio changed under it: not one of ours
        newest = max(i for i, (t, _) in enumerate(self.batches) if t == tenant)
        self.upload(newest, freq)

    def presign(self, pick: int, freq: int, put: bool) -> None:
        """A presigned upload slot, and (if `put`) its PUT."""
        self._note(f"presign(pick={pick}, freq={freq}, put={put})")
        chosen = self._batch(pick)
        if chosen is None:
            return
        tenant, batch_id = chosen
        data = tones(freq)
        body = {"filename": f"p{freq}.wav", "bytes": len(data)}
        r = self.clients[tenant].post(f"/v1/batches/{batch_id}/uploads", json=body)
        assert r.status_code in (201, 409), r.text
        if r.status_code != 201:
            return
        slot = Slot(tenant, batch_id, r.json()["job_id"], r.json()["upload_url"], r.json()["headers"])
        self.slots.append(slot)
        self.jobs.append((tenant, slot.job_id))
        if put:
            self._put(slot, data)
            self.heard[slot.job_id] = f"tone{freq}"

    def _put(self, slot: Slot, data: bytes) -> None:
        r = httpx.put(slot.url, content=data, headers=slot.headers, timeout=30)
        assert r.status_code == 200, r.text

    def late_put(self, pick: int, freq: int) -> None:
        """PUT (other) audio to an earlier slot: before submit it is the upload, after it must change
        nothing."""
        self._note(f"late_put(pick={pick}, freq={freq})")
        if not self.slots:
            return
        slot = self.slots[pick % len(self.slots)]
        with Session(self.pipeline.engine) as s:
            status = s.execute(select(Job.status).where(Job.id == uuid.UUID(slot.job_id))).scalar_one()
        if status != JobStatus.PENDING_UPLOAD.value:
            slot.late_put = True  # submit verified the upload: this PUT must change nothing
        else:
            self.heard[slot.job_id] = f"tone{freq}"  # the upload is replaced before submit
        self._put(slot, tones(freq))

    def submit(self, pick: int) -> None:
        """POST /v1/batches/{id}/submit."""
        self._note(f"submit(pick={pick})")
        chosen = self._batch(pick)
        if chosen is None:
            return
        tenant, batch_id = chosen
        r = self.clients[tenant].post(f"/v1/batches/{batch_id}/submit")
        assert r.status_code in (202, 409), r.text

    def cancel_job(self, pick: int) -> None:
        """POST /v1/jobs/{id}/cancel (409 once the job ended)."""
        self._note(f"cancel_job(pick={pick})")
        chosen = self._job(pick)
        if chosen is None:
            return
        tenant, job_id = chosen
        r = self.clients[tenant].post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code in (200, 404, 409), r.text
        assert r.status_code != 404 or job_id in self.deleted, r.text

    def cancel_batch(self, pick: int) -> None:
        """POST /v1/batches/{id}/cancel."""
        self._note(f"cancel_batch(pick={pick})")
        chosen = self._batch(pick)
        if chosen is None:
            return
        tenant, batch_id = chosen
        r = self.clients[tenant].post(f"/v1/batches/{batch_id}/cancel")
        assert r.status_code in (200, 409), r.text

    def delete_job(self, pick: int) -> None:
        """DELETE /v1/jobs/{id}: none of its bytes may be left in S3."""
        self._note(f"delete_job(pick={pick})")
        chosen = self._job(pick)
        if chosen is None:
            return
        tenant, job_id = chosen
        r = self.clients[tenant].delete(f"/v1/jobs/{job_id}")
        assert r.status_code in (204, 404), r.text
        assert r.status_code == 204 or job_id in self.deleted, r.text
        self.deleted.add(job_id)

    def retry_failed(self, pick: int) -> None:
        """POST /v1/batches/{id}/retry-failed."""
        self._note(f"retry_failed(pick={pick})")
        chosen = self._batch(pick)
        if chosen is None:
            return
        tenant, batch_id = chosen
        r = self.clients[tenant].post(f"/v1/batches/{batch_id}/retry-failed")
        assert r.status_code in (202, 409), r.text

    # ---- the provider ----

    def fault(self, model: int, kind: str, count: int = 1) -> None:
        """The provider's next `count` answers for a model: 429 rate limit, 5xx, a timeout (it hangs past
        the client's 1 s), 429 insufficient_quota, or 400 bad audio."""
        self._note(f"fault(model={model}, kind={kind!r}, count={count})")
        name, _, status = kind.partition(":")
        fault: dict[str, Any] = {"kind": name}
        if status:
            fault["status"] = int(status)
        if name == "timeout":
            fault["seconds"] = 3.0
        if name == "rate_limit":
            fault["retry_after_ms"] = 50
        self.fake.script(MODELS[model % len(MODELS)], [fault] * count)

    # ---- workers ----

    def _broker(self) -> redis.Redis:
        return redis.Redis.from_url(self.pipeline.stack.redis_url)

    def messages(self) -> list[tuple[str, bytes]]:
        """Every message waiting in the pipeline's queues, oldest first per queue: (queue key, raw)."""
        client = self._broker()
        try:
            out: list[tuple[str, bytes]] = []
            for queue in names.ALL_QUEUES:
                for key in sorted(k.decode() for k in client.keys(queue + "*")):
                    if key != queue and not key.startswith(queue + "\x06"):
                        continue  # another queue of that prefix (`transcribe.high` under `transcribe`)
                    if client.type(key) != b"list":
                        continue
                    out += [(key, raw) for raw in reversed(client.lrange(key, 0, -1))]
            return out
        finally:
            client.close()

    def take(self, pick: int, queues: tuple[str, ...] | None = None) -> Message | None:
        """Take one waiting message off its queue (a worker received and acked it)."""
        waiting = [(k, raw) for k, raw in self.messages() if queues is None or k.split("\x06")[0] in queues]
        if not waiting:
            return None
        key, raw = waiting[pick % len(waiting)]
        client = self._broker()
        try:
            if not client.lrem(key, 1, raw):
                return None
        finally:
            client.close()
        msg = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
        return Message(key.split("\x06")[0], msg["headers"]["task"], kwargs)

    def work(self, pick: int) -> str:
        """A worker takes one message and runs it to its end."""
        msg = self.take(pick)
        self._note(f"work(pick={pick}) -> {msg.task if msg else None}")
        return self._run(msg) if msg is not None else "idle"

    def lose(self, pick: int) -> None:
        """A worker takes one message and dies before doing anything (or the broker loses it)."""
        msg = self.take(pick)
        self._note(f"lose(pick={pick}) -> {msg.task if msg else None}")

    def _owner(self) -> str:
        self.runs += 1
        return f"prop-worker:{self.runs}"

    def _run(self, msg: Message) -> str:
        from worker.local import transcribe_local
        from worker.prepare import prepare_jobs
        from worker.runtime import get_runtime
        from worker.transcribe import transcribe_group

        try:
            if msg.task == names.TASK_PREPARE_JOB:
                prepare_jobs([uuid.UUID(j) for j in msg.kwargs["job_ids"]], owner=self._owner())
            elif msg.task == names.TASK_TRANSCRIBE_GROUP:
                rt = get_runtime()
                rt.run(transcribe_group(rt, uuid.UUID(msg.kwargs["group_id"])))
            elif msg.task == names.TASK_TRANSCRIBE_LOCAL:
                transcribe_local(
                    uuid.UUID(msg.kwargs["job_id"]), uuid.UUID(msg.kwargs["group_id"]), worker=self._owner()
                )
        except Exception as exc:  # the task fails (Celery logs it and acks): leases and the sweeper recover
            self._note(f"  {msg.task} raised {type(exc).__name__}")
        return msg.task  # webhooks: the batches have no URL, nothing to deliver

    def _take_group(self, pick: int) -> Message | None:
        """A group message; when none waits, a worker prepares some jobs first (which sends some)."""
        transcribe = (names.QUEUE_TRANSCRIBE, names.QUEUE_TRANSCRIBE_HIGH, names.QUEUE_TRANSCRIBE_LOW)
        msg = self.take(pick, transcribe)
        if msg is None:
            prepare = self.take(pick, (names.QUEUE_INGEST, names.QUEUE_INGEST_HIGH))
            if prepare is None:
                return None
            self._run(prepare)
            msg = self.take(pick, transcribe)
        return msg

    def _run_with(self, msg: Message, faults: dict[str, float], *, until_hung: bool = False) -> None:
        """Run a group message while both hosted models answer with these faults."""
        from worker.runtime import get_runtime

        for model in MODELS:
            self.fake.configure(model, faults=faults, hang_seconds=30.0)
        try:
            rt = get_runtime()
            group_id = uuid.UUID(msg.kwargs["group_id"])
            if until_hung:
                rt.run(_run_until_hung(rt, group_id, self.fake))
            else:
                self._run(msg)
        finally:
            for model in MODELS:
                self.fake.configure(model, faults={}, hang_seconds=300.0)
        _wait_idle(self.fake)

    def die_mid_call(self, pick: int) -> None:
        """A worker runs a group until every call of it hangs at the provider, then dies."""
        msg = self._take_group(pick)
        self._note(f"die_mid_call(pick={pick}) -> {msg.task if msg else None}")
        if msg is not None:
            self._run_with(msg, {"timeout": 1.0}, until_hung=True)

    def handoff(self, pick: int) -> None:
        """A worker runs a group while both hosted models answer 429 insufficient_quota: its jobs go to
        the local engine's queue."""
        msg = self._take_group(pick)
        self._note(f"handoff(pick={pick}) -> {msg.task if msg else None}")
        if msg is not None:
            self._run_with(msg, {"quota": 1.0})

    def completion_fails(self, pick: int) -> None:
        """A worker runs a group (or a local job) while every transcript write fails (a database fault)."""
        self._note(f"completion_fails(pick={pick})")
        self._add_trigger()
        try:
            msg = self.take(pick, (names.QUEUE_LOCAL,)) or self._take_group(pick)
            if msg is not None:
                self._run(msg)
        finally:
            self._drop_trigger()

    def _add_trigger(self) -> None:
        with self.pipeline.engine.begin() as conn:
            conn.execute(
                text(
                    f"CREATE OR REPLACE FUNCTION {TRIGGER}() RETURNS trigger AS $$ BEGIN "
                    "RAISE EXCEPTION 'injected transcript write failure'; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    f"CREATE TRIGGER {TRIGGER} BEFORE INSERT ON transcripts "
                    f"FOR EACH ROW EXECUTE FUNCTION {TRIGGER}()"
                )
            )

    def _drop_trigger(self) -> None:
        with self.pipeline.engine.begin() as conn:
            conn.execute(text(f"DROP TRIGGER IF EXISTS {TRIGGER} ON transcripts"))

    # ---- time ----

    def expire_leases(self) -> None:
        """Every lease runs out (workers stopped renewing), then the sweeper ticks."""
        self._note("expire_leases()")
        past = datetime.now(UTC) - timedelta(seconds=1)
        with self.pipeline.engine.begin() as conn:
            conn.execute(
                text("UPDATE jobs SET lease_expires_at = :past WHERE lease_expires_at > :past"),
                {"past": past},
            )
        self._sweep(long=False)

    def long_pause(self) -> None:
        """Two days pass (every clock in the rows moves back), then the sweeper and storage sweep tick."""
        self._note("long_pause()")
        self.time_passes(LONG_PAUSE, note=False)
        self._sweep(long=True)

    def time_passes(self, span: timedelta, *, note: bool = True) -> None:
        """`span` passes for every clock in the rows (they move back); nothing ticks."""
        if note:
            self._note(f"time_passes({span.total_seconds():.0f}s)")
        with self.pipeline.engine.begin() as conn:
            for table, columns in (
                ("jobs", ("lease_expires_at", "queued_at", "created_at", "started_at")),
                ("batches", ("submitted_at", "created_at")),
                ("attempts", ("started_at",)),
            ):
                sets = ", ".join(f"{c} = {c} - :d" for c in columns)
                conn.execute(text(f"UPDATE {table} SET {sets}"), {"d": span})
        self.started -= span
        if self.last_sweep is not None:
            self.last_sweep -= span

    def sweeper_tick(self) -> None:
        """The sweeper's beat, at this moment."""
        self._note("sweeper_tick()")
        self._sweep(long=False)

    def _sweep(self, *, long: bool) -> None:
        from worker.sweeper import sweep
        from worker.upload_sweep import sweep_storage

        with self.pipeline.engine.connect() as conn:
            ts = conn.execute(text("SELECT now()")).scalar_one()
        sweep()
        self.last_sweep = ts
        self._check_swept(ts)
        if long:
            sweep_storage(self.pipeline.storage, derived_older_than=timedelta(0))

    def settle(self) -> None:
        """`voxq billing settle` against the fake's usage export, covering everything so far."""
        from core.billing import BilledRequest, settle

        export = [
            BilledRequest(request_id=e["request_id"], model=e["model"], usage=e["usage"])
            for e in self.fake.billing_log()
        ]
        report = settle(
            export, since=self.started - timedelta(minutes=1), until=datetime.now(UTC) + timedelta(seconds=60)
        )
        assert not report.unknown and not report.mismatched, (report.unknown, report.mismatched)

    # ---- the end of an example ----

    def drain(self, rounds: int = 12) -> None:
        """Work stops: no new faults; workers run every message, the sweeper ticks after a long pause,
        until nothing is queued or processing; then the export is settled and the end state checked."""
        self._note("drain()")
        for _ in range(rounds):
            while self.messages():
                self.work(0)
            self.long_pause()
            if not self.messages() and not self._live_jobs():
                break
        self.settle()
        self.check(final=True)

    def _live_jobs(self) -> list[uuid.UUID]:
        with Session(self.pipeline.engine) as s:
            return list(s.execute(select(Job.id).where(Job.status.in_(LIVE))).scalars())

    # ---- invariants ----

    def check(self, *, final: bool = False) -> None:
        """Every invariant over the rows, the bucket, the fake's bill and the API's views."""
        with Session(self.pipeline.engine) as s:
            jobs = {j.id: j for j in s.execute(select(Job)).scalars()}
            attempts = {a.id: a for a in s.execute(select(Attempt)).scalars()}
            costs = list(s.execute(select(CostRecord)).scalars())
            transcripts = list(s.execute(select(Transcript)).scalars())
            batches = {b.id: b for b in s.execute(select(Batch)).scalars()}
        self._check_attempts(attempts, final)
        self._check_costs(attempts, costs, final)
        self._check_transcripts(jobs, attempts, transcripts)
        self._check_batches(jobs, batches, costs, final)
        self._check_deleted_bytes(jobs)
        self._check_tenants(jobs, batches)
        if final:
            stuck = {str(j.id): j.status for j in jobs.values() if j.status in LIVE}
            assert not stuck, f"jobs not terminal once work stopped: {stuck}"

    def _check_attempts(self, attempts: dict[uuid.UUID, Attempt], final: bool) -> None:
        """No pending attempt the last sweep should have ended (one of an ended run, or older than the
        sweeper's bound on a live call); none at all once work stopped."""
        for a in attempts.values():
            if a.outcome != AttemptOutcome.PENDING.value:
                continue
            assert not final, f"attempt {a.id} still pending once work stopped"
            if self.last_sweep is not None:
                assert a.started_at >= self.last_sweep - _live_call_bound(a), (
                    f"pending attempt {a.id} of job {a.job_id} outlived the sweep at {self.last_sweep}"
                )

    def _check_swept(self, ts: datetime) -> None:
        """Right after a sweep at `ts`: no pending attempt without a live lease, unless its call may still
        be live (younger than the sweeper's bound)."""
        with Session(self.pipeline.engine) as s:
            pending = list(
                s.execute(select(Attempt).where(Attempt.outcome == AttemptOutcome.PENDING.value)).scalars()
            )
            jobs = {
                j.id: j
                for j in s.execute(select(Job).where(Job.id.in_([a.job_id for a in pending]))).scalars()
            }
        for a in pending:
            job = jobs.get(a.job_id) if a.job_id else None
            leased = (
                job is not None
                and job.status == JobStatus.PROCESSING.value
                and job.lease_expires_at is not None
                and job.lease_expires_at > ts
            )
            assert leased or a.started_at >= ts - _live_call_bound(a), (
                f"pending attempt {a.id} of job {a.job_id} ({job.status if job else None}) has no live lease"
            )

    def _check_costs(self, attempts: dict[uuid.UUID, Attempt], costs: list[CostRecord], final: bool) -> None:
        """Every answer the provider billed has exactly one cost record (once its call is closed), with the
        usage and price it billed; every other hosted cost record is an unsettled estimate."""
        billed = {e["request_id"]: e for e in self.fake.billing_log()}
        per_attempt = Counter(str(c.attempt_id) for c in costs)
        assert max(per_attempt.values(), default=0) <= 1, per_attempt.most_common(3)
        by_attempt = {str(c.attempt_id): c for c in costs}
        for request_id, entry in billed.items():
            attempt = attempts.get(uuid.UUID(request_id))
            assert attempt is not None, f"billed request {request_id} has no attempt"
            cost = by_attempt.get(request_id)
            if attempt.outcome == AttemptOutcome.PENDING.value:
                continue  # its worker died after the answer: the sweeper estimates, settlement corrects
            assert cost is not None, f"billed answer {request_id} ({attempt.outcome}) has no cost record"
            if attempt.settlement == Settlement.UNSETTLED.value:
                assert not final, f"billed answer {request_id} still unsettled after settlement"
                continue
            assert not cost.estimated, f"billed answer {request_id} has an estimate, not its bill"
            assert cost.usd == Decimal(entry["usd"]), (request_id, cost.usd, entry["usd"])
        for attempt_id, cost in by_attempt.items():
            if attempt_id in billed:
                continue
            attempt = attempts[uuid.UUID(attempt_id)]
            if attempt.provider == "local":
                assert cost.usd == 0, f"local attempt {attempt_id} costs {cost.usd}"
                continue
            assert cost.estimated and attempt.settlement == Settlement.UNSETTLED.value, (
                f"cost record of {attempt_id} ({attempt.outcome}, {attempt.settlement}): never billed"
            )
            assert not final, f"estimate of {attempt_id} left after settlement"

    def _check_transcripts(
        self, jobs: dict[uuid.UUID, Job], attempts: dict[uuid.UUID, Attempt], transcripts: list[Transcript]
    ) -> None:
        """A transcript only for a succeeded, undeleted job, made by a successful attempt (the job's, or
        its dedupe leader's); a succeeded, undeleted job has exactly one."""
        count = Counter(t.job_id for t in transcripts)
        for t in transcripts:
            job = jobs[t.job_id]
            assert job.deleted_at is None, f"deleted job {job.id} still has its transcript"
            assert job.status == JobStatus.SUCCEEDED.value, f"job {job.id} is {job.status} with a transcript"
            if t.attempt_id is not None:
                assert attempts[t.attempt_id].outcome == AttemptOutcome.SUCCESS.value, t.attempt_id
            assert self._made_by_success(job, jobs, attempts), (
                f"transcript of {job.id} from no successful call"
            )
            if not t.model.startswith("local"):  # the local engine hears tones its own way
                heard = self.heard.get(str(job.id))
                assert t.text == heard, f"job {job.id} transcribed {t.text!r}, its audio says {heard!r}"
        for job in jobs.values():
            if job.status == JobStatus.SUCCEEDED.value and job.deleted_at is None:
                assert count[job.id] == 1, f"succeeded job {job.id} has {count[job.id]} transcripts"

    def _made_by_success(
        self, job: Job, jobs: dict[uuid.UUID, Job], attempts: dict[uuid.UUID, Attempt]
    ) -> bool:
        seen: set[uuid.UUID] = set()
        cur: Job | None = job
        while cur is not None and cur.id not in seen:
            seen.add(cur.id)
            if any(
                a.job_id == cur.id and a.outcome == AttemptOutcome.SUCCESS.value for a in attempts.values()
            ):
                return True
            cur = jobs.get(cur.deduplicated_from_id) if cur.deduplicated_from_id else None
        # A follower of a leader that was deleted since keeps its transcript; the leader's attempts stay.
        same = [j.id for j in jobs.values() if j.fingerprint and j.fingerprint == job.fingerprint]
        return any(a.job_id in same and a.outcome == AttemptOutcome.SUCCESS.value for a in attempts.values())

    def _check_batches(
        self,
        jobs: dict[uuid.UUID, Job],
        batches: dict[uuid.UUID, Batch],
        costs: list[CostRecord],
        final: bool,
    ) -> None:
        """The API's counts are the jobs' states; an ended batch has no live job; once work stopped every
        submitted batch has ended; a batch's cost is the sum of its cost records."""
        for tenant, batch_id in self.batches:
            r = self.clients[tenant].get(f"/v1/batches/{batch_id}")
            assert r.status_code == 200, r.text
            shown = {k: v for k, v in r.json()["counts"].items() if v}
            real = Counter(
                j.status for j in jobs.values() if str(j.batch_id) == batch_id and j.deleted_at is None
            )
            assert shown == dict(real), (batch_id, shown, dict(real))
            batch = batches[uuid.UUID(batch_id)]
            live = [str(j.id) for j in jobs.values() if j.batch_id == batch.id and j.status in LIVE]
            if batch.status in {
                s.value for s in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED)
            }:
                assert not live, f"batch {batch_id} is {batch.status} with live jobs {live}"
            if final and batch.status == BatchStatus.PROCESSING.value:
                # A batch submitted while a presigned upload had not arrived, or given files since its
                # submit, waits for its client (to PUT, to submit again): that is not work.
                client = (JobStatus.PENDING_UPLOAD.value, JobStatus.UPLOADED.value)
                waiting = [j for j in jobs.values() if j.batch_id == batch.id and j.status in client]
                states = {
                    str(j.id): (j.status, j.error_code) for j in jobs.values() if j.batch_id == batch.id
                }
                assert live or waiting, f"batch {batch_id} still processing once every job ended: {states}"
            total = sum((c.usd for c in costs if c.batch_id == batch.id), Decimal(0))
            assert batch.cost_usd == total, (batch_id, batch.cost_usd, total)
        for job in jobs.values():
            total = sum((c.usd for c in costs if c.job_id == job.id), Decimal(0))
            assert job.cost_usd == total, (str(job.id), job.cost_usd, total)

    def _check_deleted_bytes(self, jobs: dict[uuid.UUID, Job]) -> None:
        """No byte of a deleted job is left in S3: its upload (unless another live job of the tenant has the
        same audio), its derived FLACs, its presigned slot's object."""
        if not self.deleted:
            return
        storage = self.pipeline.storage
        objects: set[str] = set()
        for tenant_id in self.tenant_ids:
            for page in storage.client.get_paginator("list_objects_v2").paginate(
                Bucket=storage.bucket, Prefix=f"{tenant_id}/"
            ):
                objects |= {o["Key"] for o in page.get("Contents", [])}
        in_use = {j.object_key for j in jobs.values() if j.deleted_at is None and j.object_key}
        late = {s.job_id for s in self.slots if s.late_put}
        for job_id in self.deleted:
            job = jobs[uuid.UUID(job_id)]
            left = [k for k in objects if f"/{job_id}" in k]
            if job.object_key and job.object_key not in in_use and job.object_key in objects:
                left.append(job.object_key)
            if job_id in late:  # a PUT to its URL after the job left pending_upload: not its audio
                left = [k for k in left if "/incoming/" not in k]
            assert not left, f"deleted job {job_id} left {left}"

    def _check_tenants(self, jobs: dict[uuid.UUID, Job], batches: dict[uuid.UUID, Batch]) -> None:
        """Each tenant's key lists exactly its own batches, and reads none of the other's jobs."""
        for tenant, client in enumerate(self.clients):
            r = client.get("/v1/batches", params={"limit": 200})
            assert r.status_code == 200, r.text
            listed = {b["id"] for b in r.json()["items"]}
            own = {str(b.id) for b in batches.values() if b.tenant_id == self.tenant_ids[tenant]}
            assert listed == own, (tenant, listed ^ own)
            theirs = [b for t, b in self.batches if t != tenant]
            if theirs:
                batch_id = theirs[len(self.log) % len(theirs)]
                for path in (f"/v1/batches/{batch_id}", f"/v1/batches/{batch_id}/jobs"):
                    r = client.get(path)
                    assert r.status_code == 404, (tenant, path, r.status_code)
            other = [j for t, j in self.jobs if t != tenant]
            if other:
                job_id = other[len(self.log) % len(other)]
                for path in (
                    f"/v1/jobs/{job_id}",
                    f"/v1/jobs/{job_id}/transcript",
                    f"/v1/jobs/{job_id}/attempts",
                ):
                    r = client.get(path)
                    assert r.status_code == 404, (tenant, path, r.status_code)


def _live_call_bound(a: Attempt) -> timedelta:
    """How long after its start the sweeper leaves a pending attempt alone (worker.sweeper)."""
    from core.settings import get_settings

    settings = get_settings()
    if a.provider == names.LOCAL_MODEL:
        return timedelta(seconds=settings.task_time_limit + 60)
    return timedelta(seconds=2 * settings.provider_timeout_seconds + 10)


async def _run_until_hung(rt: Any, group_id: uuid.UUID, fake: FakeOpenAI) -> None:
    """Run a group until the provider holds every one of its calls (nothing moves for 0.3 s), then stop
    it as a killed worker would: the attempts stay pending, the leases stay until they run out."""
    from worker.transcribe import transcribe_group

    task = asyncio.ensure_future(transcribe_group(rt, group_id))
    last, still = -1, 0
    while not task.done():
        await asyncio.sleep(0.05)
        now = fake.in_flight
        still = still + 1 if now and now == last else 0
        last = now
        if still >= 6:
            task.cancel()
            break
    await asyncio.gather(task, return_exceptions=True)


def _wait_idle(fake: FakeOpenAI, timeout: float = 10.0) -> None:
    """Wait until the fake holds no request (the dead worker's connections are closed)."""
    deadline = time.monotonic() + timeout
    while fake.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
