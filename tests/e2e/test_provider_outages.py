"""Issue #17, "Done when": one provider runs out of quota mid-batch, another's key is revoked mid-batch, and
a self-hosted server serves the rest. Every part is a process of its own: the API (uvicorn), a Celery
worker consuming every queue, two fake hosted providers (`python -m tests.fakes.openai_server`, scripted
over HTTP) and a real faster-whisper-server 0.0.3 on the bundled Whisper base weights
(tests/third_party.py), all named by one providers file.

The providers (tests/provider_support.py's hosts, set up for this run):
- `a`: `whisper-large-v3-turbo` answers `verbose_json` with segments (no words), $0.0005/min, no minimum;
  `whisper-large-v3` json only, $0.0012/min. The account runs out of quota after 4 billed requests.
- `b`: `whisper-large-v3-turbo` answers `verbose_json` with segments and words, $0.0006/min, 10 s billed
  minimum per request. Its key is revoked after 4 billed requests on the account.
- `gpu`: faster-whisper-server, `price = "zero"`, configured as the operator's plain-text fallback of
  last resort (`json` only, so `timestamps = "none"`: voxq aligns the times itself) and one request at a
  time (`max_in_flight = 1`, what the server does).

Two batches with `routing: cheapest`: 14 clips needing segment timestamps (the cheapest model that gives
them is `a:whisper-large-v3-turbo`) and 10 needing word timestamps (only `b:whisper-large-v3-turbo` gives
words). Decision where the issue is silent: the self-hosted server is zero-priced yet must not be the
first choice of either batch, so it is configured without timestamps; it still serves whatever the
hosted accounts cannot, as a fallback.

Afterwards: every job succeeded, with the timestamps its batch asked for; each job's `route_model` is the
cheapest model meeting its batch's needs (API and CLI); no request reached `a` or `b` once voxq knew the
account had failed (each fake's request log against the attempt rows); every job served after both
accounts failed was served by `gpu`; costs match each hosted provider's billing log request by request,
per job and per provider, and the self-hosted server's records are $0 and not estimates.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from core.db import session_scope
from core.models import Attempt, CostRecord, Job, Tenant, Transcript
from core.names import ALL_QUEUES
from tests.api_helpers import make_key, start_api_server, stop_api_server
from tests.audio_fixtures import encode
from tests.fakes.fixtures import FakeProcess, fake_openai_process
from tests.provider_support import (
    KEY_A,
    KEY_B,
    KEY_ENV_A,
    KEY_ENV_B,
    TURBO,
    V3,
    assert_costs_match_billing_logs,
    requests_after_failure,
    successful_provider,
)
from tests.support import REPO_ROOT, Stack, celery_worker, run_voxq
from tests.third_party import faster_whisper_server

pytestmark = pytest.mark.e2e

TENANT = "e2e-provider-outages"
SEGMENT_CLIPS, WORD_CLIPS = 14, 10
A_QUOTA_AFTER, B_REVOKED_AFTER = 4, 4
CLIP_SECONDS = 4.0
RUN_TIMEOUT = 200.0
A_TURBO, A_V3, B_TURBO, GPU = f"a:{TURBO}", f"a:{V3}", f"b:{TURBO}", "gpu:whisper-base"


def speech_clips(count: int, first: int) -> list[bytes]:
    """`count` distinct 4 s clips of the bundled voicemails (windows at different offsets), as FLAC."""
    import av

    sources = []
    for name in (
        "voicemail-dentist.flac",
        "voicemail-delivery.mp3",
        "voicemail-landlord.ogg",
        "voicemail-school.mp3",
    ):
        chunks = []
        with av.open(str(REPO_ROOT / "samples" / name)) as container:
            resampler = av.AudioResampler(format="flt", layout="mono", rate=16_000)
            for frame in container.decode(audio=0):
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        sources.append(np.concatenate(chunks).astype(np.float32))
    clips = []
    for i in range(first, first + count):
        samples = sources[i % len(sources)]
        start = int((0.5 + 0.8 * (i // len(sources))) * 16_000)
        window = samples[start : start + int(CLIP_SECONDS * 16_000)]
        assert window.size == int(CLIP_SECONDS * 16_000), (i, samples.size)
        clips.append(encode(window, fmt="flac"))
    return clips


def providers_file(path: Path, a: FakeProcess, b: FakeProcess, gpu_url: str) -> Path:
    path.write_text(
        f"""
[providers.a]
base_url = "{a.base_url}"
api_key_env = "{KEY_ENV_A}"
limits = {{ max_in_flight = 2 }}

[providers.a.models.{TURBO}]
price = {{ per_minute = "0.0005" }}
capabilities = {{ timestamps = "segment", response_formats = ["json", "text", "verbose_json"] }}

[providers.a.models.{V3}]
price = {{ per_minute = "0.0012" }}
capabilities = {{ timestamps = "none", response_formats = ["json", "text"] }}

[providers.b]
base_url = "{b.base_url}"
api_key_env = "{KEY_ENV_B}"
limits = {{ max_in_flight = 2 }}

[providers.b.models.{TURBO}]
price = {{ per_minute = "0.0006", min_billed_seconds = 10 }}
capabilities = {{ timestamps = "word", response_formats = ["json", "text", "verbose_json"] }}

[providers.gpu]
base_url = "{gpu_url}"
limits = {{ max_in_flight = 1 }}

[providers.gpu.models.whisper-base]
price = "zero"
capabilities = {{ timestamps = "none", response_formats = ["json"] }}
"""
    )
    return path


def set_up_hosts(a: FakeProcess, b: FakeProcess) -> None:
    a.set_specs(
        {
            TURBO: {
                "per_minute": "0.0005",
                "response_formats": ["json", "text", "verbose_json"],
                "words": False,
            },
            V3: {"per_minute": "0.0012", "response_formats": ["json", "text"]},
        }
    )
    b.set_specs(
        {
            TURBO: {
                "per_minute": "0.0006",
                "min_billed_seconds": 10,
                "response_formats": ["json", "text", "verbose_json"],
            }
        }
    )
    # mid-batch: each account fails after a few billed requests
    a.account(exhaust_quota_after=A_QUOTA_AFTER)
    b.account(revoke_key=KEY_B, revoke_after=B_REVOKED_AFTER)
    for fake in (a, b):  # a provider's latency, so calls overlap as they do for real
        fake.configure(TURBO, latency=0.3)


def create_batch(
    api_url: str, key: str, clips: list[bytes], prefix: str, **options: Any
) -> tuple[str, list[str]]:
    """A batch through the API: created with `options`, the clips uploaded, submitted."""
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        created = client.post("/v1/batches", json=options)
        assert created.status_code == 201, created.text
        batch_id = created.json()["id"]
        files = [("file", (f"{prefix}-{i:02d}.flac", clip, "audio/flac")) for i, clip in enumerate(clips)]
        uploaded = client.post(f"/v1/batches/{batch_id}/files", files=files)
        assert uploaded.status_code == 201, uploaded.text
        body = uploaded.json()
        jobs = [job["id"] for job in body["jobs"]]
        assert len(jobs) == len(clips), body
        submitted = client.post(f"/v1/batches/{batch_id}/submit")
        assert submitted.status_code == 202, submitted.text
    return batch_id, jobs


def wait_for_jobs(api_url: str, key: str, jobs: list[str]) -> dict[str, dict[str, Any]]:
    terminal = {"succeeded", "failed", "cancelled"}
    deadline = time.monotonic() + RUN_TIMEOUT
    shown: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        while time.monotonic() < deadline:
            shown = {job: client.get(f"/v1/jobs/{job}").json() for job in jobs}
            if all(body.get("status") in terminal for body in shown.values()):
                return shown
            time.sleep(1.0)
    statuses = Counter(body.get("status") for body in shown.values())
    raise AssertionError(f"jobs not finished after {RUN_TIMEOUT:.0f} s: {dict(statuses)}")


def wait_for_timings(api_url: str, key: str, jobs: list[str]) -> dict[str, dict[str, Any]]:
    """Each job's json export once its timings are in: the batch completes when the text is stored and
    timings follow (issue #18), computed locally when the model that answered gave none."""
    deadline = time.monotonic() + RUN_TIMEOUT
    exported: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        while time.monotonic() < deadline:
            for job in jobs:
                if job not in exported:
                    body = client.get(f"/v1/jobs/{job}/transcript", params={"format": "json"}).json()
                    if body.get("alignment", {}).get("status") != "pending":
                        exported[job] = body
            if len(exported) == len(jobs):
                return exported
            time.sleep(1.0)
    raise AssertionError(f"timings of {len(jobs) - len(exported)} jobs not in after {RUN_TIMEOUT:.0f} s")


def test_quota_out_key_revoked_and_a_self_hosted_server_serves_the_rest(stack: Stack, tmp_path: Path) -> None:
    segment_clips = speech_clips(SEGMENT_CLIPS, 0)
    word_clips = speech_clips(WORD_CLIPS, SEGMENT_CLIPS)
    with (
        fake_openai_process(tmp_path / "host-a.log", KEY_A) as a,
        fake_openai_process(tmp_path / "host-b.log", KEY_B) as b,
        faster_whisper_server(tmp_path / "fws") as gpu_url,
    ):
        set_up_hosts(a, b)
        env = {
            "VOXQ_PROVIDERS_FILE": str(providers_file(tmp_path / "providers.toml", a, b, gpu_url)),
            KEY_ENV_A: KEY_A,
            KEY_ENV_B: KEY_B,
            "OPENAI_API_KEY": "",  # the built-in OpenAI provider is not part of this run
            "VOXQ_PRIMARY_MODEL": A_TURBO,
            "VOXQ_FALLBACK_MODELS": f"{A_V3},{B_TURBO},{GPU}",
            "VOXQ_MAX_IN_FLIGHT": "2",
            "VOXQ_CIRCUIT_OPEN_SECONDS": "600",
            "VOXQ_RETRY_BASE_SECONDS": "0.05",
            "VOXQ_RETRY_MAX_SECONDS": "0.5",
        }
        key = make_key(TENANT)
        api = start_api_server(stack, **env)
        try:
            with celery_worker(stack, env=env, queues=",".join(ALL_QUEUES), concurrency=2):
                segment_batch, segment_jobs = create_batch(
                    api.url,
                    key,
                    segment_clips,
                    "seg",
                    routing="cheapest",
                    timestamps="segment",
                    language="en",
                )
                word_batch, word_jobs = create_batch(
                    api.url, key, word_clips, "word", routing="cheapest", timestamps="word", language="en"
                )
                shown = wait_for_jobs(api.url, key, segment_jobs + word_jobs)
                exported = wait_for_timings(api.url, key, segment_jobs + word_jobs)
                cli = {
                    job: run_voxq(
                        ["status", job],
                        stack.child_env(VOXQ_API_URL=api.url, VOXQ_API_KEY=key, **env),
                        timeout=60,
                    )
                    for job in (segment_jobs[0], word_jobs[0])
                }
        finally:
            stop_api_server(api)
        a_requests, b_requests = a.request_log(), b.request_log()
        billing = {"a": a.billing_log(), "b": b.billing_log()}

    # every job succeeded, routed to the cheapest model meeting its batch's needs (API and CLI)
    failed = {
        job: (body.get("status"), body.get("error"))
        for job, body in shown.items()
        if body.get("status") != "succeeded"
    }
    assert failed == {}, failed
    for jobs, expected in ((segment_jobs, A_TURBO), (word_jobs, B_TURBO)):
        for job in jobs:
            assert shown[job]["route_model"] == expected, shown[job]
            assert "cheapest" in shown[job]["route_reason"], shown[job]
    for job, done in cli.items():
        assert done.returncode == 0, done.stdout + done.stderr
        assert shown[job]["route_model"] in done.stdout and shown[job]["route_reason"] in done.stdout, (
            done.stdout
        )

    with session_scope() as session:
        tenant = session.scalars(select(Tenant).where(Tenant.name == TENANT)).one()
        jobs = session.scalars(select(Job).where(Job.tenant_id == tenant.id)).all()
        attempts = session.scalars(select(Attempt).where(Attempt.tenant_id == tenant.id)).all()
        costs = session.scalars(select(CostRecord).where(CostRecord.tenant_id == tenant.id)).all()
        transcripts = {
            str(t.job_id): t
            for t in session.scalars(select(Transcript).where(Transcript.tenant_id == tenant.id))
        }
        session.expunge_all()
    assert len(jobs) == SEGMENT_CLIPS + WORD_CLIPS

    # no request reached a provider once voxq knew its account had failed
    by_id = {str(attempt.id): attempt for attempt in attempts}
    for name, log, code in (("a", a_requests, "insufficient_quota"), ("b", b_requests, "invalid_api_key")):
        assert any(r["code"] == code for r in log), (name, Counter(r["code"] for r in log))
        late = requests_after_failure(log, by_id)
        assert late == [], f"{len(late)} requests reached {name} after its account failed: {late}"
    assert [r for r in a_requests if r["model"] == V3] == []  # a's other model: skipped without a request

    # who served what: each hosted account until it failed, the self-hosted server the rest
    served = Counter(successful_provider(attempts, job.id) for job in jobs)
    assert served[("a", TURBO)] == len(billing["a"]) == A_QUOTA_AFTER
    assert served[("b", TURBO)] == len(billing["b"]) >= B_REVOKED_AFTER
    assert served[("gpu", "whisper-base")] == len(jobs) - served[("a", TURBO)] - served[("b", TURBO)] > 0
    assert set(served) == {("a", TURBO), ("b", TURBO), ("gpu", "whisper-base")}, served

    # the timestamps each batch asked for, whoever served the job (the model's own, or aligned locally)
    for job_id in segment_jobs + word_jobs:
        body = exported[job_id]
        assert transcripts[job_id].text and body["segments"], (job_id, body["alignment"])
        assert all(seg["end"] > seg["start"] for seg in body["segments"]), job_id
        if job_id in word_jobs:
            assert body["words"], (job_id, transcripts[job_id].model, body["alignment"])

    # costs: each hosted provider's invoice, request by request, per job and provider; $0 for gpu
    assert_costs_match_billing_logs(billing, attempts, costs, jobs, zero_priced=["gpu"])
    gpu_costs = [c for c in costs if by_id[str(c.attempt_id)].provider == "gpu"]
    assert gpu_costs and all(not c.usd and not c.estimated for c in gpu_costs)
    print(
        json.dumps(
            {
                "served": {f"{p}:{m}": n for (p, m), n in served.items()},
                "invoiced": {name: str(sum(float(e["usd"]) for e in log)) for name, log in billing.items()},
                "segment_batch": segment_batch,
                "word_batch": word_batch,
            }
        )
    )
