"""Helpers shared by the test tiers: the stack description, real worker processes, polling."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

T = TypeVar("T")

if TYPE_CHECKING:
    from celery import Celery

    from core.providers.base import TranscriptionRequest

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stack:
    """URLs and credentials of the real servers one test session uses."""

    database_url: str
    redis_url: str
    s3_endpoint_url: str
    s3_access_key_id: str
    s3_secret_access_key: str
    s3_bucket: str
    work_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """VOXQ_* variables pointing voxq (this process or a child) at these servers."""
        return {
            "VOXQ_ENVIRONMENT": "test",
            "VOXQ_DATABASE_URL": self.database_url,
            "VOXQ_REDIS_URL": self.redis_url,
            "VOXQ_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "VOXQ_S3_ACCESS_KEY_ID": self.s3_access_key_id,
            "VOXQ_S3_SECRET_ACCESS_KEY": self.s3_secret_access_key,
            "VOXQ_S3_BUCKET": self.s3_bucket,
            "VOXQ_DATA_DIR": str(self.work_dir / "data"),
            "VOXQ_LOCAL_MODEL_CACHE_DIR": str(REPO_ROOT / ".voxq" / "models"),
            **self.extra_env,
        }

    def child_env(self, **overrides: str) -> dict[str, str]:
        """The environment for a child process: ours, plus the stack's, plus overrides."""
        env = {**os.environ, **self.env(), **overrides}
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def reset_process_state(self) -> None:
        """Forget cached settings, engines and clients so they are rebuilt from the environment.

        That includes what in-process code built from earlier settings: the API's Celery producer and,
        once imported (a unit test may have imported them under default settings), the worker's Celery
        app and the worker runtime (clients and a settings snapshot, built by the first stage run here).
        """
        from api.enqueue import producer
        from core.db import dispose_engine
        from core.settings import reset_settings_cache

        reset_settings_cache()
        dispose_engine()
        producer.cache_clear()
        worker_app = sys.modules.get("worker.app")
        if worker_app is not None:
            follow_settings(worker_app.app)
        worker_runtime = sys.modules.get("worker.runtime")
        if worker_runtime is not None:
            worker_runtime.close_runtime()

    def truncate_database(self) -> None:
        """Empty every voxq table (fast, keeps the schema)."""
        from sqlalchemy import create_engine, text

        from core.models import Base

        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        engine = create_engine(self.database_url)
        try:
            with engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {tables} CASCADE"))
        finally:
            engine.dispose()

    def flush_redis(self) -> None:
        """Empty the Redis database."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            client.flushdb()
        finally:
            client.close()

    def ensure_bucket(self) -> None:
        """Create the session's bucket if missing."""
        from core.storage import Storage

        Storage().ensure_bucket()


def follow_settings(app: Celery) -> None:
    """Point a Celery app at the current settings' broker if it was built for another one.

    A worker never needs this (its settings are read once, before `worker.app`). A test process does: it
    imports `worker.app` under one environment (a unit test with defaults) and later runs worker code in
    process (the sweeper's requeue, a handoff) against servers it started since; without this, those
    tasks would go to the broker of the first environment. `close()` drops the app's connection pool
    and a fresh `amqp` its producer pool; both are built again for the new URL on the next send.
    """
    from core.settings import get_settings

    url = get_settings().redis_url
    if app.conf.broker_url != url:
        app.conf.update(broker_url=url)
        app.close()
        del app.amqp


def wait_until(check: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> T:
    """Poll `check` until it returns something truthy; return it, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check!r} (last={last!r})")


def child_pids(pid: int) -> list[int]:
    """The live direct children of a process (from /proc), e.g. a Celery worker's pool processes."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def stop_process(proc: subprocess.Popen[bytes], *, grace: float, kill_group: bool = False) -> None:
    """Stop a child process: SIGTERM, then SIGKILL after `grace` seconds (to its whole process group with
    `kill_group`; it was started with `start_new_session`). Nothing to do if it already ended."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        if kill_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait(10)


@contextmanager
def celery_worker(
    stack: Stack,
    *,
    queues: str = "ingest.high,transcribe.high,ingest,transcribe,transcribe.low,local,maintenance,webhooks",
    concurrency: int = 2,
    pool: str = "prefork",
    name: str = "w1",
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A real `celery worker` process on the stack's broker, stopped (warm shutdown) afterwards."""
    log_path = log_path or stack.work_dir / f"worker-{name}-{time.time_ns()}.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "worker",
            "-E",
            "-Q",
            queues,
            "-c",
            str(concurrency),
            "-P",
            pool,
            "-n",
            f"{name}@%h",
            "--without-mingle",
            "--without-gossip",
            "-l",
            "INFO",
        ],
        cwd=REPO_ROOT,
        env=stack.child_env(**(env or {})),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        stop_process(proc, grace=30)
        # Pool children outlive a SIGKILLed parent; none may run into the next test's tasks.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def run_voxq(
    args: Sequence[str], env: dict[str, str], *, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The `voxq` CLI run as a user runs it (`python -m voxq.cli` from the repository), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "voxq.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def voxq_dev_process(
    data_dir: Path, env: dict[str, str], output: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """`voxq dev` on free API and Flower ports, printing to `output`: yields (process, API port, Flower
    port), and stops it at the end (SIGTERM; its process group is killed if it does not stop in 60 s)."""
    from voxq.embedded import free_port

    api_port, flower_port = free_port(), free_port()
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "voxq.cli",
                "dev",
                "--data-dir",
                str(data_dir),
                "--api-port",
                str(api_port),
                "--flower-port",
                str(flower_port),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, api_port, flower_port
    finally:
        stop_process(proc, grace=60, kill_group=True)


def transcription_request(
    audio: bytes, *, model: str = "gpt-4o-mini-transcribe", request_id: str | None = None, **kw: Any
) -> TranscriptionRequest:
    """A provider request for `audio` as a FLAC file `clip.flac` of 1 s unless `kw` says otherwise."""
    from core.providers.base import TranscriptionRequest

    return TranscriptionRequest(
        audio=audio,
        filename=kw.pop("filename", "clip.flac"),
        content_type="audio/flac",
        model=model,
        audio_seconds=kw.pop("audio_seconds", 1.0),
        request_id=request_id,
        **kw,
    )
