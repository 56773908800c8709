"""P5: worker peak RSS transcribing a 3-hour podcast; API RSS growth during a 2 GiB upload.

Targets: ≤ 400 MB; ≤ 100 MB. Scale: `VOXQ_BENCH_P5_HOURS` (default 3) and `VOXQ_BENCH_P5_UPLOAD_MB`
(default 2048 MiB, less 64 KiB so the multipart body stays under the 2 GiB upload limit).
- The podcast is generated as a compact 16 kHz mono FLAC streamed to disk (tones of 0.4-2.5 s between
  0.2-0.8 s pauses: "speech" all the way, so every 10-minute chunk is sent), uploaded straight to S3 with a
  `queued` job; one worker (`prefork -c 1`, ingest and transcribe queues) prepares and transcribes it on
  the instant fake provider. Peak = the highest VmHWM of the worker's processes (main and child), read
  from /proc just before the job ended, plus VmRSS sampled every 0.2 s.
- The upload is a 48 kHz stereo 16-bit WAV produced by a generator (never in memory) and sent as one
  streamed multipart `POST /v1/jobs`; growth = the API process's highest VmRSS (sampled every 0.1 s)
  minus its VmRSS just before.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench import host_facts
from bench._harness import (
    BenchStack,
    api_key,
    api_server,
    children,
    env_int,
    publish,
    rss_mb,
    verdict,
    wait_ready,
)

SECTION = "p5_memory"
RATE = 16_000
MiB = 1024 * 1024


def write_podcast(path: Path, hours: float) -> float:
    """Stream a tones-and-pauses FLAC of `hours` to `path`; returns its seconds."""
    import av

    rng = np.random.default_rng(3)
    total = int(hours * 3600 * RATE)
    written = 0
    with av.open(str(path), mode="w", format="flac") as out:
        stream = out.add_stream("flac", rate=RATE)
        stream.layout = "mono"
        while written < total:
            parts = []
            for _ in range(20):
                tone = rng.uniform(0.4, 2.5)
                t = np.arange(int(tone * RATE)) / RATE
                parts.append(0.3 * np.sin(2 * np.pi * rng.integers(20, 100) * 10 * t))
                parts.append(np.zeros(int(rng.uniform(0.2, 0.8) * RATE)))
            block = (np.concatenate(parts)[: total - written] * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = RATE
            for packet in stream.encode(frame):
                out.mux(packet)
            written += len(block)
        for packet in stream.encode(None):
            out.mux(packet)
    return written / RATE


def podcast_peak(stack: BenchStack, hours: float) -> dict[str, float]:
    """Peak RSS of a worker preparing and transcribing one long file."""
    from sqlalchemy import insert

    from core.db import session_scope
    from core.ids import uuid7
    from core.models import Job
    from core.storage import Storage, content_key

    path = stack.dir / "podcast.flac"
    seconds = write_podcast(path, hours)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    tenant, batch = stack.tenant_and_batch()
    key = content_key(str(tenant), sha)
    Storage().client.upload_file(str(path), stack.stack.s3_bucket, key)
    job_id = uuid7()
    with session_scope() as session:
        session.execute(
            insert(Job),
            [{"id": job_id, "tenant_id": tenant, "batch_id": batch, "object_key": key,
              "filename": "podcast.flac", "bytes": path.stat().st_size, "sha256": sha,
              "status": "queued", "priority": "normal"}],
        )  # fmt: skip
    peak_rss = 0.0
    hwm: dict[int, float] = {}
    with stack.worker(
        queues="ingest,transcribe.high,transcribe,transcribe.low", concurrency=1, name="podcast"
    ) as proc:
        wait_ready(stack, "podcast")
        started = time.perf_counter()
        stack.submit([job_id])
        while True:
            pids = [proc.pid, *children(proc.pid)]
            for pid in pids:
                try:
                    peak_rss = max(peak_rss, rss_mb(pid))
                    hwm[pid] = rss_mb(pid, "VmHWM")
                except OSError:
                    pass
            status = stack.count("SELECT status FROM jobs WHERE id = :id", id=job_id)
            if status in ("succeeded", "failed", "skipped", "cancelled"):
                break
            if time.perf_counter() - started > 1800:
                raise TimeoutError("the podcast did not finish in 30 min")
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
    chunks = stack.count("SELECT count(*) FROM job_chunks WHERE job_id = :id", id=job_id)
    return {
        "seconds": seconds,
        "mb": path.stat().st_size / 1e6,
        "peak_hwm": max(hwm.values()),
        "peak_rss": peak_rss,
        "elapsed": elapsed,
        "chunks": chunks,
        "status": status,
    }


def wav_stream(total: int, boundary: str) -> Iterator[bytes]:
    """A multipart body with one WAV part of `total` bytes, made on the fly."""
    data_bytes = total - 44
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt "
    header += (
        struct.pack("<IHHIIHH", 16, 1, 2, 48_000, 192_000, 4, 16) + b"data" + struct.pack("<I", data_bytes)
    )
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + header
    block = (np.random.default_rng(5).normal(0, 500, MiB // 2)).astype(np.int16).tobytes()
    left = data_bytes
    while left > 0:
        piece = block[: min(len(block), left)]
        left -= len(piece)
        yield piece
    yield f"\r\n--{boundary}--\r\n".encode()


def upload_growth(stack: BenchStack, size: int) -> dict[str, float]:
    """The API's RSS growth while one streamed upload of `size` bytes goes through it."""
    import httpx

    key = api_key()
    headers = {"Authorization": f"Bearer {key}"}
    with api_server(stack) as (url, proc), httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        # Warm up the routes the upload uses (imports, pools) so growth is the upload's own.
        client.get("/v1/batches")
        baseline = rss_mb(proc.pid)
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(proc.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        boundary = "voxqbench" + "x" * 16
        started = time.perf_counter()
        response = client.post(
            "/v1/jobs",
            content=wav_stream(size, boundary),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
    return {
        "baseline": baseline,
        "peak": peak,
        "growth": peak - baseline,
        "status": response.status_code,
        "code": response.json().get("code", response.json().get("status", "")),
        "mb_s": size / 1e6 / elapsed,
    }


def main() -> None:
    """Measure and write the `p5_memory` section of docs/benchmarks.md."""
    hours = float(env_int("VOXQ_BENCH_P5_HOURS", 3))
    upload_mib = env_int("VOXQ_BENCH_P5_UPLOAD_MB", 2048)
    facts = host_facts("celery", "av", "numpy", "boto3", "starlette")
    t0 = time.perf_counter()
    stack = BenchStack().start()
    try:
        pod = podcast_peak(stack, hours)
        print("podcast", pod, flush=True)
        up = upload_growth(stack, upload_mib * MiB - 64 * 1024)
        print("upload", up, flush=True)
    finally:
        stack.stop()
    publish(
        SECTION,
        [
            "## P5 memory: long file in a worker, big upload through the API (`bench/p5_memory.py`)",
            "",
            "| measure | value |",
            "|---|---|",
            f"| podcast | {pod['seconds'] / 3600:.1f} h tones-and-pauses FLAC, {pod['mb']:.0f} MB, "
            f"{pod['chunks']} chunks, job {pod['status']} in {pod['elapsed']:.0f} s |",
            f"| worker peak RSS (max VmHWM of main + child; sampled VmRSS max) | {pod['peak_hwm']:.0f} MB "
            f"({pod['peak_rss']:.0f} MB) |",
            f"| worker target ≤ 400 MB | {verdict(pod['peak_hwm'] <= 400)} |",
            f"| upload | {upload_mib} MiB streamed WAV via `POST /v1/jobs`: HTTP {up['status']} "
            f"({up['code']}), {up['mb_s']:.0f} MB/s |",
            f"| API RSS before / peak / growth | {up['baseline']:.0f} / {up['peak']:.0f} / "
            f"{up['growth']:.0f} MB |",
            f"| API growth target ≤ 100 MB | {verdict(up['growth'] <= 100)} |",
            "",
        ],
        facts,
        t0,
    )


if __name__ == "__main__":
    main()
