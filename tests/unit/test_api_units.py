"""API building blocks without I/O: transcript export, filenames, cursors, idempotency hashing, problems."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from api.deps import KeyCache, TenantContext
from api.idempotency import canonical_json, request_hash, valid_key
from api.ingest import clean_filename
from api.main import create_app
from api.problems import Problem
from api.queries import decode_cursor, encode_cursor
from api.transcripts import render, to_srt, to_vtt
from core.models import Job, Transcript


def _transcript(segments: list[dict[str, object]] | None) -> Transcript:
    return Transcript(text="hi there", segments=segments, model="whisper-1", language="en")


def test_srt_and_vtt_use_original_file_time() -> None:
    t = _transcript(
        [{"start": 0.0, "end": 0.5, "text": " hi"}, {"start": 3725.0049, "end": 3726.9996, "text": "there "}]
    )
    assert to_srt(t) == "1\n00:00:00,000 --> 00:00:00,500\nhi\n\n2\n01:02:05,005 --> 01:02:07,000\nthere\n"
    assert (
        to_vtt(t) == "WEBVTT\n\n00:00:00.000 --> 00:00:00.500\nhi\n\n01:02:05.005 --> 01:02:07.000\nthere\n"
    )


@pytest.mark.parametrize(
    "segments", [None, [], [{"start": 0, "end": 1, "text": "  "}], [{"text": "no times"}]]
)
def test_srt_without_timestamps_is_a_409_problem(segments: list[dict[str, object]] | None) -> None:
    with pytest.raises(Problem) as caught:
        to_srt(_transcript(segments))
    assert caught.value.status == 409 and caught.value.code == "timestamps_unavailable"


def test_render_txt_and_json() -> None:
    job = Job(id=uuid.uuid4(), duration_seconds=1.5)
    t = _transcript(None)
    assert render(job, t, "txt") == ("hi there", "text/plain; charset=utf-8")
    body, media = render(job, t, "json")
    assert media == "application/json" and body["text"] == "hi there" and body["job_id"] == str(job.id)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"caf\xc3\xa9 \xf0\x9f\x8e\xb5.mp3", "café 🎵.mp3"),
        (b"a\x00b\x07c\x1b[31m.wav", "abc[31m.wav"),
        ("line\u2028break\r\n.wav", "linebreak.wav"),
        (b"\x01\x02", None),
        (b"\xff\xfe.wav", "\ufffd\ufffd.wav"),
        ("../../x.wav", "../../x.wav"),
        (None, None),
    ],
)
def test_clean_filename_keeps_unicode_and_drops_control_characters(
    raw: bytes | str | None, expected: str | None
) -> None:
    assert clean_filename(raw) == expected


def test_cursor_round_trip_and_garbage() -> None:
    ident = uuid.uuid4()
    assert decode_cursor(encode_cursor(ident)) == ident
    assert decode_cursor(None) is None
    for bad in ("!!", "abcd", "a" * 30):
        with pytest.raises(Problem) as caught:
            decode_cursor(bad)
        assert caught.value.code == "invalid_cursor"


def test_request_hash_ignores_json_key_order_but_not_values() -> None:
    a = request_hash("POST", "/v1/batches", "", canonical_json(b'{"a": 1, "b": [1, 2]}'))
    b = request_hash("POST", "/v1/batches", "", canonical_json(b'{"b":[1,2],"a":1}'))
    c = request_hash("POST", "/v1/batches", "", canonical_json(b'{"a": 2, "b": [1, 2]}'))
    d = request_hash("POST", "/v1/batches/x/submit", "", canonical_json(b'{"a": 1, "b": [1, 2]}'))
    assert a == b and len({a, c, d}) == 3
    assert canonical_json(b"not json") == b"not json" and canonical_json(b"  ") == b""
    assert valid_key("abc-123") and not valid_key("") and not valid_key("x" * 256) and not valid_key("é")


def test_framework_errors_are_problem_documents() -> None:
    client = TestClient(create_app(), raise_server_exceptions=False)
    cases = [
        (client.get("/v1/batches"), 401, "unauthorized"),
        (client.get("/v1/batches", headers={"Authorization": "Basic abc"}), 401, "unauthorized"),
        (client.get("/nope"), 404, "not_found"),
        (client.delete("/v1/batches"), 405, "method_not_allowed"),
    ]
    for resp, status, code in cases:
        assert resp.status_code == status
        assert resp.headers["content-type"] == "application/problem+json"
        body = resp.json()
        assert (
            body["code"] == code and body["status"] == status and body["type"] == f"urn:voxq:problem:{code}"
        )
        assert body["title"] and body["detail"]
    assert client.get("/v1/batches").headers["www-authenticate"].startswith("Bearer")


def test_openapi_documents_bearer_auth_and_multipart_uploads() -> None:
    spec = create_app().openapi()
    assert any(s.get("scheme") == "bearer" for s in spec["components"]["securitySchemes"].values())
    files = spec["paths"]["/v1/batches/{batch_id}/files"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in files
    create = spec["components"]["schemas"]["BatchCreate"]
    assert create.get("additionalProperties") is False
    job_404 = spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["404"]["content"]
    assert job_404["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/ProblemDocument"}
    assert set(spec["components"]["schemas"]["ProblemDocument"]["required"]) == {
        "type",
        "title",
        "status",
        "detail",
        "code",
    }
    assert "413" in spec["paths"]["/v1/batches/{batch_id}/files"]["post"]["responses"]


def test_key_cache_forgets_an_entry_after_its_ttl() -> None:
    now = [100.0]
    cache = KeyCache(clock=lambda: now[0])
    tenant = TenantContext(tenant_id=uuid.uuid4(), key_id=uuid.uuid4())
    assert cache.get("h", ttl=5) is None  # unknown keys are never answered from the cache
    cache.put("h", tenant)
    now[0] += 4.9
    assert cache.get("h", ttl=5) == tenant
    now[0] += 0.1
    assert cache.get("h", ttl=5) is None  # a revoked key is refused once its entry is TTL old
    assert cache.get("other", ttl=5) is None


def test_key_cache_is_bounded() -> None:
    cache = KeyCache(clock=lambda: 0.0)
    tenant = TenantContext(tenant_id=uuid.uuid4(), key_id=uuid.uuid4())
    for i in range(KeyCache.MAX_ENTRIES + 5):
        cache.put(str(i), tenant)
    assert len(cache._entries) <= KeyCache.MAX_ENTRIES
    assert cache.get(str(KeyCache.MAX_ENTRIES + 4), ttl=1) == tenant


def test_concurrent_lookups_of_one_key_share_one_database_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import threading
    import time

    from api import deps

    calls: list[str] = []
    tenant = TenantContext(tenant_id=uuid.uuid4(), key_id=uuid.uuid4())

    def slow_lookup(plaintext: str) -> TenantContext:
        calls.append(threading.current_thread().name)
        time.sleep(0.2)
        return tenant

    monkeypatch.setattr(deps, "resolve_tenant", slow_lookup)
    key = f"vq_single-flight-{uuid.uuid4().hex}"

    async def burst() -> list[TenantContext | None]:
        return list(await asyncio.gather(*(deps.tenant_for_key(key) for _ in range(20))))

    assert asyncio.run(burst()) == [tenant] * 20
    assert len(calls) == 1
    assert not deps._lookups  # nothing left in flight


def test_waiters_look_up_themselves_when_the_shared_lookup_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import time

    from api import deps

    tenant = TenantContext(tenant_id=uuid.uuid4(), key_id=uuid.uuid4())
    calls = 0

    def flaky_lookup(plaintext: str) -> TenantContext:
        nonlocal calls
        calls += 1
        time.sleep(0.1)
        if calls == 1:
            raise RuntimeError("database blip")
        return tenant

    monkeypatch.setattr(deps, "resolve_tenant", flaky_lookup)
    key = f"vq_flaky-{uuid.uuid4().hex}"

    async def burst() -> list[object]:
        return list(
            await asyncio.gather(*(deps.tenant_for_key(key) for _ in range(3)), return_exceptions=True)
        )

    results = asyncio.run(burst())
    assert isinstance(results[0], RuntimeError)  # the leader meets the error
    assert results[1:] == [tenant, tenant]  # the others were not failed by it


def test_key_cache_entry_is_due_for_refresh_before_its_ttl() -> None:
    now = [100.0]
    cache = KeyCache(clock=lambda: now[0])
    tenant = TenantContext(tenant_id=uuid.uuid4(), key_id=uuid.uuid4())
    assert not cache.due("h", ttl=5)  # nothing cached: nothing to refresh
    cache.put("h", tenant)
    now[0] += 5 * KeyCache.REFRESH_AFTER - 0.01
    assert not cache.due("h", ttl=5)
    now[0] += 0.01
    assert cache.due("h", ttl=5) and cache.get("h", ttl=5) == tenant  # due, and still answering
    cache.drop("h")
    assert cache.get("h", ttl=5) is None and not cache.due("h", ttl=5)


def _key_cache_scenario(monkeypatch: pytest.MonkeyPatch, lookup: object) -> tuple[list[float], float]:
    """A fake clock for the process's key cache and a stand-in for the database lookup."""
    from api import deps
    from core.settings import get_settings

    now = [1000.0]
    monkeypatch.setattr(deps, "_key_cache", KeyCache(clock=lambda: now[0]))
    monkeypatch.setattr(deps, "resolve_tenant", lookup)
    ttl = get_settings().auth_cache_seconds
    assert ttl > 0
    return now, ttl


def test_a_key_in_steady_use_never_waits_for_its_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """P4b: the first request after a busy key's entry expired made every request of the key wait for
    the lookup; now the entry is refreshed in the background before it expires."""
    import asyncio
    import threading

    from api import deps

    tenant = TenantContext(tenant_id=uuid.uuid4(), key_id=uuid.uuid4())
    release = threading.Event()
    calls: list[float] = []

    def lookup(plaintext: str) -> TenantContext:
        calls.append(now[0])
        if len(calls) > 1:
            assert release.wait(10)  # the refresh is slow: requests meanwhile must not wait for it
        return tenant

    now, ttl = _key_cache_scenario(monkeypatch, lookup)
    key = f"vq_steady-{uuid.uuid4().hex}"

    async def scenario() -> None:
        assert await deps.tenant_for_key(key) == tenant  # first use: looked up
        now[0] += 0.5 * ttl
        assert await deps.tenant_for_key(key) == tenant  # fresh entry: no lookup
        assert len(calls) == 1
        now[0] += 0.35 * ttl  # past REFRESH_AFTER of the TTL
        assert await asyncio.wait_for(deps.tenant_for_key(key), 2) == tenant  # answered from the entry
        for _ in range(100):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(calls) == 2  # ... and one lookup started in the background
        assert await asyncio.wait_for(deps.tenant_for_key(key), 2) == tenant  # no second one
        release.set()
        for _ in range(200):
            if not deps._lookups and not deps._refreshes:
                break
            await asyncio.sleep(0.01)
        assert not deps._lookups and not deps._refreshes
        now[0] += 0.5 * ttl  # the first entry would have expired; the refreshed one answers
        assert await asyncio.wait_for(deps.tenant_for_key(key), 2) == tenant
        assert len(calls) == 2

    asyncio.run(scenario())


def test_a_refresh_that_finds_the_key_revoked_drops_it_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from api import deps

    tenant = TenantContext(tenant_id=uuid.uuid4(), key_id=uuid.uuid4())
    answers: list[TenantContext | None] = [tenant, None, None]

    def lookup(plaintext: str) -> TenantContext | None:
        return answers.pop(0)

    now, ttl = _key_cache_scenario(monkeypatch, lookup)
    key = f"vq_revoked-{uuid.uuid4().hex}"

    async def scenario() -> None:
        assert await deps.tenant_for_key(key) == tenant
        now[0] += 0.9 * ttl
        assert await deps.tenant_for_key(key) == tenant  # still within the TTL: answered, refresh started
        for _ in range(200):
            if not deps._refreshes:
                break
            await asyncio.sleep(0.01)
        assert await deps.tenant_for_key(key) is None  # the refresh saw the revocation: refused now
        assert answers == []

    asyncio.run(scenario())


def test_a_failed_refresh_leaves_the_entry_to_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from api import deps

    tenant = TenantContext(tenant_id=uuid.uuid4(), key_id=uuid.uuid4())
    calls = 0

    def lookup(plaintext: str) -> TenantContext:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("database down")
        return tenant

    now, ttl = _key_cache_scenario(monkeypatch, lookup)
    key = f"vq_refresh-fails-{uuid.uuid4().hex}"

    async def scenario() -> None:
        assert await deps.tenant_for_key(key) == tenant
        now[0] += 0.9 * ttl
        assert await deps.tenant_for_key(key) == tenant  # the refresh fails in the background
        for _ in range(200):
            if not deps._refreshes:
                break
            await asyncio.sleep(0.01)
        assert calls == 2 and not deps._lookups
        now[0] += 0.2 * ttl  # past the TTL: the request looks the key up itself and meets the error
        with pytest.raises(RuntimeError):
            await deps.tenant_for_key(key)

    asyncio.run(scenario())


def _aligned(status: str, **doc: object) -> Transcript:
    t = _transcript([{"start": 0.0, "end": 30.0, "text": "Hello there. How are you?"}])
    t.alignment = {"status": status, "timestamps": "word", "token": "secret-token", **doc}
    return t


def test_srt_uses_aligned_cues_and_says_so() -> None:
    from api.transcripts import cue_headers

    t = _aligned(
        "aligned",
        segments=[
            {"start": 0.5, "end": 1.4, "text": "Hello there."},
            {"start": 2.0, "end": 3.1, "text": "How are you?"},
        ],
        words=[{"word": "Hello", "start": 0.5, "end": 0.9}, {"word": "there.", "start": 1.0, "end": 1.4}],
    )
    assert to_srt(t) == (
        "1\n00:00:00,500 --> 00:00:01,400\nHello there.\n\n2\n00:00:02,000 --> 00:00:03,100\nHow are you?\n"
    )
    assert cue_headers(t) == {"X-Voxq-Cues": "aligned", "X-Voxq-Alignment": "aligned"}
    assert "NOTE" not in to_vtt(t)
    body, _ = render(Job(id=uuid.uuid4(), duration_seconds=30.0), t, "json")
    assert body["words"] == [
        {"word": "Hello", "start": 0.5, "end": 0.9},
        {"word": "there.", "start": 1.0, "end": 1.4},
    ]
    assert body["segments"][1] == {"start": 2.0, "end": 3.1, "text": "How are you?"}
    assert body["alignment"] == {"status": "aligned", "timestamps": "word"}  # no token, no timings twice


@pytest.mark.parametrize("status", ["failed", "pending"])
def test_srt_falls_back_to_chunk_cues_with_a_flag_when_alignment_failed(status: str) -> None:
    from api.transcripts import cue_headers

    t = _aligned(status, reason="no_speech" if status == "failed" else None, segments=[], words=[])
    assert to_srt(t) == "1\n00:00:00,000 --> 00:00:30,000\nHello there. How are you?\n"
    expected = "failed; reason=no_speech" if status == "failed" else "pending"
    assert cue_headers(t) == {"X-Voxq-Cues": "transcript", "X-Voxq-Alignment": expected}
    assert to_vtt(t).startswith("WEBVTT\n\nNOTE voxq: cues are the transcript's own segments")
    body, _ = render(Job(id=uuid.uuid4(), duration_seconds=30.0), t, "json")
    assert body["words"] == [] and body["segments"] == t.segments and body["alignment"]["status"] == status


def test_timestamps_option_is_validated_with_a_stable_code() -> None:
    from pydantic import ValidationError

    from api.problems import validation_code
    from api.schemas import AlignRequest, BatchOptions

    assert BatchOptions(timestamps="word").timestamps == "word"
    for bad in ("words", "", "WORD"):
        with pytest.raises(ValidationError) as caught:
            BatchOptions(timestamps=bad)
        assert validation_code([e["type"] for e in caught.value.errors()]) == "invalid_timestamps"
    with pytest.raises(ValidationError) as caught:
        AlignRequest(timestamps="none")
    assert validation_code([e["type"] for e in caught.value.errors()]) == "invalid_timestamps"


def test_routing_and_diarize_options_are_validated_with_stable_codes() -> None:
    from pydantic import ValidationError

    from api.problems import validation_code
    from api.schemas import BatchOptions, JobOut

    assert (BatchOptions().routing, BatchOptions().diarize) == ("chain", False)
    assert BatchOptions(routing="cheapest", diarize=True).routing == "cheapest"
    for bad in ("cheap", "", "CHAIN", 1):
        with pytest.raises(ValidationError) as caught:
            BatchOptions(routing=bad)  # type: ignore[arg-type]
        assert validation_code([e["type"] for e in caught.value.errors()]) == "invalid_routing"
    for not_bool in ("yes", 2, None):
        with pytest.raises(ValidationError) as caught:
            BatchOptions(diarize=not_bool)  # type: ignore[arg-type]
        assert validation_code([e["type"] for e in caught.value.errors()]) == "invalid_diarize"
    assert {"route_reason", "route_model"} <= set(JobOut.model_fields)
