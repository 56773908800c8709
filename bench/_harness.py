"""Shared machinery of the pipeline benchmarks: an embedded stack, the fake provider, real workers.

`BenchStack` starts embedded Postgres, Valkey and SeaweedFS under a temp dir (the test suite's servers),
the fake OpenAI server in its own process (so its CPU is not charged to the benchmark's GIL), and real
`celery worker` processes. Jobs are written straight to Postgres and S3 as the API leaves them
(`queued`, audio under its content key), so a benchmark times the pipeline, not the upload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from bench import REPO_ROOT, write_section

FAKE_KEY = "sk-voxq-bench-fake-key-0123456789"
PRIMARY = "gpt-4o-mini-transcribe"
RATE = 16_000


def env_int(name: str, default: int) -> int:
    """An integer scale knob from the environment."""
    return int(os.environ.get(name, str(default)))


def voicemail_flac(index: int, seconds: float = 15.0) -> bytes:
    """A distinct voicemail-length FLAC: two tones between silences (distinct PCM, so no dedupe)."""
    from worker.audio import encode_flac

    samples = np.zeros(int(seconds * RATE), dtype=np.float32)
    f1 = 200 + 10 * (index % 150)
    f2 = 300 + 10 * ((index // 150) % 150)
    t = np.arange(int(1.5 * RATE)) / RATE
    lead = 1.0 + 0.001 * (index // 22_500)
    start = int(lead * RATE)
    samples[start : start + len(t)] = 0.4 * np.sin(2 * np.pi * f1 * t)
    start2 = start + len(t) + int(0.8 * RATE)
    samples[start2 : start2 + len(t)] = 0.4 * np.sin(2 * np.pi * f2 * t)
    pcm = (samples * 32767).astype(np.int16)
    return encode_flac(pcm)


class BenchStack:
    """Embedded servers + fake provider + helpers to create jobs, run workers and read results."""

    def __init__(self, *, fast_fake: bool = False) -> None:
        self.fast_fake = fast_fake  # bench._fast_fake: duration from the header, no decoding
        self._tmp = tempfile.TemporaryDirectory(prefix="voxq-bench-")
        self.dir = Path(self._tmp.name)
        self._servers: list[Any] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self.fake_url = ""
        self.stack: Any = None

    def start(self) -> BenchStack:
        """Start the servers, migrate, point this process's settings at them."""
        sys.path.insert(0, str(REPO_ROOT))
        from core.db import upgrade
        from tests.support import Stack
        from voxq.embedded import (
            EmbeddedPostgres,
            SeaweedS3,
            ValkeyRedis,
            create_database,
            free_port,
            wait_for_port,
        )

        pg = EmbeddedPostgres(self.dir / "postgres")
        pg.start()
        self._servers.append(pg)
        redis = ValkeyRedis(self.dir / "valkey")
        redis.start()
        self._servers.append(redis)
        s3 = SeaweedS3(self.dir / "seaweedfs", "bench-access", "bench-secret-key")
        s3.start()
        self._servers.append(s3)
        db_url = create_database(pg.url, "voxq_bench")
        upgrade(db_url)
        self.stack = Stack(
            database_url=db_url,
            redis_url=redis.url,
            s3_endpoint_url=s3.endpoint_url,
            s3_access_key_id="bench-access",
            s3_secret_access_key="bench-secret-key",
            s3_bucket="voxq-bench",
            work_dir=self.dir,
        )
        port = free_port()
        fake = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench._fast_fake" if self.fast_fake else "tests.fakes.openai_server",
                "--port",
                str(port),
                "--api-key",
                FAKE_KEY,
            ],
            cwd=REPO_ROOT,
            stdout=open(self.dir / "fake.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._procs.append(fake)
        wait_for_port(port, timeout=30)
        self.fake_root = f"http://127.0.0.1:{port}"
        self.fake_url = f"{self.fake_root}/v1"
        os.environ.update(self.stack.env())
        os.environ["OPENAI_BASE_URL"] = self.fake_url
        os.environ["OPENAI_API_KEY"] = FAKE_KEY
        self.stack.reset_process_state()
        self.stack.ensure_bucket()
        return self

    def stop(self) -> None:
        """Stop everything this stack started."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for server in reversed(self._servers):
            with suppress(Exception):  # best effort at teardown
                server.stop()
        self._tmp.cleanup()

    # -- fake provider ---------------------------------------------------------------------------

    def fake(self, method: str, path: str, body: Any = None) -> Any:
        """Call the fake's admin API."""
        import httpx

        response = httpx.request(method, f"{self.fake_root}{path}", json=body, timeout=60)
        response.raise_for_status()
        return response.json() if response.content else None

    # -- data ------------------------------------------------------------------------------------

    def tenant_and_batch(self) -> tuple[uuid.UUID, uuid.UUID]:
        """A tenant and a batch in `processing`."""
        from sqlalchemy.orm import Session

        from core.db import get_engine
        from core.models import Batch, Tenant
        from core.statuses import BatchStatus

        with Session(get_engine()) as s, s.begin():
            t = Tenant(name=f"bench-{uuid.uuid4().hex[:8]}")
            s.add(t)
            s.flush()
            b = Batch(tenant_id=t.id, status=BatchStatus.PROCESSING.value)
            s.add(b)
            s.flush()
            return t.id, b.id

    def jobs(self, files: list[bytes], filename: str = "vm.flac") -> list[uuid.UUID]:
        """Upload each file under its content key (threads) and insert `queued` jobs in bulk."""
        import hashlib

        from sqlalchemy import insert

        from core.db import session_scope
        from core.ids import uuid7
        from core.models import Job
        from core.statuses import JobStatus
        from core.storage import Storage, content_key

        tenant, batch = self.tenant_and_batch()
        storage = Storage()
        rows = []
        for data in files:
            sha = hashlib.sha256(data).hexdigest()
            rows.append(
                {
                    "id": uuid7(),
                    "tenant_id": tenant,
                    "batch_id": batch,
                    "object_key": content_key(str(tenant), sha),
                    "filename": filename,
                    "bytes": len(data),
                    "sha256": sha,
                    "status": JobStatus.QUEUED.value,
                    "priority": "normal",
                }
            )
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda p: storage.upload_bytes(p[0], p[1]["object_key"]), zip(files, rows, strict=True)
                )
            )
        with session_scope() as session:
            for start in range(0, len(rows), 1000):
                session.execute(insert(Job), rows[start : start + 1000])
        return [r["id"] for r in rows]

    def submit(self, job_ids: list[uuid.UUID]) -> None:
        """Send prepare tasks the way the API does."""
        from api.enqueue import enqueue_jobs, producer

        producer.cache_clear()  # built for this run's broker
        enqueue_jobs(job_ids, priority="normal")

    def count(self, sql: str, **params: Any) -> Any:
        """One scalar from Postgres."""
        from sqlalchemy import text

        from core.db import session_scope

        with session_scope() as session:
            return session.execute(text(sql), params).scalar()

    def wait_done(self, n: int, timeout: float, interval: float = 0.25) -> float:
        """Wait until `n` jobs are terminal; return the time.perf_counter() when seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.count(
                "SELECT count(*) FROM jobs WHERE status IN ('succeeded','failed','skipped','cancelled')"
            )
            if done >= n:
                return time.perf_counter()
            time.sleep(interval)
        raise TimeoutError(f"only {done} of {n} jobs terminal after {timeout}s")

    def status_counts(self) -> dict[str, int]:
        """Jobs per status."""
        from sqlalchemy import text

        from core.db import session_scope

        with session_scope() as session:
            return dict(session.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all())  # type: ignore[arg-type]

    def truncate(self) -> None:
        """Empty the tables and the broker between runs."""
        self.stack.truncate_database()
        self.stack.flush_redis()

    # -- workers ---------------------------------------------------------------------------------

    @contextmanager
    def worker(
        self, *, queues: str, concurrency: int, pool: str = "prefork", name: str = "w", **env: str
    ) -> Iterator[subprocess.Popen[bytes]]:
        """A real `celery worker` process with the stack's settings (hosted chain on the fake)."""
        from tests.support import celery_worker

        worker_env = {
            "OPENAI_BASE_URL": self.fake_url,
            "OPENAI_API_KEY": FAKE_KEY,
            "VOXQ_PRIMARY_MODEL": PRIMARY,
            "VOXQ_FALLBACK_MODELS": "",
            **env,
        }
        with celery_worker(
            self.stack, queues=queues, concurrency=concurrency, pool=pool, name=name, env=worker_env
        ) as proc:
            yield proc


def render_facts(facts: dict[str, str]) -> list[str]:
    """Host facts as markdown list lines."""
    return [f"- {key}: {value}" for key, value in facts.items()]


def publish(section: str, lines: list[str], facts: dict[str, str], started: float) -> None:
    """Append host facts and wall time to a benchmark's lines, write its section, and print it."""
    body = "\n".join(
        [
            *lines,
            "Host and versions:",
            "",
            *render_facts(facts),
            f"- benchmark wall time: {time.perf_counter() - started:.0f} s",
        ]
    )
    write_section(section, body)
    print(body)


def verdict(ok: bool) -> str:
    """PASS or MISS, bold."""
    return "**PASS**" if ok else "**MISS**"


def dumps(value: Any) -> str:
    """Compact JSON for notes."""
    return json.dumps(value, sort_keys=True)


def wait_ready(stack: BenchStack, name: str, timeout: float = 60.0) -> None:
    """Wait until the named worker's log says it is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = sorted(stack.dir.glob(f"worker-{name}-*.log"), key=lambda p: p.stat().st_mtime)
        if logs and b" ready." in logs[-1].read_bytes():
            return
        time.sleep(0.2)
    raise TimeoutError(f"worker {name} not ready after {timeout}s")


def make_files(n: int, seconds: float = 15.0) -> list[bytes]:
    """`n` distinct voicemail FLACs (encoded on 2 threads; PyAV releases the GIL)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda i: voicemail_flac(i, seconds), range(n)))


def accounting(stack: BenchStack) -> dict[str, int]:
    """Rows the run wrote: attempts, cost records, transcripts, succeeded jobs."""
    return {
        "succeeded": stack.count("SELECT count(*) FROM jobs WHERE status = 'succeeded'"),
        "attempts": stack.count("SELECT count(*) FROM attempts"),
        "cost_records": stack.count("SELECT count(*) FROM cost_records"),
        "transcripts": stack.count("SELECT count(*) FROM transcripts"),
    }


def prepare_only(stack: BenchStack, job_ids: list[Any], timeout: float = 900.0) -> float:
    """Run only the ingest stage until every job is grouped (transcribe tasks wait in the broker).

    Returns the prepare stage's seconds. Leaders end `processing` with a group; nothing else runs.
    """
    n = len(job_ids)
    with stack.worker(queues="ingest", concurrency=2, name="ingest"):
        wait_ready(stack, "ingest")
        started = time.perf_counter()
        stack.submit(job_ids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            grouped = stack.count(
                "SELECT count(*) FROM jobs j JOIN groups g ON g.id = j.group_id WHERE j.status = 'processing'"
            )
            if grouped >= n:
                return time.perf_counter() - started
            time.sleep(0.25)
    raise TimeoutError(f"prepare did not group {n} jobs in {timeout}s")


def attempt_window(stack: BenchStack) -> tuple[float, float]:
    """Seconds from the first attempt's start to the last attempt's end; mean attempt latency (s)."""
    window = stack.count("SELECT extract(epoch FROM max(ended_at) - min(started_at)) FROM attempts")
    mean = stack.count("SELECT avg(latency_ms) / 1000 FROM attempts")
    return float(window), float(mean or 0)


def api_key(tenant_name: str = "bench") -> str:
    """A fresh API key for a tenant (created if needed)."""
    from core.auth import create_key
    from core.db import session_scope

    with session_scope() as session:
        return create_key(session, tenant_name).plaintext


@contextmanager
def api_server(stack: BenchStack, workers: int = 1) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`uvicorn api.main:app` on a free loopback port with the stack's settings: (base URL, process).

    With `workers` > 1 uvicorn forks that many server processes behind one socket (the process
    returned is their supervisor), as a production API on a multi-core host runs.
    """
    from voxq.embedded import free_port, wait_for_port

    port = free_port()
    log = open(stack.dir / f"api-{port}.log", "wb")  # noqa: SIM115
    extra = ["--workers", str(workers)] if workers > 1 else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--no-access-log", *extra],
        cwd=REPO_ROOT, env=stack.stack.child_env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port(port, timeout=60)
        import httpx

        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """A process's resident set (or VmHWM, its peak) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    """Direct child pids of a process."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
