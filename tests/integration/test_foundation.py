"""Foundation: migrations, storage and Celery on real Postgres, SeaweedFS and Redis/Valkey."""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import subprocess
import sys
import uuid

import httpx
import pytest
from botocore.exceptions import ClientError
from sqlalchemy import create_engine, inspect, select, text

from core.models import Base, WorkerHeartbeat
from tests.support import Stack, celery_worker, follow_settings, wait_until
from voxq.embedded import create_database, drop_database


def test_migration_upgrade_downgrade_upgrade(postgres_admin_url: str) -> None:
    from core.db import downgrade, upgrade

    name = f"voxq_mig_{uuid.uuid4().hex[:8]}"
    url = create_database(postgres_admin_url, name)
    engine = create_engine(url)
    try:
        upgrade(url)
        tables = set(inspect(engine).get_table_names())
        assert {t.name for t in Base.metadata.sorted_tables} <= tables
        downgrade(url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(url)
        assert {t.name for t in Base.metadata.sorted_tables} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
        drop_database(postgres_admin_url, name)


def test_migrations_match_models(database_url: str) -> None:
    """Autogenerate against the migrated database finds nothing: models and migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


class _Pattern(io.RawIOBase):
    """A readable stream of `size` pseudo-random bytes that never exists whole in memory."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pos = 0
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self.size - self.pos)
        if n <= 0:
            return 0
        block = hashlib.sha256(str(self.pos // 4096).encode()).digest() * (n // 32 + 1)
        buf[:n] = block[:n]
        self.sha.update(block[:n])
        self.pos += n
        return n


def _status_mb(field: str) -> float:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> float:
    """Trim freed heap, reset the peak-RSS mark (Linux `clear_refs` 5); return the RSS now."""
    ctypes.CDLL(None).malloc_trim(0)
    with open(f"/proc/{os.getpid()}/clear_refs", "w") as fh:
        fh.write("5")
    return _status_mb("VmRSS")


def test_storage_round_trip_60mb_bounded_memory(stack: Stack) -> None:
    from core.settings import Settings
    from core.storage import Storage, content_key

    part = 5 * 1024 * 1024  # S3's smallest part: the bound below is a few parts, whatever the size
    storage = Storage(Settings(s3_multipart_chunk_bytes=part, s3_multipart_threshold_bytes=part))
    size = 60 * 1024 * 1024
    source = _Pattern(size)
    # Warm up: boto3's transfer machinery and its part buffers are allocated once, whatever the size.
    storage.upload_stream(io.BufferedReader(_Pattern(20 * 1024 * 1024), 1024 * 1024), "tenant-x/warmup")
    before = _reset_peak_rss()
    stored = storage.upload_stream(io.BufferedReader(source, 1024 * 1024), f"tenant-x/{uuid.uuid4().hex}")
    assert stored.bytes == size
    assert stored.sha256 == source.sha.hexdigest()
    key = content_key("tenant-x", stored.sha256)
    storage.copy(stored.key, key)
    assert storage.head(key)["ContentLength"] == size  # type: ignore[index]

    sha = hashlib.sha256()
    total = 0
    for chunk in storage.iter_chunks(key):
        sha.update(chunk)
        total += len(chunk)
    growth = _status_mb("VmHWM") - before  # the peak while moving it, not what is left afterwards
    assert total == size and sha.hexdigest() == stored.sha256
    assert growth < 40, f"RSS grew {growth:.0f} MB moving a 60 MB object (should not scale with size)"
    assert storage.delete_prefix("tenant-x/") >= 3
    assert storage.head(key) is None


def test_upload_limit_is_enforced(stack: Stack) -> None:
    from core.errors import StorageError
    from core.storage import Storage

    with pytest.raises(StorageError):
        Storage().upload_stream(io.BytesIO(b"x" * 5000), "tenant-y/too-big", limit=1000)


def test_presigned_put_then_get(stack: Stack) -> None:
    from core.storage import Storage

    storage = Storage()
    key = f"tenant-p/{uuid.uuid4().hex}"
    put_url = storage.presign_put(key, expires=60)
    assert httpx.put(put_url, content=b"hello presigned").status_code == 200
    got = httpx.get(storage.presign_get(key, expires=60))
    assert got.status_code == 200 and got.content == b"hello presigned"
    # Tampering with the signed URL is refused.
    bad = httpx.get(storage.presign_get(key, expires=60).replace("X-Amz-Signature=", "X-Amz-Signature=0"))
    assert bad.status_code == 403


def test_bad_signature_is_refused(stack: Stack) -> None:
    from core.settings import Settings
    from core.storage import Storage

    good = Storage()
    good.upload_bytes(b"secret audio", "tenant-s/obj")
    wrong = Storage(Settings(s3_secret_access_key="not-the-secret"))  # type: ignore[arg-type]
    with pytest.raises(ClientError) as info:
        wrong.client.get_object(Bucket=good.bucket, Key="tenant-s/obj")
    assert info.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied", "403"}


def test_bucket_created_on_start(stack: Stack) -> None:
    from core.settings import Settings
    from core.storage import Storage

    bucket = f"voxq-new-{uuid.uuid4().hex[:8]}"
    storage = Storage(Settings(), bucket=bucket)

    def buckets() -> set[str]:
        return {b["Name"] for b in storage.client.list_buckets()["Buckets"]}

    assert bucket not in buckets()
    with pytest.raises(ClientError):
        storage.ping()  # the readiness check fails while the bucket is missing
    storage.ensure_bucket()
    assert bucket in buckets()
    storage.ping()
    storage.upload_bytes(b"kept", "k")
    storage.ensure_bucket()  # idempotent: the existing bucket is kept with what it holds
    assert storage.client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"kept"


def test_celery_task_runs_in_real_worker_and_writes_postgres(stack: Stack) -> None:
    marker = f"probe-{uuid.uuid4().hex[:8]}"
    with celery_worker(stack, queues="maintenance", concurrency=1):
        # Enqueue from another process, as the API would.
        code = (
            "from core import names; from worker.app import app; "
            f"app.send_task(names.TASK_HEARTBEAT, kwargs={{'worker': '{marker}'}})"
        )
        subprocess.run([sys.executable, "-c", code], env=stack.child_env(), check=True, timeout=60)

        engine = create_engine(stack.database_url)
        try:

            def seen() -> bool:
                with engine.connect() as conn:
                    return (
                        conn.execute(
                            select(WorkerHeartbeat.pid).where(WorkerHeartbeat.worker == marker)
                        ).first()
                        is not None
                    )

            wait_until(seen, timeout=60, what="heartbeat row written by the worker")
            with engine.connect() as conn:
                pid = conn.execute(
                    text("SELECT pid FROM worker_heartbeats WHERE worker = :w"), {"w": marker}
                ).scalar()
            assert pid != os.getpid()
        finally:
            engine.dispose()


def test_tasks_sent_in_process_reach_this_stacks_broker(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's Celery app built under another environment (a unit test imports it with defaults)
    is pointed at this stack's broker again, so in-process worker code (the sweeper) sends here."""
    import redis

    import api.enqueue
    import worker.app
    from core import names
    from core.settings import reset_settings_cache
    from worker.dispatch import send_prepare

    with monkeypatch.context() as elsewhere:
        elsewhere.setenv("VOXQ_REDIS_URL", "redis://127.0.0.1:9/0")
        reset_settings_cache()
        follow_settings(worker.app.app)
        assert worker.app.app.conf.broker_url == "redis://127.0.0.1:9/0"
        assert api.enqueue.producer().conf.broker_url == "redis://127.0.0.1:9/0"  # the API's, cached
    stack.reset_process_state()
    send_prepare([uuid.uuid4()], priority="normal")
    api.enqueue.enqueue_jobs([uuid.uuid4()], priority="normal")
    client = redis.Redis.from_url(stack.redis_url)
    try:
        assert client.llen(names.QUEUE_INGEST) == 2
    finally:
        client.close()
