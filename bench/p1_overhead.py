"""P1: pipeline files/s with an instant fake provider vs raw Celery no-op tasks/s, same broker, same run.

Target: files/s ≥ 0.5 x no-op tasks/s. Scale: `VOXQ_BENCH_P1_JOBS` (default 5000) voicemail-length
(15 s, two tones between silences) distinct FLAC files, pre-uploaded to S3 with `queued` job rows.
- no-op: `bench._noop` worker, prefork -c 2, one task per file, timed from the first send until the
  last task counted itself;
- pipeline: an ingest worker (prefork -c 2: prepare) and a transcribe worker (`-P threads -c 8`), on the
  same 2 cores, timed from `enqueue_jobs` until every job is terminal (polled every 0.25 s).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench import REPO_ROOT, host_facts
from bench._harness import (
    BenchStack,
    accounting,
    env_int,
    make_files,
    publish,
    verdict,
    wait_ready,
)

SECTION = "p1_overhead"
ACCOUNTING_OK = "one attempt, one cost record, one transcript per file"
QUEUES_TRANSCRIBE = "transcribe.high,transcribe,transcribe.low"


@contextmanager
def noop_worker(stack: BenchStack, name: str) -> Iterator[tuple[subprocess.Popen[bytes], Any]]:
    """A ready prefork -c 2 no-op worker on the stack's broker (named `name`), with a Redis client whose
    no-op counter starts at 0; stopped on exit."""
    import redis

    from bench import _noop

    client = redis.Redis.from_url(stack.stack.redis_url)
    client.delete(_noop.COUNTER)
    log = open(stack.dir / f"worker-{name}-1.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench._noop", "worker", "-E", "-Q", _noop.QUEUE,
         "-c", "2", "-P", "prefork", "-n", f"{name}@%h", "--without-mingle", "--without-gossip",
         "-l", "INFO"],
        cwd=REPO_ROOT, env=stack.stack.child_env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_ready(stack, name)
        yield proc, client
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        client.close()


def send_noops(n: int) -> None:
    """Send `n` no-op tasks to the no-op queue."""
    from bench import _noop

    for i in range(n):
        _noop.app.send_task("bench.noop", kwargs={"job_id": str(i)}, queue=_noop.QUEUE)


def wait_noops(client: Any, n: int) -> None:
    """Until the no-op worker has run `n` tasks."""
    from bench import _noop

    while int(client.get(_noop.COUNTER) or 0) < n:
        time.sleep(0.05)


def noop_rate(stack: BenchStack, n: int, run: int = 1) -> float:
    """Tasks/s of a prefork -c 2 no-op worker on the stack's broker."""
    with noop_worker(stack, f"noop{run}") as (_proc, client):
        started = time.perf_counter()
        send_noops(n)
        wait_noops(client, n)
        return n / (time.perf_counter() - started)


def pipeline_rate(stack: BenchStack, n: int) -> tuple[float, dict[str, int], dict[str, int]]:
    """Files/s of the pipeline on `n` pre-uploaded jobs; plus accounting and status counts."""
    job_ids = stack.jobs(make_files(n))
    with (
        stack.worker(queues="ingest", concurrency=2, name="ingest"),
        stack.worker(queues=QUEUES_TRANSCRIBE, concurrency=8, pool="threads", name="transcribe",
                     VOXQ_MAX_IN_FLIGHT="256"),
    ):  # fmt: skip
        wait_ready(stack, "ingest")
        wait_ready(stack, "transcribe")
        started = time.perf_counter()
        stack.submit(job_ids)
        finished = stack.wait_done(n, timeout=max(600, n / 5))
    return n / (finished - started), accounting(stack), stack.status_counts()


def main() -> None:
    """Measure and write the `p1_overhead` section of docs/benchmarks.md."""
    n = env_int("VOXQ_BENCH_P1_JOBS", 5000)
    facts = host_facts("celery", "kombu", "sqlalchemy", "psycopg", "boto3", "av")
    t0 = time.perf_counter()
    stack = BenchStack(fast_fake=True).start()
    try:
        # No-op before and after the pipeline: the host's load moves (shared machine); the ratio is taken
        # against the faster of the two, the stricter comparison.
        noop_before = noop_rate(stack, n, 1)
        print(f"no-op: {noop_before:.0f} tasks/s", flush=True)
        files, acct, statuses = pipeline_rate(stack, n)
        print(f"pipeline: {files:.1f} files/s {acct} {statuses}", flush=True)
        noop_after = noop_rate(stack, n, 2)
        print(f"no-op again: {noop_after:.0f} tasks/s", flush=True)
        noop = max(noop_before, noop_after)
    finally:
        stack.stop()
    ratio = files / noop
    ok_acct = acct["succeeded"] == n == acct["attempts"] == acct["cost_records"] == acct["transcripts"]
    publish(
        SECTION,
        [
            "## P1 pipeline overhead vs raw Celery (`bench/p1_overhead.py`)",
            "",
            f"{n} distinct 15 s voicemail FLACs, pre-uploaded; fake provider with no latency in its own "
            "process (`bench/_fast_fake.py`: duration from the FLAC header, no decoding).",
            "",
            "| measure | value |",
            "|---|---|",
            f"| raw Celery no-op tasks/s (prefork -c 2, acks late, same broker), before / after the "
            f"pipeline | {noop_before:.0f} / {noop_after:.0f} |",
            f"| pipeline files/s (ingest prefork -c 2 + transcribe threads -c 8) | {files:.1f} |",
            f"| ratio to the faster no-op run (target ≥ 0.50) | {ratio:.3f} {verdict(ratio >= 0.5)} |",
            "",
            f"- job statuses after the run: {statuses}; rows: {acct} "
            f"({ACCOUNTING_OK if ok_acct else 'ACCOUNTING MISMATCH'})",
            "",
        ],
        facts,
        t0,
    )


if __name__ == "__main__":
    main()
