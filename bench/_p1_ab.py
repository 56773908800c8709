"""P1 A/B: the P1 pipeline run from two (or more) source trees on one stack, alternating, with CPU per file.

Not part of `make bench` (a private helper for comparing a change side by side on a shared host):

    flock /tmp/voxq-bench.lock .venv/bin/python -m bench._p1_ab /path/to/base/tree /path/to/new/tree

Each tree's workers run with that tree as their working directory and first `PYTHONPATH` entry (the
interpreter and its packages are this one's). Per round and tree: the same `VOXQ_BENCH_P1_JOBS` (default
2000) distinct voicemails under a fresh tenant, an ingest worker (prefork -c 2) and a transcribe worker
(threads -c 8) as in bench/p1_overhead.py; files/s from enqueue to the last terminal job, and CPU ms per
file from /proc for the ingest worker (and, of that, its prefork main process), the transcribe worker,
the stack's servers (Postgres, SeaweedFS, Valkey) and the fake provider. A no-op Celery rate
(bench/p1_overhead.py's) before and after gives the ratio.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench._harness import FAKE_KEY, PRIMARY, BenchStack, env_int, make_files, wait_ready
from bench.p1_overhead import QUEUES_TRANSCRIBE, noop_rate, noop_worker, send_noops, wait_noops
from bench.p4_upload import _cpu_seconds, server_pids


@contextmanager
def tree_worker(
    stack: BenchStack, tree: str, *, queues: str, concurrency: int, pool: str, name: str, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A `celery worker` importing voxq from `tree`."""
    from tests.support import stop_process

    child_env = stack.stack.child_env(
        OPENAI_BASE_URL=stack.fake_url,
        OPENAI_API_KEY=FAKE_KEY,
        VOXQ_PRIMARY_MODEL=PRIMARY,
        VOXQ_FALLBACK_MODELS="",
        **env,
    )
    child_env["PYTHONPATH"] = tree + os.pathsep + child_env.get("PYTHONPATH", "")
    log = open(stack.dir / f"worker-{name}-{time.time_ns()}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-E", "-Q", queues,
         "-c", str(concurrency), "-P", pool, "-n", f"{name}@%h", "--without-mingle", "--without-gossip",
         "-l", "INFO"],
        cwd=tree, env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        stop_process(proc, grace=30)
        log.close()


def _profile(stack: BenchStack, tag: str, roots: dict[str, int]) -> list[subprocess.Popen[bytes]]:
    """With `VOXQ_AB_PYSPY=DIR`: py-spy (raw format, 100 Hz, non-blocking) on each worker process for
    `VOXQ_AB_PYSPY_SECONDS` (default 8) after a 2 s warm-up; the profiles land in DIR."""
    out = os.environ.get("VOXQ_AB_PYSPY")
    perf = os.environ.get("VOXQ_AB_PERF")
    if not out and not perf:
        return []
    from bench._harness import children

    time.sleep(2)
    seconds = os.environ.get("VOXQ_AB_PYSPY_SECONDS", "8")
    spies = []
    if perf:  # `perf record` of each worker's processes (C and kernel too): VOXQ_AB_PERF=DIR
        for name, root in roots.items():
            pids = ",".join(str(p) for p in [root, *children(root)])
            spies.append(
                subprocess.Popen(
                    ["perf", "record", "-F", "499", "-g", "-o", f"{perf}/{tag}-{name}.data", "-p", pids,
                     "--", "sleep", seconds],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        return spies
    for name, root in roots.items():
        for pid in children(root) or [root]:
            spies.append(
                subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "-r", "100", "-d", seconds,
                     "--nonblocking", "-f", "raw", "-p", str(pid), "-o", f"{out}/{tag}-{name}-{pid}.txt",
                     *(["--gil"] if os.environ.get("VOXQ_AB_PYSPY_GIL") else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
    return spies


def run_tree(stack: BenchStack, tree: str, files: list[bytes], tag: str) -> dict[str, float]:
    """One pipeline run of `files` from `tree`: files/s and CPU ms per file by process group."""
    n = len(files)
    stack.truncate()
    job_ids = stack.jobs(files)
    fake_pid = stack._procs[0].pid
    servers = server_pids(stack)
    with (
        tree_worker(stack, tree, queues="ingest", concurrency=2, pool="prefork", name=f"ingest{tag}") as ing,
        tree_worker(stack, tree, queues=QUEUES_TRANSCRIBE, concurrency=8, pool="threads",
                    name=f"transcribe{tag}", VOXQ_MAX_IN_FLIGHT="256") as tr,
    ):  # fmt: skip
        wait_ready(stack, f"ingest{tag}")
        wait_ready(stack, f"transcribe{tag}")
        groups = {"ingest": [ing.pid], "transcribe": [tr.pid], "servers": servers, "fake": [fake_pid]}
        before = {k: _cpu_seconds(v) for k, v in groups.items()}
        parent_before = _cpu_seconds([ing.pid], descendants=False)
        load = os.getloadavg()[0]
        started = time.perf_counter()
        stack.submit(job_ids)
        spies = _profile(stack, tag, {"ingest": ing.pid, "transcribe": tr.pid})
        finished = stack.wait_done(n, timeout=max(600, n / 5))
        for spy in spies:
            spy.wait(60)
        after = {k: _cpu_seconds(v) for k, v in groups.items()}
        parent = _cpu_seconds([ing.pid], descendants=False) - parent_before
    out = {"files_per_s": n / (finished - started), "load": load}
    out.update({f"{k}_ms": (after[k] - before[k]) * 1000 / n for k in groups})
    out["total_ms"] = sum(out[f"{k}_ms"] for k in groups)
    out["ingest_parent_ms"] = parent * 1000 / n  # of ingest_ms: the prefork pool's main process
    statuses = stack.status_counts()
    if statuses.get("succeeded") != n:
        out["NOT_ALL_SUCCEEDED"] = 1.0
        print(f"  statuses: {statuses}", flush=True)
    return out


def noop_cpu(stack: BenchStack, n: int, run: int) -> dict[str, float]:
    """bench/p1_overhead.py's no-op measure, plus CPU ms per task: the no-op worker, the stack's servers and
    this process (which sends the tasks)."""
    with noop_worker(stack, f"noopcpu{run}") as (proc, client):
        groups = {"worker": [proc.pid], "servers": server_pids(stack)}
        before = {k: _cpu_seconds(v) for k, v in groups.items()}
        me = time.process_time()
        started = time.perf_counter()
        send_noops(n)
        wait_noops(client, n)
        out = {"tasks_per_s": n / (time.perf_counter() - started)}
        out["sender_ms"] = (time.process_time() - me) * 1000 / n
        out.update({f"{k}_ms": (_cpu_seconds(v) - before[k]) * 1000 / n for k, v in groups.items()})
        out["total_ms"] = out["sender_ms"] + out["worker_ms"] + out["servers_ms"]
        return out


def main() -> None:
    """Alternate the trees given on the command line; print one line per run."""
    trees = [str(Path(t).resolve()) for t in sys.argv[1:]]
    if not trees:
        raise SystemExit("usage: python -m bench._p1_ab TREE [TREE ...]")
    n = env_int("VOXQ_BENCH_P1_JOBS", 2000)
    rounds = env_int("VOXQ_AB_ROUNDS", 2)
    stack = BenchStack(fast_fake=True).start()
    try:
        files = make_files(n)
        _noop_line(stack, n, 1, "before")
        for r in range(rounds):
            for i, tree in enumerate(trees):
                res = run_tree(stack, tree, files, f"r{r}t{i}")
                cells = " ".join(f"{k}={v:.2f}" for k, v in res.items())
                print(f"round {r} {tree}: {cells}", flush=True)
        _noop_line(stack, n, 2, "after")
    finally:
        stack.stop()


def _noop_line(stack: BenchStack, n: int, run: int, when: str) -> None:
    """The no-op rate (with `VOXQ_AB_NOOP_CPU=1` also its CPU ms per task), printed."""
    if os.environ.get("VOXQ_AB_NOOP_CPU"):
        cells = " ".join(f"{k}={v:.3f}" for k, v in noop_cpu(stack, n, run).items())
    else:
        cells = f"tasks_per_s={noop_rate(stack, n, run):.0f}"
    print(f"no-op {when}: {cells} (load {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
