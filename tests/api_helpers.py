"""Helpers for the API tests: a real uvicorn server process, API keys, generated audio."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.audio_fixtures import tone, wav_bytes
from tests.support import REPO_ROOT, Stack, stop_process
from voxq.embedded import free_port, wait_for_port


@dataclass
class ApiServer:
    """A uvicorn process serving `api.main:app` on the session's stack."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def rss_bytes(self) -> int:
        """Resident memory of the server process (from /proc)."""
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        """An httpx client for the server, authenticated with `key`."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


# The bearer token test API servers want on /metrics (VOXQ_METRICS_TOKEN).
METRICS_TOKEN = "test-metrics-token-4c1d"


def scrape(url: str, token: str = METRICS_TOKEN, timeout: float = 10.0) -> str:
    """The text of `url` (an API's /metrics), fetched with the metrics bearer token."""
    response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    response.raise_for_status()
    return response.text


def import_bucket(stack: Stack) -> str:
    """The bucket import tests put their objects in (tenants need a grant: `grant_import`)."""
    return stack.s3_bucket + "-import"


def grant_import(tenant: str, bucket: str, prefix: str = "") -> None:
    """Let `tenant` import objects of `bucket` under `prefix` (as `voxq imports grant` does)."""
    from core import import_grants
    from core.db import session_scope

    with session_scope() as session:
        import_grants.grant(session, tenant, bucket, prefix)


def start_api_server(stack: Stack, **env: str) -> ApiServer:
    """Start uvicorn in a subprocess on a free port and wait until it answers."""
    port = free_port()
    log_path = stack.work_dir / f"api-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ],
        cwd=REPO_ROOT,
        env=stack.child_env(**{"VOXQ_METRICS_TOKEN": METRICS_TOKEN, **env}),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    try:
        wait_for_port(port, 60, proc=proc)
    except BaseException:
        proc.kill()
        raise
    return ApiServer(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)


def stop_api_server(server: ApiServer) -> None:
    """Stop the server process."""
    stop_process(server.proc, grace=15)


@pytest.fixture(scope="session", name="api_server")
def api_server_fixture(session_stack: Stack) -> Iterator[ApiServer]:
    """One API server process for the test session (tests still get a clean stack via `stack`)."""
    server = start_api_server(session_stack)
    try:
        yield server
    finally:
        stop_api_server(server)


@pytest.fixture(name="api")
def api_fixture(api_server: ApiServer, stack: Stack) -> ApiServer:
    """The session's API server, with databases emptied for this test."""
    return api_server


def make_key(tenant: str) -> str:
    """Create an API key for `tenant` directly in the database (as `voxq keys create` does)."""
    from core import auth
    from core.db import session_scope

    with session_scope() as session:
        return auth.create_key(session, tenant).plaintext


def finish_job(
    job_id: str,
    *,
    text: str = "hello there",
    segments: list[dict[str, Any]] | None = None,
    model: str = "whisper-1",
    usd: Decimal = Decimal("0.0002"),
    billed_seconds: float = 2.0,
    succeed: bool = True,
    estimated: bool = False,
) -> None:
    """Write what a worker writes when a job succeeds (answering attempt, cost record, transcript), and
    unless `succeed` is false the job's move to `succeeded`: for API tests that need a finished job."""
    import uuid

    from core.db import session_scope
    from core.models import Attempt, CostRecord, Job, Transcript

    with session_scope() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        attempt = Attempt(
            tenant_id=job.tenant_id, job_id=job.id, model=model, provider="openai", outcome="success"
        )
        session.add(attempt)
        session.flush()
        session.add(
            CostRecord(
                tenant_id=job.tenant_id,
                batch_id=job.batch_id,
                job_id=job.id,
                attempt_id=attempt.id,
                model=model,
                usage_type="duration",
                billed_audio_seconds=billed_seconds,
                price_table_version="test",
                usd=usd,
                estimated=estimated,
            )
        )
        session.add(
            Transcript(
                tenant_id=job.tenant_id,
                job_id=job.id,
                attempt_id=attempt.id,
                text=text,
                segments=segments,
                model=model,
            )
        )
        if succeed:
            job.status = "succeeded"
            job.model = model
            job.cost_usd = usd


def tenant_objects(tenant_name: str) -> list[str]:
    """Every object and unfinished multipart upload under the tenant's prefix in the bucket."""
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import Tenant
    from core.storage import Storage

    with session_scope() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant_name))
    storage = Storage()
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"{tenant_id}/")
    uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket, Prefix=f"{tenant_id}/")
    return [o["Key"] for o in listed.get("Contents", [])] + [u["Key"] for u in uploads.get("Uploads", [])]


def sine_wav(seconds: float = 1.0, rate: int = 16000, freq: float = 440.0) -> bytes:
    """A mono 16-bit PCM WAV of a sine tone."""
    return wav_bytes(tone(freq, seconds, rate=rate, amplitude=8000 / 32767), rate=rate)


def wav_header(data_bytes: int, rate: int = 16000, channels: int = 1) -> bytes:
    """A 44-byte WAV header announcing `data_bytes` of 16-bit PCM."""
    import struct

    byte_rate = rate * channels * 2
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, byte_rate, channels * 2, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def wait_ready(server: ApiServer, timeout: float = 30.0) -> None:
    """Wait until /readyz answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("API not ready")


def redis_queue_length(stack: Stack, queue: str) -> int:
    """How many messages wait in a Celery queue (a Redis list named after the queue)."""
    import redis

    client = redis.Redis.from_url(stack.redis_url)
    try:
        return int(client.llen(queue))  # type: ignore[arg-type]
    finally:
        client.close()
