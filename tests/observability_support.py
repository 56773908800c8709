"""A full run for observability tests: API process + worker process + fake OpenAI, all logs captured."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api_helpers import make_key, scrape, start_api_server, stop_api_server
from tests.audio_fixtures import encode, tone_samples
from tests.fakes.openai_server import FakeOpenAI
from tests.support import Stack, celery_worker, wait_until
from voxq.embedded import free_port

PRIMARY = "gpt-4o-mini-transcribe"
FALLBACK = "gpt-4o-transcribe"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_samples(text: str) -> Samples:
    """(sample name, sorted labels) -> value, from Prometheus text format."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(parsed: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a labelled counter that never moved has no sample)."""
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


def tone_audio(freqs: list[float]) -> bytes:
    """FLAC of pure tones the fake transcribes as `tone<F> ...`."""
    return encode(tone_samples(freqs, tone_seconds=0.5, gap_seconds=0.4))


@dataclass
class RunResult:
    """What a run left behind: the batch, job ids, metrics scraped after it, and every log file."""

    batch: dict[str, Any]
    jobs: list[dict[str, Any]]
    worker_metrics: Samples
    api_metrics: Samples
    logs: list[Path] = field(default_factory=list)


def full_run(
    stack: Stack,
    fake: FakeOpenAI,
    files: list[tuple[str, bytes]],
    *,
    models: list[str],
    env: dict[str, str] | None = None,
    batch_options: dict[str, Any] | None = None,
    before_scrape: Callable[[], object] | None = None,
    settled: Callable[[Samples], bool] | None = None,
    timeout: float = 180.0,
) -> RunResult:
    """Upload `files` into one batch through a real API process, let a real worker transcribe them
    through the fake OpenAI server, then scrape the worker's (once `settled` accepts it) and the API's
    /metrics."""
    env = {"OPENAI_BASE_URL": fake.base_url, **(env or {})}
    metrics_port = free_port()
    log_dir = stack.work_dir / f"run-{time.time_ns()}"
    log_dir.mkdir()
    worker_log = log_dir / "worker.log"
    server = start_api_server(stack, **env)
    logs = [server.log_path, worker_log]
    try:
        key = make_key("obs")
        with (
            celery_worker(
                stack,
                name=f"obs{metrics_port}",
                env={**env, "VOXQ_WORKER_METRICS_PORT": str(metrics_port)},
                log_path=worker_log,
            ),
            server.client(key) as client,
        ):
            options = {"models": models, "profile": "voicemail", **(batch_options or {})}
            batch = client.post("/v1/batches", json=options)
            assert batch.status_code == 201, batch.text
            batch_id = batch.json()["id"]
            upload = client.post(
                f"/v1/batches/{batch_id}/files",
                files=[("file", (name, data, "audio/flac")) for name, data in files],
            )
            assert upload.status_code in (200, 201), upload.text
            submitted = client.post(f"/v1/batches/{batch_id}/submit")
            assert submitted.status_code == 202, submitted.text

            def finished() -> dict[str, Any] | None:
                body: dict[str, Any] = client.get(f"/v1/batches/{batch_id}").json()
                return body if body["status"] in ("completed", "failed", "cancelled") else None

            final = wait_until(finished, timeout=timeout, interval=0.5, what="batch finished")
            jobs = client.get(f"/v1/batches/{batch_id}/jobs", params={"limit": 100}).json()["items"]
            if before_scrape is not None:
                before_scrape()

            def scraped() -> str | None:
                text = _scrape(f"http://127.0.0.1:{metrics_port}/metrics")
                # Work after the last database write (a metric bumped after commit) may still be landing.
                return text if text and (settled is None or settled(parse_samples(text))) else None

            worker_text = wait_until(scraped, timeout=30, what="worker /metrics settled")
            api_text = scrape(server.url + "/metrics", timeout=30)
        return RunResult(final, jobs, parse_samples(worker_text), parse_samples(api_text), logs)
    finally:
        stop_api_server(server)


def _scrape(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None
