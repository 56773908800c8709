"""Metrics on real servers: the API's /metrics (fleet gauges from real Redis and Postgres), `voxq top`,
and a real Celery worker's multiprocess listener."""

from __future__ import annotations

import asyncio
import http.server
import os
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, select

from core import names
from core.db import session_scope
from core.models import Attempt, Batch, CostRecord, Job, Tenant, WebhookDelivery, WorkerHeartbeat
from core.statuses import AttemptOutcome, JobStatus, WebhookStatus
from tests.api_helpers import METRICS_TOKEN
from tests.fakes.openai_server import FakeOpenAI
from tests.observability_support import (
    FALLBACK,
    PRIMARY,
    Samples,
    full_run,
    parse_samples,
    sample,
    tone_audio,
)
from tests.support import REPO_ROOT, Stack, celery_worker, wait_until
from voxq.embedded import free_port


def value(parsed: Samples, name: str, **labels: str) -> float:
    """A sample that must exist."""
    return parsed[(name, tuple(sorted(labels.items())))]


STATUS_COUNTS = {JobStatus.QUEUED: 7, JobStatus.PROCESSING: 3, JobStatus.SUCCEEDED: 5, JobStatus.FAILED: 2}


def seed_fleet(stack: Stack) -> dict[str, object]:
    """Jobs in several statuses, real Celery messages waiting, an open circuit, a live worker, costs."""
    from api.enqueue import enqueue_jobs, producer
    from core.db import session_scope
    from worker.circuit import CircuitBreaker

    now = datetime.now(UTC)
    tenant_id, batch_id = uuid.uuid4(), uuid.uuid4()
    queued: list[uuid.UUID] = []
    with session_scope() as session:
        session.execute(insert(Tenant).values(id=tenant_id, name=f"t-{tenant_id.hex[:8]}"))
        session.execute(insert(Batch).values(id=batch_id, tenant_id=tenant_id))
        for status, count in STATUS_COUNTS.items():
            for i in range(count):
                job_id = uuid.uuid4()
                finished = (
                    now - timedelta(seconds=20 + i)
                    if status in (JobStatus.SUCCEEDED, JobStatus.FAILED)
                    else None
                )
                session.execute(
                    insert(Job).values(
                        id=job_id,
                        tenant_id=tenant_id,
                        batch_id=batch_id,
                        status=status.value,
                        finished_at=finished,
                    )
                )
                if status is JobStatus.QUEUED:
                    queued.append(job_id)
        attempt_id = uuid.uuid4()
        session.execute(
            insert(Attempt).values(
                id=attempt_id, tenant_id=tenant_id, model="gpt-4o-mini-transcribe", provider="openai"
            )
        )
        session.execute(
            insert(CostRecord).values(
                tenant_id=tenant_id,
                batch_id=batch_id,
                attempt_id=attempt_id,
                model="gpt-4o-mini-transcribe",
                price_table_version="test",
                usd=Decimal("0.0125"),
            )
        )
        session.execute(
            insert(WorkerHeartbeat).values(
                worker="w-alive@host", pid=1, queues=[], started_at=now, last_seen_at=now
            )
        )
        session.execute(
            insert(WorkerHeartbeat).values(
                worker="w-gone@host", pid=2, queues=[], started_at=now, last_seen_at=now - timedelta(hours=1)
            )
        )
    producer.cache_clear()
    # 120 jobs -> 3 prepare tasks (50 per task): real messages in the ingest list.
    tasks = enqueue_jobs(queued * 17 + queued[:1])
    producer.cache_clear()

    async def trip() -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(stack.redis_url)
        try:
            breaker = CircuitBreaker(client, failure_threshold=3, open_seconds=600)
            await breaker.trip("gpt-4o-transcribe")
            await breaker.retire("whisper-1")
            await breaker.record_failure("gpt-4o-mini-transcribe")  # one failure: still closed
        finally:
            await client.aclose()

    asyncio.run(trip())
    return {"ingest_tasks": tasks}


@pytest.fixture
def api_client(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> httpx.Client:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from api.metrics import reset_jobs_memo
    from core.settings import reset_settings_cache

    monkeypatch.setenv("VOXQ_METRICS_TOKEN", METRICS_TOKEN)
    reset_settings_cache()
    reset_jobs_memo()
    return TestClient(create_app(), headers={"Authorization": f"Bearer {METRICS_TOKEN}"})


def test_api_metrics_serve_fleet_gauges_from_redis_and_postgres(
    stack: Stack, api_client: httpx.Client
) -> None:
    seeded = seed_fleet(stack)
    response = api_client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    parsed = parse_samples(response.text)
    assert value(parsed, "voxq_queue_depth", queue=names.QUEUE_INGEST) == seeded["ingest_tasks"] == 3
    assert value(parsed, "voxq_queue_depth", queue=names.QUEUE_TRANSCRIBE) == 0
    for status, count in STATUS_COUNTS.items():
        assert value(parsed, "voxq_jobs", status=status.value) == count
    assert value(parsed, "voxq_jobs", status=JobStatus.CANCELLED.value) == 0
    assert value(parsed, "voxq_workers_alive") == 1
    assert value(parsed, "voxq_circuits_open", model="gpt-4o-transcribe") == 1
    # whisper-1 is not in this process's chain (defaults): its retired circuit is counted as `other`
    assert value(parsed, "voxq_circuits_open", model="other") == 1
    assert ("voxq_circuits_open", (("model", "whisper-1"),)) not in parsed
    assert ("voxq_circuits_open", (("model", "gpt-4o-mini-transcribe"),)) not in parsed
    assert value(parsed, "voxq_fleet_scrape_error", source="redis") == 0
    assert value(parsed, "voxq_fleet_scrape_error", source="postgres") == 0

    # The gauges are read at scrape time: drain the queue and the next scrape says so.
    import redis

    redis.Redis.from_url(stack.redis_url).delete(names.QUEUE_INGEST)
    assert (
        value(parse_samples(api_client.get("/metrics").text), "voxq_queue_depth", queue=names.QUEUE_INGEST)
        == 0
    )


def test_api_metrics_label_provider_circuits_of_configured_providers(
    stack: Stack, api_client: httpx.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider's account circuit (`provider:<name>`: quota, billing, auth) is labelled by its key when
    the provider is configured (the built-in `openai`, or one the providers file declares); an unknown
    provider's, like an unknown model's, is `other`, and the `other` sample counts them all."""
    from core.settings import reset_settings_cache
    from worker.circuit import CircuitBreaker

    providers = tmp_path / "providers.toml"
    providers.write_text(
        '[providers.backup]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "BACKUP_API_KEY"\n\n'
        '[providers.backup.models.whisper-1]\nprice = "table"\n'
    )
    monkeypatch.setenv("VOXQ_PROVIDERS_FILE", str(providers))
    reset_settings_cache()

    async def trip() -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(stack.redis_url)
        try:
            breaker = CircuitBreaker(client, failure_threshold=3, open_seconds=600)
            for key in ("provider:openai", "provider:backup", "provider:nowhere", "made-up-model"):
                await breaker.trip(key)
        finally:
            await client.aclose()

    asyncio.run(trip())
    parsed = parse_samples(api_client.get("/metrics").text)
    assert value(parsed, "voxq_circuits_open", model="provider:openai") == 1
    assert value(parsed, "voxq_circuits_open", model="provider:backup") == 1
    assert ("voxq_circuits_open", (("model", "provider:nowhere"),)) not in parsed
    assert value(parsed, "voxq_circuits_open", model="other") == 2  # provider:nowhere and made-up-model


def test_api_metrics_report_an_unreadable_redis_instead_of_failing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from core.settings import reset_settings_cache

    monkeypatch.setenv("VOXQ_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("VOXQ_METRICS_TOKEN", METRICS_TOKEN)
    reset_settings_cache()
    response = TestClient(create_app()).get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200
    parsed = parse_samples(response.text)
    assert value(parsed, "voxq_fleet_scrape_error", source="redis") == 1
    assert value(parsed, "voxq_fleet_scrape_error", source="postgres") == 0
    assert not any(name == "voxq_queue_depth" for name, _ in parsed)


def run_top(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voxq.cli", "top", *args],
        cwd=REPO_ROOT,
        env=stack.child_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_voxq_top_once_prints_the_fleet(stack: Stack) -> None:
    seed_fleet(stack)
    result = run_top(stack, "--once")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\x1b[2J" not in out  # --once is for pipes: no screen clearing
    assert "workers alive: 1 (w-alive@host)" in out
    ingest_line = next(line for line in out.splitlines() if line.strip().startswith(names.QUEUE_INGEST + " "))
    assert ingest_line.split()[1] == "3"
    assert "queued 7" in out and "processing 3" in out and "succeeded 5" in out and "failed 2" in out
    assert "in flight 3" in out
    finished = next(line for line in out.splitlines() if line.startswith("FINISHED/MIN"))
    # 7 jobs finished 20-26 s ago: all in the newest minute.
    assert finished.split(": ")[1].split()[:5] == ["0", "0", "0", "0", "7"]
    assert "COST/HOUR  $0.0125" in out
    assert "gpt-4o-transcribe: open" in out and "whisper-1: retired" in out
    assert "gpt-4o-mini-transcribe:" not in out.split("CIRCUITS")[1]


def test_voxq_top_once_fails_when_redis_is_down(stack: Stack) -> None:
    result = run_top(stack, "--once", VOXQ_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 1
    assert "!! redis unreadable" in result.stdout
    assert "JOBS" in result.stdout  # Postgres is still read


def test_voxq_top_live_redraws_until_interrupted(stack: Stack) -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "voxq.cli", "top", "--interval", "0.3"],
        cwd=REPO_ROOT,
        env=stack.child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(4)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.count("\x1b[2J") >= 2  # several frames, each after a clear
    assert out.count("voxq top") == out.count("\x1b[2J")


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def test_worker_listener_serves_multiprocess_metrics(stack: Stack) -> None:
    port = free_port()
    data_dir = Path(stack.env()["VOXQ_DATA_DIR"])
    with celery_worker(stack, name=f"m{port}", env={"VOXQ_WORKER_METRICS_PORT": str(port)}) as proc:
        text = wait_until(lambda: _try_scrape(port), timeout=60, what="worker metrics listener")
        families = {f.name for f in text_string_to_metric_families(text)}
        # Unlabelled counters exist from the start, summed over the pool's processes.
        assert {"voxq_audio_submitted_seconds", "voxq_dedupe_hits"} <= families
        # Multiprocess mode: no per-process python_* collectors, and the files live in a per-worker dir.
        assert "python_gc_objects_collected" not in families
        own_dir = data_dir / "prometheus" / f"worker-{proc.pid}"
        assert own_dir.is_dir()
        assert any(own_dir.glob("counter_*.db"))
    # Warm shutdown removes the worker's directory.
    assert not own_dir.exists()
    assert proc.returncode is not None


def _try_scrape(port: int) -> str | None:
    try:
        return scrape(port)
    except httpx.HTTPError:
        return None


def test_worker_without_port_serves_nothing_but_still_runs(stack: Stack) -> None:
    port = free_port()
    with celery_worker(stack, name=f"n{port}") as proc:
        # The heartbeat task runs: the worker is up.
        from celery import Celery

        app = Celery("t", broker=stack.redis_url)
        app.send_task(names.TASK_HEARTBEAT, kwargs={"worker": f"probe-{port}"}, queue=names.QUEUE_MAINTENANCE)
        app.close()

        def beat_written() -> bool:
            from sqlalchemy import select

            from core.db import session_scope

            with session_scope() as session:
                return (
                    session.scalar(select(WorkerHeartbeat).where(WorkerHeartbeat.worker == f"probe-{port}"))
                    is not None
                )

        wait_until(beat_written, timeout=60, what="heartbeat task ran")
        assert _try_scrape(port) is None
        assert proc.poll() is None


def test_a_run_moves_each_family_as_the_run_says(stack: Stack, fake_openai: FakeOpenAI) -> None:
    """The primary is gone (model_not_found): every file falls back once; counters agree with Postgres
    exactly. (Not a quota answer: that is the account's, and would skip the fallback of the same provider
    too, issue #17.)"""
    fake_openai.retire(PRIMARY)
    one, two = tone_audio([1230, 770, 1510]), tone_audio([660, 990])
    run = full_run(
        stack,
        fake_openai,
        [("one.flac", one), ("two.flac", two), ("one-again.flac", one)],
        models=[PRIMARY, FALLBACK],
        settled=lambda m: sample(m, "voxq_jobs_finished_total", status=JobStatus.SUCCEEDED.value) >= 3,
    )
    assert run.batch["status"] == "completed", run.batch
    w, a = run.worker_metrics, run.api_metrics

    with session_scope() as session:
        jobs = session.execute(select(Job)).scalars().all()
        attempts = (
            session.execute(select(Attempt).where(Attempt.outcome != AttemptOutcome.PENDING.value))
            .scalars()
            .all()
        )
        costs = session.execute(select(CostRecord)).scalars().all()
    assert len(jobs) == 3 and all(j.status == JobStatus.SUCCEEDED.value for j in jobs)
    deduped = [j for j in jobs if j.deduplicated_from_id is not None]
    transcribed = [j for j in jobs if j.deduplicated_from_id is None]

    # Attempts by model and outcome: exactly the rows written.
    by_outcome: dict[tuple[str, str], int] = {}
    for attempt in attempts:
        by_outcome[(attempt.model, attempt.outcome)] = by_outcome.get((attempt.model, attempt.outcome), 0) + 1
    assert by_outcome.get((FALLBACK, AttemptOutcome.SUCCESS.value)) == len(transcribed)
    assert by_outcome.get((PRIMARY, AttemptOutcome.FALLBACK.value), 0) >= 1  # the model_not_found answer
    for (model, outcome), count in by_outcome.items():
        assert sample(w, "voxq_attempts_total", model=model, outcome=outcome) == count, (model, outcome)
    assert sample(w, "voxq_attempts_total", model=PRIMARY, outcome=AttemptOutcome.SUCCESS.value) == 0

    # Each transcribed file moved from the primary to the fallback once (by error, or by open circuit).
    # Fallbacks, circuits and rate limiters are about chain entries (`provider:model`); attempts, latency
    # and costs about the model that answered.
    entry, fallback_entry = f"openai:{PRIMARY}", f"openai:{FALLBACK}"
    assert sample(w, "voxq_fallbacks_total", from_model=entry, to_model=fallback_entry) == len(transcribed)
    # model_not_found retired the primary's circuit for the fleet.
    assert sample(w, "voxq_circuit_open", model=entry) == 1
    assert sample(a, "voxq_circuits_open", model=entry) == 1

    # Latency: one observation per answered call of each model.
    for model in (PRIMARY, FALLBACK):
        answered = sum(c for (m, _), c in by_outcome.items() if m == model)
        assert sample(w, "voxq_provider_latency_seconds_count", model=model) == answered
    assert sample(w, "voxq_provider_latency_seconds_sum", model=FALLBACK) > 0

    # Money and audio: the counters equal the cost records to the cent.
    billed = {r.model: 0.0 for r in costs}
    usd = {r.model: Decimal(0) for r in costs}
    for record in costs:
        billed[record.model] += record.billed_audio_seconds
        usd[record.model] += record.usd
    assert set(usd) == {FALLBACK} and usd[FALLBACK] > 0
    assert sample(w, "voxq_cost_usd_total", model=FALLBACK) == pytest.approx(float(usd[FALLBACK]), abs=1e-9)
    assert sample(w, "voxq_audio_billed_seconds_total", model=FALLBACK) == pytest.approx(billed[FALLBACK])
    submitted = sample(w, "voxq_audio_submitted_seconds_total") + sample(
        a, "voxq_audio_submitted_seconds_total"
    )
    assert submitted >= sum(j.duration_seconds or 0 for j in transcribed) > 0

    # Jobs and dedupe.
    assert sample(w, "voxq_jobs_finished_total", status=JobStatus.SUCCEEDED.value) == 3
    assert sample(w, "voxq_dedupe_hits_total") == len(deduped) == 1
    assert sample(w, "voxq_jobs_finished_total", status=JobStatus.FAILED.value) == 0

    # The API: its own upload counter and the fleet gauges after the run.
    assert sample(a, "voxq_uploaded_bytes_total") == len(one) * 2 + len(two)
    assert sample(a, "voxq_jobs", status=JobStatus.SUCCEEDED.value) == 3
    assert sample(a, "voxq_jobs", status=JobStatus.PROCESSING.value) == 0
    for queue in names.ALL_QUEUES:
        assert sample(a, "voxq_queue_depth", queue=queue) == 0


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).received.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_rate_limiter_waits_and_webhook_deliveries_are_counted(stack: Stack, fake_openai: FakeOpenAI) -> None:
    """At 60 requests/min (a 1-request bucket) concurrent calls wait their turn; the webhook goes once."""
    _Receiver.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        run = full_run(
            stack,
            fake_openai,
            [(f"f{i}.flac", tone_audio([440 + 110 * i])) for i in range(3)],
            models=[FALLBACK],
            env={"VOXQ_WEBHOOK_ALLOW_PRIVATE": "true", "VOXQ_MODEL_RPM_LIMIT": "60"},
            batch_options={"webhook_url": f"http://127.0.0.1:{server.server_address[1]}/hook"},
            before_scrape=lambda: wait_until(lambda: _Receiver.received, timeout=60, what="webhook received"),
            settled=lambda m: (
                sample(m, "voxq_webhook_deliveries_total", outcome=WebhookStatus.DELIVERED.value) > 0
            ),
        )
    finally:
        server.shutdown()
        server.server_close()
    assert run.batch["status"] == "completed", run.batch
    w = run.worker_metrics
    with session_scope() as session:
        deliveries = session.execute(select(WebhookDelivery)).scalars().all()
        attempts = session.execute(select(Attempt).order_by(Attempt.started_at)).scalars().all()
    assert [a.outcome for a in attempts] == [AttemptOutcome.SUCCESS.value] * 3
    assert sample(w, "voxq_attempts_total", model=FALLBACK, outcome=AttemptOutcome.SUCCESS.value) == 3
    # One token per second: the calls after the first waited, for about a second each in turn.
    waits = sample(w, "voxq_rate_limiter_waits_total", model=f"openai:{FALLBACK}")
    waited = sample(w, "voxq_rate_limiter_wait_seconds_total", model=f"openai:{FALLBACK}")
    assert 1 <= waits <= 2
    assert 0.5 * waits <= waited <= 3.0 * waits
    spread = (attempts[-1].started_at - attempts[0].started_at).total_seconds()
    assert spread >= 0.8 * waits
    assert len(_Receiver.received) == 1 and run.batch["id"] in _Receiver.received[0].decode()
    assert [d.status for d in deliveries] == [WebhookStatus.DELIVERED.value]
    assert sample(w, "voxq_webhook_deliveries_total", outcome=WebhookStatus.DELIVERED.value) == 1
    assert sample(w, "voxq_webhook_deliveries_total", outcome=WebhookStatus.FAILED.value) == 0


MULTIPROC_SCRIPT = """
import os, sys
import prometheus_client  # already imported in a real worker (by Flower's Celery command plugin)
from worker.metrics_export import mark_process_dead, multiprocess_registry, use_multiprocess
from pathlib import Path

path = Path(sys.argv[1])
use_multiprocess(path)
from core import metrics  # the metrics are created now, in multiprocess mode
metrics.DEDUPE_HITS.inc(100)  # the parent's own values are in the files too
# One after the other: the first child sees the circuit open, the second sees it closed again.
for n, circuit in ((1, 1), (2, 0)):
    pid = os.fork()
    if pid == 0:
        metrics.DEDUPE_HITS.inc(n)
        metrics.ATTEMPTS.labels(model="m", outcome="success").inc(10 * n)
        metrics.CIRCUIT_STATE.labels(model="m").set(circuit)
        os._exit(0)
    os.waitpid(pid, 0)
    mark_process_dead(pid)
try:
    use_multiprocess(path)
except RuntimeError:
    print("# late switch refused")
from prometheus_client import generate_latest
sys.stdout.write(generate_latest(multiprocess_registry(path)).decode())
"""


def test_multiprocess_mode_sums_forked_children(tmp_path: Path) -> None:
    """Metrics created after `use_multiprocess` live in per-process files that the listener sums, even
    though prometheus-client was imported (and chose its value class) before; switching after the
    metrics exist is refused rather than silently counting in memory."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["VOXQ_ALLOWED_MODELS"] = "m"  # metric labels carry configured models only
    result = subprocess.run(
        [sys.executable, "-c", MULTIPROC_SCRIPT, str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "# late switch refused" in result.stdout
    parsed = parse_samples(result.stdout)
    assert value(parsed, "voxq_dedupe_hits_total") == 103  # 100 + 1 + 2: parent and both children
    assert value(parsed, "voxq_attempts_total", model="m", outcome="success") == 30
    assert value(parsed, "voxq_circuit_open", model="m") == 0  # the latest state, not the max
