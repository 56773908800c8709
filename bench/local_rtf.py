"""Local engine real-time factor: voxq's pipeline against raw faster-whisper on the same files, same run.

RTF = processing seconds / audio seconds (lower is faster; 0.1 = ten times faster than real time).
For each file, in one process, on one loaded model:
- raw (faster-whisper defaults): `WhisperModel.transcribe(path)` — no VAD, no word timestamps;
- raw (voxq's options): the same call with `vad_filter=True, word_timestamps=True` — what the engine asks;
- pipeline: the worker's normalisation of the file (decode to 16 kHz mono, trim silence, FLAC chunks; the
  engine's own PyAV FLAC encode when the worker module is not importable) and then
  `LocalProvider.transcribe_sync` on each chunk, timed together and separately;
- end to end: the embedded stack (`voxq dev`'s: Postgres, Valkey, SeaweedFS, API, an I/O worker and a
  local worker), one job per file through the HTTP API (`POST /v1/jobs`), timed from the upload until the
  API reports it succeeded, after a warm-up job has loaded the model in the local worker.
Each measurement is repeated and the fastest run is kept (the least disturbed by other load).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import REPO_ROOT, host_facts, write_section

SECTION = "local_rtf"
REPEATS = int(os.environ.get("VOXQ_BENCH_REPEATS", "2"))


@dataclass
class Row:
    """One file's timings."""

    file: str
    audio_seconds: float
    raw_default: float = 0.0
    raw_voxq_options: float = 0.0
    pipeline_normalise: float = 0.0
    pipeline_transcribe: float = 0.0
    normaliser: str = ""
    chunks: int = 0
    speech_seconds: float = 0.0
    end_to_end: float | None = None
    stages: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def pipeline_total(self) -> float:
        """Normalisation plus transcription."""
        return self.pipeline_normalise + self.pipeline_transcribe


def _best(fn: Callable[[], Any], repeats: int = REPEATS) -> tuple[float, Any]:
    """Fastest wall time of `repeats` runs and the last run's result."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


def _audio_seconds(path: Path) -> float:
    from worker.local_engine import decode_audio

    return len(decode_audio(path.read_bytes())) / 16_000


def _normalise_with_worker(path: Path) -> tuple[list[bytes], float, str]:
    """The pipeline's own stage: worker.audio.prepare_audio then its FLAC chunks."""
    from core.settings import get_settings
    from worker.audio import prepare_audio

    settings = get_settings()
    prepared = prepare_audio(
        path, max_seconds=settings.max_audio_seconds, max_chunk_seconds=settings.max_chunk_seconds
    )
    try:
        chunks = [chunk.flac for chunk in prepared.iter_chunks()]
        return chunks, prepared.speech_seconds, "worker.audio.prepare_audio (trim + FLAC chunks)"
    finally:
        prepared.close()


def _normalise_plain(path: Path) -> tuple[list[bytes], float, str]:
    """Fallback when the worker is not importable: decode to 16 kHz mono and encode one FLAC."""
    import av
    import numpy as np

    from worker.local_engine import decode_audio

    samples = decode_audio(path.read_bytes())
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="flac") as out:
        stream = out.add_stream("flac", rate=16_000, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16_000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return [buffer.getvalue()], len(samples) / 16_000, "PyAV decode + one FLAC (no worker module)"


def measure(path: Path, provider: Any) -> Row:
    """All timings for one file."""
    from core.providers.base import TranscriptionRequest

    model = provider.load()
    row = Row(file=path.relative_to(REPO_ROOT).as_posix(), audio_seconds=_audio_seconds(path))

    def raw(**options: Any) -> str:
        segments, _ = model.transcribe(str(path), beam_size=5, **options)
        return " ".join(s.text.strip() for s in segments)

    row.raw_default, _ = _best(lambda: raw())
    row.raw_voxq_options, _ = _best(lambda: raw(vad_filter=True, word_timestamps=True))

    try:
        normalise = _normalise_with_worker
        row.pipeline_normalise, (chunks, speech, row.normaliser) = _best(lambda: normalise(path))
    except (ImportError, AttributeError, TypeError) as exc:
        row.notes.append(f"worker normaliser unavailable ({type(exc).__name__}); used the fallback")
        normalise = _normalise_plain
        row.pipeline_normalise, (chunks, speech, row.normaliser) = _best(lambda: normalise(path))
    row.chunks, row.speech_seconds = len(chunks), speech

    def pipeline_transcribe() -> str:
        texts = []
        for index, flac in enumerate(chunks):
            request = TranscriptionRequest(
                audio=flac,
                filename=f"chunk{index}.flac",
                content_type="audio/flac",
                model="local",
                audio_seconds=0.0,
            )
            texts.append(provider.transcribe_sync(request).text)
        return " ".join(texts)

    row.pipeline_transcribe, _ = _best(pipeline_transcribe)
    return row


def _wait_job(client: Any, job_id: str, timeout: float = 600.0) -> dict[str, Any]:
    """Poll until the job ends; the benchmark's figures come from the job's own timestamps, not from this."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get_job(job_id)
        if job["status"] in ("succeeded", "failed", "cancelled", "skipped"):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish in {timeout}s")


def _epoch(value: str | None) -> float | None:
    from datetime import datetime

    return None if value is None else datetime.fromisoformat(value).timestamp()


STAGES = ("upload", "to prepare", "prepare + local hop", "local attempt", "finish")


class EndToEnd:
    """The embedded stack (`voxq dev`'s, without beat and Flower) and a client: one job per call."""

    note = (
        f"end to end: embedded stack, one job per run via `POST /v1/jobs`, fastest of {REPEATS} runs "
        "(each job deleted after its run, so the next is not deduplicated); timed from the start of "
        "the upload to the job's `finished_at` (the server's timestamp, same host clock: the status polling "
        "of the benchmark is not counted)"
    )

    def __init__(self) -> None:
        import tempfile

        from voxq.devstack import DevStack
        from voxq.embedded import free_port

        env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "VOXQ_OPENAI_API_KEY")}
        env["VOXQ_LOCAL_MODEL_CACHE_DIR"] = str(REPO_ROOT / ".voxq" / "models")
        self._tmp = tempfile.TemporaryDirectory(prefix="voxq-bench-")
        self.stack = DevStack(
            self._tmp.name,
            api_port=free_port(),
            flower_port=free_port(),
            env=env,
            with_flower=False,
            with_beat=False,
            say=lambda _msg: None,
        )
        self.client: Any = None

    def start(self, warm_up: Path) -> None:
        """Start the stack, wait for the API, and run a warm-up job so the local worker has its model."""
        import httpx

        from voxq.client import VoxqClient

        info = self.stack.start()
        self.client = VoxqClient(info.api_url, info.api_key)
        deadline = time.monotonic() + 60
        while True:  # the port opens a moment before the app serves requests
            try:
                if httpx.get(f"{info.api_url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the API did not become healthy")
            time.sleep(0.2)
        self.run(warm_up)

    def run(self, path: Path) -> tuple[float, dict[str, float]]:
        """Upload one file as a job and wait until it succeeded: (seconds to `finished_at`, per stage).

        Stages, from the job's and its local attempt's timestamps: upload (request start → `queued_at`),
        to prepare (→ the ingest worker claims it, `started_at`), prepare + local hop (decode, trim, FLAC,
        S3 PUT, the local queue, the local worker's claim and S3 GET → the attempt's `started_at`), local
        attempt (decode + model, the attempt's `latency_ms`), finish (→ `finished_at`).
        The job is deleted afterwards: identical audio in a tenant is deduplicated against jobs that are not
        deleted, so a repeat of the same file is transcribed again instead of copied.
        """
        started = time.time()
        job = _wait_job(self.client, self.client.submit_file(path)["id"])
        if job["status"] != "succeeded":
            raise RuntimeError(f"{path.name}: the job ended {job['status']}")
        local = [a for a in self.client.attempts(job["id"]) if a["provider"] == "local"]
        self.client.delete_job(job["id"])
        if not local:
            raise RuntimeError(f"{path.name}: no local attempt (deduplicated?)")
        queued, claimed, finished = (_epoch(job[k]) for k in ("queued_at", "started_at", "finished_at"))
        assert queued is not None and claimed is not None and finished is not None
        first = _epoch(local[0]["started_at"]) if local else claimed
        last_end = _epoch(local[-1]["ended_at"]) if local else finished
        assert first is not None and last_end is not None
        stages = dict(
            zip(
                STAGES,
                (
                    queued - started,
                    claimed - queued,
                    first - claimed,
                    sum((a["latency_ms"] or 0) / 1000 for a in local),
                    finished - last_end,
                ),
                strict=True,
            )
        )
        return finished - started, stages

    def stop(self) -> None:
        """Stop the stack and remove its data."""
        if self.client is not None:
            self.client.close()
        self.stack.stop()
        self._tmp.cleanup()


def _files() -> tuple[list[Path], Path]:
    """The files measured (the podcast and two voicemails) and another one for the warm-up job."""
    manifest = json.loads((REPO_ROOT / "samples" / "manifest.json").read_text())
    podcast = [REPO_ROOT / "samples" / e["file"] for e in manifest if e["kind"] == "podcast"]
    voicemails = [REPO_ROOT / "samples" / e["file"] for e in manifest if e["kind"] == "voicemail"]
    return podcast[:1] + voicemails[:2], voicemails[-1]


def render(rows: list[Row], facts: dict[str, str], provider: Any, elapsed: float, e2e_note: str) -> str:
    """The markdown section."""

    def rtf(seconds: float, row: Row) -> str:
        return f"{seconds / row.audio_seconds:.3f}"

    lines = [
        "## Local engine: pipeline vs raw faster-whisper (`bench/local_rtf.py`)",
        "",
        "Real-time factor (processing seconds ÷ audio seconds; lower is faster). Raw and pipeline: fastest "
        f"of {REPEATS} runs on one loaded model in the benchmark's process. End to end: fastest of "
        f"{REPEATS} jobs per file, measured right after that file's raw and pipeline runs.",
        "",
        "| file | audio s | raw default | raw + VAD + words | pipeline normalise | pipeline transcribe "
        "| pipeline total | pipeline ÷ raw (same options) | end-to-end job | end-to-end ÷ raw |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row.file}` | {row.audio_seconds:.1f} | {rtf(row.raw_default, row)} "
            f"| {rtf(row.raw_voxq_options, row)} | {rtf(row.pipeline_normalise, row)} "
            f"| {rtf(row.pipeline_transcribe, row)} | {rtf(row.pipeline_total, row)} "
            f"| {row.pipeline_total / row.raw_voxq_options:.2f}x "
            + (
                f"| {rtf(row.end_to_end, row)} | {row.end_to_end / row.raw_voxq_options:.2f}x |"
                if row.end_to_end
                else "| n/a | n/a |"
            )
        )
    ratios = [r.pipeline_total / r.raw_voxq_options for r in rows]
    e2e_ratios = [r.end_to_end / r.raw_voxq_options for r in rows if r.end_to_end]
    lines += [
        "",
        f"Median pipeline ÷ raw (same options): **{statistics.median(ratios):.2f}x**. "
        "The pipeline trims silence before the model sees the audio, so on padded files it can beat raw.",
        "",
        f"P6 target, RTF ratio ≤ 1.1: pipeline {statistics.median(ratios):.2f}x "
        + ("**PASS**" if statistics.median(ratios) <= 1.1 else "**MISS**")
        + (
            f"; end to end (job through API, queue and worker) "
            f"{statistics.median(e2e_ratios):.2f}x "
            + ("**PASS**" if statistics.median(e2e_ratios) <= 1.1 else "**MISS**")
            if e2e_ratios
            else "; end to end not measured in this run (see below)"
        )
        + ".",
        "",
        f"- model: `{provider.name}`, compute type `{provider.compute_type}`, "
        f"cpu_threads {provider.cpu_threads}, beam size 5",
        f"- normaliser: {rows[0].normaliser}",
        f"- {e2e_note}",
    ]
    for row in rows:
        lines.append(
            f"- `{row.file}`: {row.chunks} chunk(s), "
            f"{row.speech_seconds:.1f} s kept of {row.audio_seconds:.1f} s"
            + ("; " + "; ".join(row.notes) if row.notes else "")
        )
    staged = [r for r in rows if r.stages]

    def outside(r: Row) -> float:
        return sum(v for k, v in r.stages.items() if k != "local attempt")

    if staged:
        lines += [
            "",
            "End-to-end stages in seconds (from the job's and its attempt's timestamps; the fixed cost is "
            "the end-to-end time minus the raw transcription):",
            "",
            "| file | " + " | ".join(STAGES) + " | end to end | raw + VAD + words | fixed cost "
            "| stages outside the model | (raw + those) ÷ raw |",
            "|---|" + "---|" * (len(STAGES) + 5),
        ]
        for r in staged:
            assert r.end_to_end is not None
            lines.append(
                f"| `{r.file}` | "
                + " | ".join(f"{r.stages[s]:.3f}" for s in STAGES)
                + f" | {r.end_to_end:.3f} | {r.raw_voxq_options:.3f} "
                f"| {r.end_to_end - r.raw_voxq_options:.3f} | {outside(r):.3f} "
                f"| {(r.raw_voxq_options + outside(r)) / r.raw_voxq_options:.2f}x |"
            )
        lines += [
            "",
            "The last two columns are robust to the host's load swings (raw and the job run seconds apart): "
            "what the job spends outside the local attempt, added to raw's time.",
        ]
    lines += ["", "Host and versions:", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines.append(f"- benchmark wall time: {elapsed:.0f} s")
    return "\n".join(lines)


def main() -> None:
    """Measure and write the `local_rtf` section of docs/benchmarks.md."""
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("VOXQ_LOCAL_MODEL_CACHE_DIR", str(REPO_ROOT / ".voxq" / "models"))
    from worker.local_engine import LocalProvider

    facts = host_facts("faster-whisper", "ctranslate2", "av", "numpy", "onnxruntime")
    started = time.perf_counter()
    provider = LocalProvider()
    provider.load()
    files, warm_up = _files()
    e2e: EndToEnd | None = None
    e2e_note = EndToEnd.note
    try:
        e2e = EndToEnd()
        e2e.start(warm_up)
    except Exception as exc:  # a benchmark reports what it could not measure instead of dying
        e2e_note = f"end to end not measured: {type(exc).__name__}: {exc}"
        if e2e is not None:
            e2e.stop()
        e2e = None
    rows = []
    try:
        for path in files:
            # Raw, pipeline and end to end back to back, so they share the machine's load of the moment.
            row = measure(path, provider)
            if e2e is not None:
                row.end_to_end, row.stages = min(
                    (e2e.run(path) for _ in range(max(1, REPEATS))), key=lambda run: run[0]
                )
            print(
                f"{row.file}: {row.audio_seconds:.1f}s audio, raw {row.raw_voxq_options:.2f}s, "
                f"pipeline {row.pipeline_total:.2f}s, end to end {row.end_to_end or 0:.2f}s",
                flush=True,
            )
            rows.append(row)
    finally:
        if e2e is not None:
            e2e.stop()
    body = render(rows, facts, provider, time.perf_counter() - started, e2e_note)
    write_section(SECTION, body)
    print(body)


if __name__ == "__main__":
    main()
