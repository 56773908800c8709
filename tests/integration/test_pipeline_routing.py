"""Routing by need (issue #17) through the API and the prepare and transcribe stages in this process, with
the fake provider: `routing = cheapest` picks, per file, the cheapest model of the chain that meets the
batch's needs (minimum billed seconds included), records it on the job (`route_model`, `route_reason` in
GET /v1/jobs/{id}), and the request goes to that model; dedupe pairs twins only when their routes agree."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api_helpers import make_key
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import PRIMARY, SECOND, Pipeline, tones

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process

CHEAP = "cheap-words"  # declared below: the lowest price per minute, word timestamps, a 60 s minimum
PROVIDERS = f"""
[providers.openai.models.{CHEAP}]
price = {{ per_minute = "0.001", min_billed_seconds = 60 }}
capabilities = {{ timestamps = "word", response_formats = ["json", "verbose_json"] }}
"""


@pytest.fixture
def client(
    pipeline: Pipeline, fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    """The API in this process; the chain gpt-4o-mini-transcribe, whisper-1, cheap-words."""
    from api.main import create_app
    from core.settings import reset_settings_cache

    path = tmp_path / "providers.toml"
    path.write_text(PROVIDERS)
    monkeypatch.setenv("VOXQ_PROVIDERS_FILE", str(path))
    monkeypatch.setenv("VOXQ_FALLBACK_MODELS", f"{SECOND},{CHEAP}")
    reset_settings_cache()
    fake_openai.add_model(CHEAP)
    key = make_key(f"route-{uuid.uuid4().hex[:8]}")
    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def _submit(c: TestClient, data: bytes, **options: Any) -> uuid.UUID:
    batch = c.post("/v1/batches", json=options)
    assert batch.status_code == 201, batch.text
    jobs = c.post(f"/v1/batches/{batch.json()['id']}/files", files=[("file", ("a.wav", data, "audio/wav"))])
    assert jobs.status_code in (200, 201), jobs.text
    assert c.post(f"/v1/batches/{batch.json()['id']}/submit").status_code == 202
    return uuid.UUID(jobs.json()["jobs"][0]["id"])


def _run(job_ids: list[uuid.UUID]) -> None:
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    rt = get_runtime()
    for group in prepare_jobs(job_ids, owner="test:1").groups:
        rt.run(transcribe_group(rt, group))


def test_cheapest_routes_each_job_to_the_cheapest_model_meeting_its_needs(
    client: TestClient, pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    # a short file (a few seconds): cheap-words bills its 60 s minimum, so whisper-1 is cheaper for it
    words = _submit(client, tones(440, 880), routing="cheapest", timestamps="word")
    plain = _submit(client, tones(500, 700), routing="cheapest")
    chain = _submit(client, tones(600, 900), timestamps="word")
    _run([words, plain, chain])

    got = {job: client.get(f"/v1/jobs/{job}").json() for job in (words, plain, chain)}
    assert {body["status"] for body in got.values()} == {"succeeded"}, got
    # routes name chain entries: provider:model
    assert got[words]["route_model"] == f"openai:{SECOND}"
    reason = got[words]["route_reason"]
    assert reason.startswith(f"cheapest meeting timestamps=word: openai:{SECOND} $0.000"), reason
    assert reason.endswith(f"< openai:{CHEAP} $0.0010 (60 s minimum)"), reason
    assert got[plain]["route_model"] == f"openai:{PRIMARY}"  # no needs: gpt-4o-mini-transcribe's $0.003/min
    # the expected costs of this file: its trimmed seconds at the list prices ($0.003 and $0.006 a minute)
    seconds = Decimal(str(pipeline.jobs([plain])[plain].speech_seconds))
    mini, whisper = (f"${p * seconds / 60:.6f}" for p in (Decimal("0.003"), Decimal("0.006")))
    assert got[plain]["route_reason"] == f"cheapest: openai:{PRIMARY} {mini} < openai:{SECOND} {whisper}"
    assert (got[chain]["route_model"], got[chain]["route_reason"]) == (f"openai:{PRIMARY}", "chain order")
    # the request went to the chosen model, and only to it
    for job, model in ((words, SECOND), (plain, PRIMARY), (chain, PRIMARY)):
        assert [a.model for a in pipeline.attempts(job)] == [model]
        assert got[job]["model"] == model
    assert sorted(str(r.get("model")) for r in fake_openai.request_log()) == [PRIMARY, PRIMARY, SECOND]
    batch = client.get(f"/v1/batches/{got[words]['batch_id']}").json()
    assert (batch["routing"], batch["diarize"]) == ("cheapest", False)
    assert batch["routes"] == {f"openai:{SECOND}": 1}  # its one job's route
    # files of one batch routed apart: a 12 s one costs less on cheap-words ($0.001 for its 60 s minimum
    # against whisper-1's $0.0012); jobs per route in the batch's view, most first; lists say null
    b = client.post("/v1/batches", json={"routing": "cheapest", "timestamps": "word"}).json()["id"]
    audio = [tones(300), tones(350), tones(400, seconds=12.0)]
    files = [("file", (f"{n}.wav", data, "audio/wav")) for n, data in enumerate(audio)]
    ids = [uuid.UUID(j["id"]) for j in client.post(f"/v1/batches/{b}/files", files=files).json()["jobs"]]
    assert client.post(f"/v1/batches/{b}/submit").status_code == 202
    _run(ids)
    routes = client.get(f"/v1/batches/{b}").json()["routes"]
    assert list(routes.items()) == [(f"openai:{SECOND}", 2), (f"openai:{CHEAP}", 1)]
    assert {item["routes"] for item in client.get("/v1/batches").json()["items"]} == {None}


def test_invalid_routing_options_are_refused_with_stable_codes(client: TestClient) -> None:
    bad = client.post("/v1/batches", json={"routing": "cheap"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_routing"
    assert bad.headers["content-type"].startswith("application/problem+json")
    bad = client.post("/v1/batches", json={"diarize": "yes"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_diarize"
    ok = client.post("/v1/batches", json={"routing": "cheapest", "diarize": True})
    assert ok.status_code == 201 and (ok.json()["routing"], ok.json()["diarize"]) == ("cheapest", True)
    # POST /v1/jobs takes them as form fields
    files = [("file", ("a.wav", tones(440), "audio/wav"))]
    single = client.post("/v1/jobs", files=files, data={"routing": "cheapest", "diarize": "true"})
    assert single.status_code == 202, single.text
    batch = client.get(f"/v1/batches/{single.json()['batch_id']}").json()
    assert (batch["routing"], batch["diarize"]) == ("cheapest", True)
    for field, value, code in (
        ("routing", "cheap", "invalid_routing"),
        ("diarize", "maybe", "invalid_diarize"),
    ):
        bad = client.post("/v1/jobs", files=files, data={field: value})
        assert bad.status_code == 422 and bad.json()["code"] == code, bad.text


def test_a_twin_in_flight_is_followed_only_when_its_route_starts_alike(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    from worker.prepare import prepare_jobs

    tenant = pipeline.tenant()
    audio = tones(830)
    # same models (the worker's chain), but routed to whisper-1 first (it gives word timestamps)
    leader = pipeline.job(tenant, pipeline.batch(tenant, routing="cheapest", timestamps="word"), audio)
    assert len(prepare_jobs([leader], owner="test:1").groups) == 1
    as_chain = pipeline.job(tenant, pipeline.batch(tenant, timestamps="word"), audio)
    same_route = pipeline.job(tenant, pipeline.batch(tenant, routing="cheapest", timestamps="word"), audio)
    groups = prepare_jobs([as_chain, same_route], owner="test:2").groups
    rows = pipeline.jobs([leader, as_chain, same_route])
    assert rows[as_chain].deduplicated_from_id is None and len(groups) == 1  # leads on its own
    assert rows[same_route].deduplicated_from_id == leader
    assert (rows[leader].route_model, rows[as_chain].route_model) == (
        f"openai:{SECOND}",
        f"openai:{PRIMARY}",
    )


def test_a_job_routed_anew_at_transcribe_time_records_the_route_it_ran(
    client: TestClient,
    pipeline: Pipeline,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prepare routes a word-timestamps job to whisper-1 (cheap-words bills a 60 s minimum); the transcribe
    worker restarts with a providers file without that minimum, so the job goes to cheap-words, and its
    record (GET /v1/jobs/{id}) names the route it ran, not the one prepare chose."""
    from core.settings import reset_settings_cache
    from worker.prepare import prepare_jobs
    from worker.runtime import close_runtime, get_runtime
    from worker.transcribe import transcribe_group

    job = _submit(client, tones(440, 880), routing="cheapest", timestamps="word")
    groups = prepare_jobs([job], owner="test:1").groups
    assert client.get(f"/v1/jobs/{job}").json()["route_model"] == f"openai:{SECOND}"

    changed = tmp_path / "providers-v2.toml"
    changed.write_text(PROVIDERS.replace("min_billed_seconds = 60", "min_billed_seconds = 0"))
    monkeypatch.setenv("VOXQ_PROVIDERS_FILE", str(changed))
    reset_settings_cache()
    close_runtime()  # the transcribe worker's restart with the new file
    rt = get_runtime()
    for group in groups:
        rt.run(transcribe_group(rt, group))

    body = client.get(f"/v1/jobs/{job}").json()
    assert body["status"] == "succeeded", body
    assert [a.model for a in pipeline.attempts(job)] == [CHEAP]
    assert body["route_model"] == f"openai:{CHEAP}"
    assert body["route_reason"].startswith(f"cheapest meeting timestamps=word: openai:{CHEAP} $0.000"), body


def test_a_route_recorded_at_transcribe_time_never_touches_a_job_that_ended_meanwhile(
    pipeline: Pipeline,
) -> None:
    """record_route races a cancel: it writes only a job still processing (compare-and-set on status)."""
    from sqlalchemy import update

    from core.db import session_scope
    from core.models import Job
    from worker.store.groups import record_route

    tenant = pipeline.tenant()
    running, cancelled = (pipeline.job(tenant, pipeline.batch(tenant), tones(440)) for _ in range(2))
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == running).values(status="processing", route_model="a:x"))
        session.execute(update(Job).where(Job.id == cancelled).values(status="cancelled", route_model="a:x"))
    for job in (running, cancelled):
        record_route(job, "b:" + "y" * 200, "chain order")
    rows = pipeline.jobs([running, cancelled])
    assert (rows[running].route_model, rows[running].route_reason) == ("b:" + "y" * 98, "chain order")
    assert (rows[cancelled].route_model, rows[cancelled].route_reason) == ("a:x", None)
