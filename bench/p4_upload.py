"""P4: API multipart upload MB/s vs direct boto3 PUT to the same S3; P4b: GET /v1/jobs/{id} latency.

P4 target: API ≥ 0.8 x direct MB/s. `VOXQ_BENCH_P4_FILES` (default 200) distinct 5 MB WAVs (16 kHz mono
noise, valid audio: the API probes what it stores), `VOXQ_BENCH_P4_CONCURRENCY` (default 4) uploads at
once on both sides: one file per `POST /v1/batches/{id}/files` request vs `put_object` of the same
bytes from 4 threads to the same SeaweedFS, back to back; `VOXQ_BENCH_P4_ROUNDS` (default 3) alternates
more rounds (direct, API, direct, API) and keeps the best.

The direct PUT is measured twice: with boto3 as a user would use it (defaults: only endpoint, keys and
path-style addressing set; botocore ≥ 1.36 then also computes a CRC32 checksum header), which the target
is held against, and with voxq's own client settings (`request_checksum_calculation="when_required"`:
SHA-256 payload hash only), the stricter comparison the earlier runs used.
Everything is measured once per API setup in `VOXQ_BENCH_P4_API_WORKERS` (default "1,2": one uvicorn
process, then `--workers 2`, how a 2-core production host runs the API).

P4b target: p99 ≤ 25 ms with 100 concurrent clients on the jobs just uploaded, for
`VOXQ_BENCH_P4B_SECONDS` (default 15) each:
- polling: 100 clients each sending `GET /v1/jobs/{id}` every 0.5 s (200 requests/s offered) — how a
  fleet of clients waiting for results behaves; this is the figure held against the target;
- saturation: 100 clients in a closed loop (each sends its next request as soon as the last answered);
  by Little's law its latency is 100 ÷ throughput, so it shows the server's ceiling, not a service time.
The load generator (one asyncio process, one minimal keep-alive HTTP/1.1 connection per client) shares
the 2 cores with the API, Postgres and SeaweedFS. Each phase also reports the cores used meanwhile by
processes outside the benchmark (host CPU from /proc/stat minus the client's, the API's and the
servers') and the API threads' run-queue wait per request (/proc schedstat): on a shared 2-core host
the polling tail follows them, so they tell a slower API from a busier host.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench import host_facts
from bench._harness import BenchStack, api_key, api_server, children, env_int, publish, verdict

SECTION = "p4_upload"
MB = 1_000_000


def base_wav(size: int) -> bytes:
    """A valid 16 kHz mono 16-bit WAV of `size` bytes (low noise)."""
    n = (size - 44) // 2
    pcm = (np.random.default_rng(7).normal(0, 800, n)).astype(np.int16).tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, 16_000, 32_000, 2, 16) + b"data" + struct.pack("<I", len(pcm))
    return header + pcm


def variant(base: bytes, i: int, salt: int) -> bytes:
    """`base` with a few samples changed: distinct content (no dedupe), still valid audio."""
    tag = struct.pack("<QQ", i, salt)
    return base[:1000] + tag + base[1000 + len(tag) :]


def default_client() -> Any:
    """boto3 as a user would point it at this S3: endpoint, keys and path-style addressing, else defaults."""
    import boto3
    from botocore.config import Config

    from core.settings import get_settings

    settings = get_settings()
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=settings.s3_secret_access_key.get_secret_value(),
        region_name=settings.s3_region,
        config=Config(s3={"addressing_style": "path"}),
    )


def _tree(pid: int) -> list[int]:
    return [pid, *(p for child in children(pid) for p in _tree(child))]


def _cpu_seconds(pids: list[int], descendants: bool = True) -> float:
    """User + system CPU seconds of these processes (and their descendants), from /proc."""
    total = 0
    for pid in {p for root in pids for p in (_tree(root) if descendants else [root])}:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
        except OSError:
            continue  # gone since it was listed
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def server_pids(stack: BenchStack) -> list[int]:
    """The stack's SeaweedFS, Valkey and Postgres server processes (Postgres backends are children)."""
    pids: list[int] = []
    for server in stack._servers:
        proc = getattr(getattr(server, "process", None), "proc", None)
        pidfile = getattr(server, "data_dir", None)
        if proc is not None:
            pids.append(proc.pid)
        elif pidfile is not None and (pidfile / "postmaster.pid").exists():
            pids.append(int((pidfile / "postmaster.pid").read_text().split()[0]))
    return pids


def _host_busy_seconds() -> float:
    """CPU seconds the whole host has spent busy (all cores, every process), from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _runqueue_waits(pids: list[int]) -> dict[str, int]:
    """Nanoseconds each thread of these processes (and their descendants) has spent runnable but not
    running, waiting for a core (/proc/PID/task/TID/schedstat, second field), by thread."""
    waits: dict[str, int] = {}
    for pid in {p for root in pids for p in _tree(root)}:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                waits[tid] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return waits


def _waited_seconds(before: dict[str, int], after: dict[str, int]) -> float:
    """Run-queue wait between two `_runqueue_waits` (threads that ended meanwhile are not counted)."""
    return sum(ns - before.get(tid, 0) for tid, ns in after.items()) / 1e9


class CpuMeter:
    """CPU milliseconds per file of one phase: this process (the client), the API, the stack's servers."""

    def __init__(self, servers: list[int], api: list[int]) -> None:
        self.groups = {"client": [os.getpid()], "api": api, "servers": servers}
        self.reset()

    def reset(self) -> None:
        """Start counting now."""
        self.start = {name: self._cpu(name) for name in self.groups}

    def _cpu(self, name: str) -> float:
        # This process's children are the servers and the API: the client is this process alone.
        return _cpu_seconds(self.groups[name], descendants=name != "client")

    def seconds(self) -> float:
        """CPU seconds of all three groups since `reset`."""
        return sum(self._cpu(name) - self.start[name] for name in self.groups)

    def per_file(self, n: int) -> dict[str, float]:
        return {name: (self._cpu(name) - self.start[name]) * 1000 / n for name in self.groups}


def direct_put(
    stack: BenchStack,
    base: bytes,
    n: int,
    concurrency: int,
    salt: int,
    *,
    voxq_client: bool,
    meter: CpuMeter | None = None,
) -> float:
    """MB/s of boto3 put_object straight to the bucket (default client, or voxq's client settings)."""
    from core.storage import Storage

    client = Storage().client if voxq_client else default_client()
    bucket = stack.stack.s3_bucket

    def put(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"bench-direct/{salt}/{i}.wav", Body=variant(base, i, salt))

    if meter is not None:
        meter.reset()  # the client is made and warm: count the uploads only
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(put, range(n)))
    return n * len(base) / MB / (time.perf_counter() - started)


def api_upload(
    url: str, key: str, base: bytes, n: int, concurrency: int, salt: int, meter: CpuMeter | None = None
) -> tuple[float, list[str]]:
    """MB/s of multipart uploads through the API, one file per request; the job ids."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        batch = client.post("/v1/batches", json={}).json()["id"]
        ids: list[str] = []

        def upload(i: int) -> None:
            files = [("file", (f"f{i}.wav", variant(base, i, salt), "audio/wav"))]
            response = client.post(f"/v1/batches/{batch}/files", files=files)
            response.raise_for_status()
            ids.extend(j["id"] for j in response.json()["jobs"])

        if meter is not None:
            meter.reset()
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(upload, range(n)))
        return n * len(base) / MB / (time.perf_counter() - started), ids


class _Connection:
    """One keep-alive HTTP/1.1 connection sending `GET path` with a bearer key: a minimal client.

    The load generator shares the 2 cores with the API: httpx's AsyncClient spent ~3.5 ms of CPU per
    request here (2.5 x the API's own ~1.4 ms), so its cost, not the server's, filled the tail. This
    writes the request and reads the status line, headers and Content-Length body, nothing more.
    """

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port = host, port
        self.headers = f"Host: {host}:{port}\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> int:
        """The status of `GET path` (opens the connection when needed)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\n".encode() + self.headers)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        """Drop the connection (after an error, or at the end)."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def poll_latencies(
    url: str, key: str, ids: list[str], seconds: float, interval: float | None
) -> tuple[list[float], int]:
    """Latencies (s) of GET /v1/jobs/{id} from 100 clients, and the errors; `interval` None = closed loop."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def one_client(k: int) -> None:
        nonlocal errors
        rnd = random.Random(k)
        conn = _Connection(host, int(port), key)
        if interval:
            await asyncio.sleep(rnd.random() * interval)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                if await asyncio.wait_for(conn.get(f"/v1/jobs/{rnd.choice(ids)}"), 30) != 200:
                    errors += 1
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                errors += 1  # a timeout (30 s) counts as an error and as its wait
                conn.close()
            latencies.append(time.perf_counter() - t0)
            if interval:
                await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)))
        conn.close()

    await asyncio.gather(*(one_client(k) for k in range(100)))
    return latencies, errors


def pct(values: list[float], q: float) -> float:
    """The q-quantile in ms."""
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] * 1000


def _cpu_total(rounds: list[dict[str, float]]) -> float:
    return statistics.median(sum(r.values()) for r in rounds)


def _cpu_text(rounds: list[dict[str, float]]) -> str:
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return f"{_cpu_total(rounds):.1f} ({med['client']:.1f} + {med['api']:.1f} + {med['servers']:.1f})"


def _rounds(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _phase(
    url: str, key: str, ids: list[str], seconds: int, interval: float | None, meter: CpuMeter
) -> dict[str, float]:
    meter.reset()
    host0, wait0 = _host_busy_seconds(), _runqueue_waits(meter.groups["api"])
    started = time.perf_counter()
    lat, errors = asyncio.run(poll_latencies(url, key, ids, seconds, interval))
    elapsed = time.perf_counter() - started
    ours = meter.seconds()  # the client, the API and the stack's servers
    return {
        "errors": errors,
        "n": len(lat),
        "rps": len(lat) / seconds,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "max": max(lat) * 1000,
        "load": os.getloadavg()[0],  # the host's 1-min load average as the phase ends
        # What the load average does not separate: cores used by processes outside this benchmark
        # (other work on a shared host) and how long the API's threads waited for a core while runnable.
        "other_cores": max(0.0, _host_busy_seconds() - host0 - ours) / elapsed,
        "api_wait_ms": _waited_seconds(wait0, _runqueue_waits(meter.groups["api"])) * 1000 / max(len(lat), 1),
    }


def main() -> None:
    """Measure and write the `p4_upload` section of docs/benchmarks.md."""
    n = env_int("VOXQ_BENCH_P4_FILES", 200)
    concurrency = env_int("VOXQ_BENCH_P4_CONCURRENCY", 4)
    seconds = env_int("VOXQ_BENCH_P4B_SECONDS", 15)
    rounds = env_int("VOXQ_BENCH_P4_ROUNDS", 3)
    worker_counts = [int(w) for w in os.environ.get("VOXQ_BENCH_P4_API_WORKERS", "1,2").split(",")]
    facts = host_facts("fastapi", "starlette", "uvicorn", "boto3", "sqlalchemy")
    t0 = time.perf_counter()
    base = base_wav(5 * MB)
    stack = BenchStack().start()
    direct: dict[int, list[float]] = {}
    direct_voxq: dict[int, list[float]] = {}
    cpu: dict[int, dict[str, list[dict[str, float]]]] = {}
    via_api: dict[int, list[float]] = {}
    results: dict[int, dict[str, Any]] = {}
    try:
        key = api_key()
        for workers in worker_counts:
            direct[workers], direct_voxq[workers], via_api[workers], results[workers] = [], [], [], {}
            cpu[workers] = {"default": [], "voxq": [], "api": []}
            with api_server(stack, workers=workers) as (url, proc):
                servers, api = server_pids(stack), [proc.pid]
                ids: list[str] = []
                for round_ in range(rounds):
                    salt = 1000 * workers + round_
                    meter = CpuMeter(servers, api)
                    direct[workers].append(
                        direct_put(stack, base, n, concurrency, salt, voxq_client=False, meter=meter)
                    )
                    cpu[workers]["default"].append(meter.per_file(n))
                    direct_voxq[workers].append(
                        direct_put(stack, base, n, concurrency, 500 + salt, voxq_client=True, meter=meter)
                    )
                    cpu[workers]["voxq"].append(meter.per_file(n))
                    rate, new_ids = api_upload(url, key, base, n, concurrency, 100 + salt, meter=meter)
                    cpu[workers]["api"].append(meter.per_file(n))
                    via_api[workers].append(rate)
                    ids += new_ids
                    print(f"{workers} worker(s) round {round_}: direct {direct[workers][-1]:.1f} MB/s, "
                          f"direct (voxq client) {direct_voxq[workers][-1]:.1f} MB/s, API {rate:.1f} MB/s, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
                for name, interval in (("polling", 0.5), ("saturation", None)):
                    results[workers][name] = _phase(url, key, ids, seconds, interval, CpuMeter(servers, api))
                    print(workers, name, results[workers][name], flush=True)
    finally:
        stack.stop()
    lines = [
        "## P4 upload throughput and P4b job status latency (`bench/p4_upload.py`)",
        "",
        f"{n} distinct 5 MB WAVs per round, {concurrency} at once, {rounds} round(s) per API setup "
        "(direct PUTs measured right before each API round, best kept); the same embedded SeaweedFS. The "
        "target holds the API against boto3 with its default settings; the ratio against voxq's own client "
        "settings (no CRC32 checksum, the earlier runs' baseline) is shown too. The API "
        "runs as one uvicorn process, then as 2 uvicorn workers (how a 2-core production host runs it). "
        "P4b: a minimal keep-alive HTTP/1.1 client per simulated client (httpx cost more CPU per request "
        "than the API on these shared cores).",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for workers in worker_counts:
        label = "one process" if workers == 1 else f"{workers} workers"
        best_direct, best_api = max(direct[workers]), max(via_api[workers])
        best_voxq = max(direct_voxq[workers])
        phases = cpu[workers]
        api_cpu = _cpu_total(phases["api"])
        ratio = best_api / best_direct
        poll, sat = results[workers]["polling"], results[workers]["saturation"]
        p50, p99, top = poll["p50"], poll["p99"], poll["max"]
        lines += [
            f"| {label}: direct boto3 put_object MB/s, default client (rounds) | {best_direct:.1f} "
            f"({_rounds(direct[workers])}) |",
            f"| {label}: direct boto3 put_object MB/s, voxq's client settings (rounds) | {best_voxq:.1f} "
            f"({_rounds(direct_voxq[workers])}) |",
            f"| {label}: API multipart MB/s (rounds) | {best_api:.1f} ({_rounds(via_api[workers])}) |",
            f"| {label}: P4 ratio vs the default client (target ≥ 0.80) | {ratio:.2f} "
            f"{verdict(ratio >= 0.8)} |",
            f"| {label}: ratio vs voxq's client settings (stricter) | {best_api / best_voxq:.2f} |",
            f"| {label}: CPU ms per 5 MB file, client + API + S3/Postgres/Valkey: default-client PUT; "
            f"voxq-settings PUT; API | {_cpu_text(phases['default'])}; {_cpu_text(phases['voxq'])}; "
            f"{_cpu_text(phases['api'])} |",
            f"| {label}: CPU ratio direct ÷ API (what the ratio tends to while the 2 cores are the "
            f"bottleneck): default client; voxq settings | {_cpu_total(phases['default']) / api_cpu:.2f}; "
            f"{_cpu_total(phases['voxq']) / api_cpu:.2f} |",
            f"| {label}: P4b polling, 100 clients every 0.5 s: requests/s, p50, p99, max | "
            f"{poll['rps']:.0f}, {p50:.1f} ms, {p99:.1f} ms, {top:.0f} ms ({poll['errors']:.0f} errors; "
            f"load {poll['load']:.1f}) |",
            f"| {label}: P4b polling: cores used by processes outside the benchmark; API threads' wait for a "
            f"core per request | {poll['other_cores']:.2f}; {poll['api_wait_ms']:.2f} ms |",
            f"| {label}: P4b p99 (target ≤ 25 ms) | {poll['p99']:.1f} ms {verdict(poll['p99'] <= 25)} |",
            f"| {label}: P4b saturation, 100 clients closed loop: requests/s, p50, p99 | {sat['rps']:.0f}, "
            f"{sat['p50']:.1f} ms, {sat['p99']:.1f} ms ({sat['errors']:.0f} errors/30 s timeouts; "
            f"load {sat['load']:.1f}) |",
        ]
    lines.append("")
    publish(SECTION, lines, facts, t0)


if __name__ == "__main__":
    main()
