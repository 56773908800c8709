"""P3: a provider enforcing an RPM limit (429 beyond it): share of the limit sustained, share of 429s.

Target: ≥ 95% of the limit sustained, ≤ 1% of requests answered 429. Scale: `VOXQ_BENCH_P3_RPM`
(default 1200) and `VOXQ_BENCH_P3_FILES` (default 1800, i.e. 90 s at the limit). The fake's limit is a
sliding 60 s window of accepted requests; voxq's `VOXQ_MODEL_RPM_LIMIT` is set to the same number.
Jobs are prepared first (ingest alone), then one transcribe worker (`-P threads -c 8`) runs them.
Sustained rate = accepted requests / (last accepted - first request) in the fake's request log, in
requests per minute; 429 share from the same log.
"""

from __future__ import annotations

import time
from typing import Any

from bench import host_facts
from bench._harness import (
    PRIMARY,
    BenchStack,
    accounting,
    env_int,
    make_files,
    prepare_only,
    publish,
    verdict,
    wait_ready,
)

SECTION = "p3_rpm"


def _ts(entry: dict[str, Any]) -> float:
    return float(entry["ts"])  # when the fake answered


def main() -> None:
    """Measure and write the `p3_rpm` section of docs/benchmarks.md."""
    rpm = env_int("VOXQ_BENCH_P3_RPM", 1200)
    n = env_int("VOXQ_BENCH_P3_FILES", 1800)
    facts = host_facts("celery", "httpx", "redis")
    t0 = time.perf_counter()
    stack = BenchStack(fast_fake=True).start()
    try:
        stack.fake("POST", f"/_fake/models/{PRIMARY}", {"rpm_limit": rpm, "latency": 0.2})
        job_ids = stack.jobs(make_files(n))
        prepare_seconds = prepare_only(stack, job_ids)
        print(f"prepared {n} in {prepare_seconds:.1f}s", flush=True)
        with stack.worker(
            queues="transcribe.high,transcribe,transcribe.low",
            concurrency=8,
            pool="threads",
            name="transcribe",
            VOXQ_MAX_IN_FLIGHT="256",
            VOXQ_MODEL_RPM_LIMIT=str(rpm),
        ):
            wait_ready(stack, "transcribe")
            stack.wait_done(n, timeout=max(600, 3 * 60 * n / rpm))
        log = stack.fake("GET", "/_fake/requests")
        acct = accounting(stack)
        statuses = stack.status_counts()
    finally:
        stack.stop()
    requests = [e for e in log if e.get("path", "/v1/audio/transcriptions").endswith("transcriptions")]
    ok = [e for e in requests if e.get("status") == 200]
    limited = [e for e in requests if e.get("status") == 429]
    start = min(_ts(e) for e in requests)
    end = max(_ts(e) for e in ok)
    sustained = len(ok) / ((end - start) / 60)
    share = sustained / rpm
    share_429 = len(limited) / len(requests)
    publish(
        SECTION,
        [
            "## P3 provider RPM limit (`bench/p3_rpm.py`)",
            "",
            f"{n} distinct 15 s voicemails, prepared first ({prepare_seconds:.1f} s); fake provider: "
            f"{rpm} requests per sliding 60 s, 0.2 s latency; voxq `VOXQ_MODEL_RPM_LIMIT={rpm}`; one "
            "transcribe worker `-P threads -c 8`, 256 in flight.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| requests sent / accepted / answered 429 | {len(requests)} / {len(ok)} / {len(limited)} |",
            f"| sustained accepted RPM (first request → last accepted) | {sustained:.0f} |",
            f"| share of the limit (target ≥ 95%) | {share:.1%} {verdict(share >= 0.95)} |",
            f"| share answered 429 (target ≤ 1%) | {share_429:.2%} {verdict(share_429 <= 0.01)} |",
            "",
            f"- statuses: {statuses}; rows: {acct}",
            "",
        ],
        facts,
        t0,
    )


if __name__ == "__main__":
    main()
