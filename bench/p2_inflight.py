"""P2: with a 2 s provider latency, achieved files/s vs the ideal in-flight limit / latency.

Target: ≥ 90% of ideal with ≥ 256 in flight on one 2-core worker host. Scale: `VOXQ_BENCH_P2_FILES`
(default 2048 = 8 x 256) distinct 15 s voicemails, `VOXQ_BENCH_P2_IN_FLIGHT` (default 256).
The ingest stage runs first, alone, until every job is grouped, so the transcribe stage is measured on
its own: one transcribe worker (`-P threads -c 8`, `VOXQ_MAX_IN_FLIGHT`), files/s = files / (last
attempt's end - first attempt's start). End-to-end time of the stage (worker start to last job) too.

Diagnostics (not published): `VOXQ_BENCH_P2_TIMELINE=PATH` writes every attempt's start, answer and close
times (seconds from the first start) as CSV and prints requests in flight per 100 ms;
`VOXQ_BENCH_P2_PYSPY=PATH` records a raw py-spy profile of the transcribe worker (10 s from its start).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import host_facts
from bench._harness import (
    PRIMARY,
    BenchStack,
    accounting,
    attempt_window,
    env_int,
    make_files,
    prepare_only,
    publish,
    verdict,
    wait_ready,
)

SECTION = "p2_inflight"
LATENCY = 2.0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timeline(stack: BenchStack, path: str, threads: int) -> None:
    """Write attempts' start/answer/close times as CSV; print requests in flight per 100 ms."""
    from sqlalchemy import text

    from core.db import session_scope

    with session_scope() as session:
        rows = session.execute(
            text(
                "SELECT a.id::text, extract(epoch FROM a.started_at), a.latency_ms / 1000.0, "
                "extract(epoch FROM a.ended_at), j.group_id::text FROM attempts a "
                "JOIN jobs j ON j.id = a.job_id ORDER BY a.started_at"
            )
        ).all()
    # The fake's side: when each request arrived (headers read) and when its answer was built.
    fake = {r["request_id"]: (r["received"], r["ts"]) for r in stack.fake("GET", "/_fake/requests")}
    t0 = float(rows[0][1])
    spans = [(float(s) - t0, float(s) - t0 + float(lat), float(e) - t0) for _, s, lat, e, _ in rows]
    with open(path, "w") as out:
        out.write("start,answered,closed,fake_received,fake_answered,group\n")
        for (aid, *_, group), (s, a, c) in zip(rows, spans, strict=True):
            received, ts = fake.get(aid, (t0, t0))
            out.write(f"{s:.4f},{a:.4f},{c:.4f},{received - t0:.4f},{ts - t0:.4f},{group}\n")
    end = max(c for _, _, c in spans)
    steps = int(end / 0.1) + 1
    flight = [0] * steps
    for s, a, _ in spans:
        for k in range(int(s / 0.1), min(int(a / 0.1), steps - 1) + 1):
            flight[k] += 1
    print("in flight per 100 ms:", " ".join(str(f) for f in flight), flush=True)
    group_handover(t0, threads)


def group_handover(t0: float, threads: int) -> None:
    """Print where a thread's time goes between two groups: its group's last attempt closed -> group
    finished (the task's tail), and -> the first call of the group the freed thread claims next (the
    k-th group to start replaces the (k - threads)-th to finish)."""
    from sqlalchemy import text

    from core.db import session_scope

    with session_scope() as session:
        rows = session.execute(
            text(
                "SELECT extract(epoch FROM g.finished_at), min(extract(epoch FROM a.started_at)), "
                "max(extract(epoch FROM a.ended_at)) FROM groups g JOIN jobs j ON j.group_id = g.id "
                "JOIN attempts a ON a.job_id = j.id GROUP BY g.id"
            )
        ).all()
    done = [(float(f) - t0, float(e) - t0) for f, _, e in rows if f is not None]
    finished = sorted(f for f, _ in done)
    starts = sorted(float(s) - t0 for _, s, _ in rows)
    tails = sorted(f - e for f, e in done)
    heads = sorted(starts[k] - finished[k - threads] for k in range(threads, len(starts)))
    if not tails or not heads:
        return

    def show(name: str, xs: list[float]) -> str:
        return f"{name} mean {sum(xs) / len(xs):.3f} p50 {xs[len(xs) // 2]:.3f} max {xs[-1]:.3f} s"

    print(
        f"groups {len(rows)}: "
        + show("last close -> finished", tails)
        + "; "
        + show("finished -> next start", heads),
        flush=True,
    )


def _workers(processes: int) -> str:
    return "one transcribe worker" if processes == 1 else f"{processes} transcribe worker processes"


def main() -> None:
    """Measure and write the `p2_inflight` section of docs/benchmarks.md."""
    n = env_int("VOXQ_BENCH_P2_FILES", 2048)
    in_flight = env_int("VOXQ_BENCH_P2_IN_FLIGHT", 256)
    threads = env_int("VOXQ_BENCH_P2_THREADS", 8)
    pool_size = env_int("VOXQ_BENCH_P2_DB_POOL", 10)
    # Transcribe worker processes on the host, the in-flight limit split between them (one per core is
    # the other deployment shape; 1 by default).
    processes = env_int("VOXQ_BENCH_P2_PROCESSES", 1)
    facts = host_facts("celery", "httpx", "sqlalchemy", "psycopg")
    t0 = time.perf_counter()
    stack = BenchStack(fast_fake=True).start()
    try:
        stack.fake("POST", f"/_fake/models/{PRIMARY}", {"latency": LATENCY})
        job_ids = stack.jobs(make_files(n))
        prepare_seconds = prepare_only(stack, job_ids)
        print(f"prepared {n} in {prepare_seconds:.1f}s", flush=True)
        with contextlib.ExitStack() as workers:
            started = time.perf_counter()
            procs = [
                workers.enter_context(
                    stack.worker(
                        queues="transcribe.high,transcribe,transcribe.low",
                        concurrency=threads,
                        pool="threads",
                        name=f"transcribe{i}",
                        VOXQ_MAX_IN_FLIGHT=str(in_flight // processes),
                        VOXQ_DATABASE_POOL_SIZE=str(pool_size),
                    )
                )
                for i in range(processes)
            ]
            for i in range(processes):
                wait_ready(stack, f"transcribe{i}")
            ready, cpu_ready = time.perf_counter(), sum(cpu_seconds(p.pid) for p in procs)
            spy = None
            if os.environ.get("VOXQ_BENCH_P2_PYSPY"):
                spy = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "-r",
                        "200",
                        "-d",
                        "10",
                        "--nonblocking",
                        "--threads",
                        "--format",
                        "raw",
                        "-o",
                        os.environ["VOXQ_BENCH_P2_PYSPY"],
                        "-p",
                        str(procs[0].pid),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            finished = stack.wait_done(n, timeout=600)
            if spy is not None:
                spy.wait(30)
            cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_ready
            load_end = os.getloadavg()[0]
        window, mean_latency = attempt_window(stack)
        acct = accounting(stack)
        statuses = stack.status_counts()
        if os.environ.get("VOXQ_BENCH_P2_TIMELINE"):
            timeline(stack, os.environ["VOXQ_BENCH_P2_TIMELINE"], threads)
    finally:
        stack.stop()
    ideal = in_flight / LATENCY
    achieved = n / window
    share = achieved / ideal
    all_of = ", all processes" if processes > 1 else ""
    publish(
        SECTION,
        [
            "## P2 in-flight requests at 2 s latency (`bench/p2_inflight.py`)",
            "",
            f"{n} distinct 15 s voicemails, prepared first (ingest alone: {prepare_seconds:.1f} s); "
            f"then {_workers(processes)}, `-P threads -c {threads}`, "
            f"`VOXQ_MAX_IN_FLIGHT={in_flight // processes}`{' each' if processes > 1 else ''}, "
            f"`VOXQ_DATABASE_POOL_SIZE={pool_size}` (and as many I/O threads); "
            f"fake provider (`bench/_fast_fake.py`, no decoding) latency {LATENCY:.0f} s.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| ideal files/s (in flight ÷ latency) | {ideal:.1f} |",
            f"| achieved files/s (first attempt start → last attempt end) | {achieved:.1f} |",
            f"| share of ideal (target ≥ 90%) | {share:.1%} {verdict(share >= 0.9)} |",
            f"| mean attempt latency seen by the worker | {mean_latency:.2f} s |",
            f"| stage wall time incl. worker start | {finished - started:.1f} s |",
            f"| transcribe worker CPU per file (ready → last job{all_of}) | {cpu / n * 1000:.1f} ms |",
            f"| transcribe worker CPU use over that time (one core = 100%) | "
            f"{cpu / (finished - ready):.0%} |",
            f"| load average (1 min) at the end | {load_end:.2f} |",
            "",
            f"- statuses: {statuses}; rows: {acct}",
            "",
        ],
        facts,
        t0,
    )


if __name__ == "__main__":
    main()
