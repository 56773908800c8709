"""The fake OpenAI server is faithful (driven by the official `openai` SDK) and scriptable (by our client)."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from core.pricing import price_attempt
from core.providers.base import ErrorKind, ProviderError, TranscriptionRequest, TranscriptionResult
from core.providers.openai import OpenAIProvider, list_models, retiring_models
from tests.audio_fixtures import encode, tone_samples, tones
from tests.fakes.fixtures import FAKE_OPENAI_API_KEY, fake_openai_process
from tests.fakes.openai_server import FakeOpenAI, Fault, ModelSpec
from tests.support import REPO_ROOT, transcription_request, wait_until
from voxq.embedded import free_port, wait_for_port

MINI = "gpt-4o-mini-transcribe"


def _sdk(fake: FakeOpenAI, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key=FAKE_OPENAI_API_KEY, **kwargs)


def _provider_call(
    fake: FakeOpenAI, requests: list[TranscriptionRequest], *, timeout: float = 10.0
) -> list[TranscriptionResult | BaseException]:
    async def run() -> list[TranscriptionResult | BaseException]:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
        async with httpx.AsyncClient(limits=limits) as client:
            provider = OpenAIProvider(
                client, base_url=fake.base_url, api_key=FAKE_OPENAI_API_KEY, timeout=timeout
            )
            return await asyncio.gather(*[provider.transcribe(r) for r in requests], return_exceptions=True)

    return asyncio.run(run())


_req = transcription_request


# ---- faithful: the official SDK talks to it ----


def test_sdk_transcribes_with_token_usage(fake_openai: FakeOpenAI) -> None:
    audio = tones([440, 880, 1320])  # 0.2 s lead + 3 x (0.4 s tone + 0.3 s gap) = 2.3 s
    result = _sdk(fake_openai).audio.transcriptions.create(
        model=MINI, file=("clip.flac", audio, "audio/flac"), extra_headers={"X-Client-Request-Id": "att-1"}
    )
    assert result.text == "tone440 tone880 tone1320"
    assert result.usage is not None and result.usage.type == "tokens"
    details = result.usage.input_token_details
    assert details is not None and details.audio_tokens == math.ceil(2.3 * 10)
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens
    [billed] = fake_openai.billing_log()
    assert billed["request_id"] == "att-1" and billed["model"] == MINI
    assert billed["usage"] == result.usage.model_dump(exclude_none=True)
    assert billed["audio_seconds"] == pytest.approx(2.3, abs=0.01)


def test_sdk_whisper_verbose_json_with_timestamps(fake_openai: FakeOpenAI) -> None:
    result = _sdk(fake_openai).audio.transcriptions.create(
        model="whisper-1",
        file=("clip.wav", tones([500, 1000], fmt="wav"), "audio/wav"),
        response_format="verbose_json",
        timestamp_granularities=["segment", "word"],
    )
    assert result.text == "tone500 tone1000"
    assert result.usage is not None and result.usage.type == "duration" and result.usage.seconds == 2
    assert result.segments is not None and [s.text for s in result.segments] == [" tone500", " tone1000"]
    assert result.segments[0].start == pytest.approx(0.2, abs=0.03)
    assert result.segments[1].start == pytest.approx(0.9, abs=0.03)
    assert result.words is not None and [w.word for w in result.words] == ["tone500", "tone1000"]


def test_sdk_parses_error_bodies_into_the_right_exceptions(fake_openai: FakeOpenAI) -> None:
    client = _sdk(fake_openai, max_retries=0)
    audio = tones([440])
    cases: list[tuple[Fault | str, type[openai.APIStatusError], str | None, int]] = [
        ("quota", openai.RateLimitError, "insufficient_quota", 429),
        ("rate_limit", openai.RateLimitError, "rate_limit_exceeded", 429),
        ("model_not_found", openai.NotFoundError, "model_not_found", 404),
        ("invalid_file", openai.BadRequestError, "invalid_value", 400),
        ("auth", openai.AuthenticationError, "invalid_api_key", 401),
        (Fault("server_error", status=503), openai.InternalServerError, None, 503),
        ("too_large", openai.APIStatusError, None, 413),
    ]
    fake_openai.script(MINI, [fault for fault, *_ in cases])
    for fault, exc_type, code, status in cases:
        with pytest.raises(exc_type) as info:
            client.audio.transcriptions.create(model=MINI, file=("a.flac", audio, "audio/flac"))
        assert info.value.status_code == status, fault
        assert info.value.code == code, fault
        assert info.value.response.headers["x-request-id"].startswith("req_")
    with pytest.raises(openai.BadRequestError) as bad:
        client.audio.transcriptions.create(model=MINI, file=("a.flac", b"\x00garbage" * 50, "audio/flac"))
    assert bad.value.param == "file" and bad.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as fmt:
        client.audio.transcriptions.create(model=MINI, file=("notes.txt", audio, "text/plain"))
    assert "Invalid file format" in fmt.value.message
    with pytest.raises(openai.BadRequestError) as verbose:
        client.audio.transcriptions.create(
            model=MINI, file=("a.flac", audio, "audio/flac"), response_format="verbose_json"
        )
    assert verbose.value.param == "response_format"
    # The SDK refuses to send no key at all; a bare client gets OpenAI's 401.
    missing = httpx.get(fake_openai.base_url + "/models")
    assert missing.status_code == 401 and "didn't provide an API key" in missing.json()["error"]["message"]
    assert fake_openai.billing_log() == []


def test_sdk_honours_retry_after_ms_in_its_own_retry(fake_openai: FakeOpenAI) -> None:
    # 700 ms is above the SDK's own first backoff (<= 0.5 s); retry-after (seconds) says 5, and the SDK
    # prefers retry-after-ms, as OpenAI's clients do.
    fake_openai.script(MINI, [Fault("rate_limit", retry_after_ms=700, retry_after="5")])
    started = time.monotonic()
    result = _sdk(fake_openai, max_retries=2).audio.transcriptions.create(
        model=MINI, file=("a.flac", tones([660]), "audio/flac")
    )
    elapsed = time.monotonic() - started
    assert result.text == "tone660"
    assert 0.7 <= elapsed < 3.0, elapsed
    assert [r["status"] for r in fake_openai.request_log()] == [429, 200]


def test_sdk_times_out_on_a_hanging_request(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(MINI, ["timeout"])
    client = _sdk(fake_openai, max_retries=0, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.audio.transcriptions.create(model=MINI, file=("a.flac", tones([440]), "audio/flac"))
    assert time.monotonic() - started < 3.0
    assert fake_openai.billing_log() == []


def test_sdk_lists_models_with_shutdown_dates(fake_openai: FakeOpenAI) -> None:
    fake_openai.retire("whisper-1")
    models = {m.id: m.shutdown_date for m in _sdk(fake_openai).models.list()}
    assert models == {
        "gpt-4o-mini-transcribe": "2027-02-26",
        "gpt-4o-transcribe": "2027-02-26",
        "gpt-transcribe": None,
    }
    with pytest.raises(openai.NotFoundError):
        _sdk(fake_openai, max_retries=0).models.retrieve("whisper-1")


# ---- our client against it ----


def test_provider_round_trip_usage_prices_and_billing_log(fake_openai: FakeOpenAI) -> None:
    audio = tones([300, 600])
    [mini, whisper] = _provider_call(
        fake_openai,
        [
            _req(audio, request_id="a1", prompt="the previous chunk ended here"),
            _req(audio, model="whisper-1", request_id="a2", want_timestamps=True),
        ],
    )
    assert isinstance(mini, TranscriptionResult) and isinstance(whisper, TranscriptionResult)
    assert mini.text == whisper.text == "tone300 tone600"
    assert whisper.segments is not None and [s["text"] for s in whisper.segments] == [" tone300", " tone600"]
    assert whisper.segments[0]["words"][0]["word"] == "tone300"
    billed = {b["request_id"]: b for b in fake_openai.billing_log()}
    assert billed["a1"]["usage"] == mini.usage and billed["a2"]["usage"] == whisper.usage
    assert mini.usage is not None and mini.usage["input_token_details"]["text_tokens"] == math.ceil(29 / 4)
    assert mini.extra["provider_request_id"] == billed["a1"]["x_request_id"]
    priced = price_attempt(MINI, mini.usage, 1.6, version="2026-11")
    assert priced.usd > 0 and not priced.estimated
    assert Decimal(billed["a1"]["usd"]) == priced.usd  # the fake's own list prices agree with voxq's table
    assert price_attempt("whisper-1", whisper.usage, 1.6, version="2026-11").usd == Decimal("0.00020000")
    assert billed["a2"]["usd"] == "0.00020000"  # 2 billed seconds at $0.006/min


def test_provider_error_translation_against_the_fake(fake_openai: FakeOpenAI) -> None:
    audio = tones([440])
    fake_openai.script(
        MINI,
        [
            Fault("rate_limit", retry_after_ms=1500),
            Fault("server_error", status=502),
            "quota",
            "model_not_found",
            "invalid_file",
            "auth",
            "too_large",
            Fault("timeout", seconds=5),
        ],
    )
    results: list[Any] = []
    for i in range(8):
        results += _provider_call(fake_openai, [_req(audio, request_id=f"e{i}")], timeout=0.5)
    kinds = [(e.kind, e.code, e.retry_after, e.model_gone) for e in results if isinstance(e, ProviderError)]
    assert kinds == [
        (ErrorKind.RETRY, "rate_limit_exceeded", 1.5, False),
        (ErrorKind.RETRY, "http_502", None, False),
        (ErrorKind.NEXT_MODEL, "insufficient_quota", None, False),
        (ErrorKind.NEXT_MODEL, "model_not_found", None, True),
        (ErrorKind.INVALID_AUDIO, "invalid_value", None, False),
        (ErrorKind.NEXT_MODEL, "invalid_api_key", None, False),
        (ErrorKind.TOO_LARGE, "http_413", None, False),
        (ErrorKind.RETRY, "timeout", None, False),
    ]
    assert all(FAKE_OPENAI_API_KEY not in str(e) for e in results)
    assert fake_openai.billing_log() == []
    # The hanging request is logged once the server sees the client go away.
    wait_until(lambda: len(fake_openai.request_log()) == 8, timeout=10, what="the timed-out request logged")
    assert [r["request_id"] for r in fake_openai.request_log()] == [f"e{i}" for i in range(8)]
    assert [r["code"] for r in fake_openai.request_log()] == [
        "rate_limit_exceeded",
        "http_502",
        "insufficient_quota",
        "model_not_found",
        "invalid_value",
        "invalid_api_key",
        "http_413",
        "timeout",
    ]
    assert not any(r["billed"] for r in fake_openai.request_log())


def test_tones_silence_and_short_audio(fake_openai: FakeOpenAI) -> None:
    silent = encode(np.zeros(16_000, dtype=np.float32))
    short = encode(np.zeros(800, dtype=np.float32))  # 50 ms
    results = _provider_call(
        fake_openai,
        [
            _req(tones([250, 2000, 750], fmt="ogg"), filename="a.ogg"),
            _req(tones([1000, 1000], fmt="mp3"), filename="a.mp3"),
            _req(silent),
            _req(short),
            _req(encode(tone_samples([330, 5000], rate=44_100), rate=44_100, fmt="wav"), filename="cd.wav"),
        ],
    )
    assert [r.text for r in results if isinstance(r, TranscriptionResult)] == [
        "tone250 tone2000 tone750",
        "tone1000 tone1000",
        "",
        "tone330 tone5000",  # 44.1 kHz: resampled to 16 kHz first
    ]
    assert isinstance(results[3], ProviderError) and results[3].code == "audio_too_short"
    assert results[3].kind is ErrorKind.INVALID_AUDIO


def test_quota_after_n_billed_requests_and_model_retirement(fake_openai: FakeOpenAI) -> None:
    audio = tones([440])
    fake_openai.exhaust_quota(MINI, after=2)
    results = _provider_call(fake_openai, [_req(audio, request_id=f"q{i}") for i in range(5)])
    assert sum(isinstance(r, TranscriptionResult) for r in results) == 2
    assert {r.code for r in results if isinstance(r, ProviderError)} == {"insufficient_quota"}
    assert len(fake_openai.billing_log()) == 2
    fake_openai.retire("gpt-4o-transcribe")
    [gone] = _provider_call(fake_openai, [_req(audio, model="gpt-4o-transcribe")])
    assert isinstance(gone, ProviderError) and gone.model_gone
    [unknown] = _provider_call(fake_openai, [_req(audio, model="whisper-9")])
    assert isinstance(unknown, ProviderError) and unknown.model_gone


def test_rpm_limit_and_file_size_limit(fake_openai: FakeOpenAI) -> None:
    audio = tones([440])
    fake_openai.configure(MINI, rpm_limit=3)
    results = _provider_call(fake_openai, [_req(audio) for _ in range(5)])
    limited = [r for r in results if isinstance(r, ProviderError)]
    assert len(limited) == 2 and all(r.code == "rate_limit_exceeded" for r in limited)
    assert all(r.retry_after is not None and 55 < r.retry_after <= 60 for r in limited)
    fake_openai.max_file_bytes = len(audio) - 1
    [big] = _provider_call(fake_openai, [_req(audio, model="whisper-1")])
    assert isinstance(big, ProviderError) and big.kind is ErrorKind.TOO_LARGE
    fake_openai.max_file_bytes = 26_214_400
    fake_openai.max_audio_seconds = 0.5  # gpt-4o models refuse audio longer than this (1400 s for real)
    [long, whisper] = _provider_call(
        fake_openai, [_req(audio, model="gpt-4o-transcribe"), _req(audio, model="whisper-1")]
    )
    assert isinstance(long, ProviderError) and long.kind is ErrorKind.TOO_LARGE and long.http_status == 400
    assert isinstance(whisper, TranscriptionResult) and whisper.text == "tone440"


def test_a_request_finished_after_the_client_gave_up_is_billed(fake_openai: FakeOpenAI) -> None:
    """As OpenAI does: the provider bills what it processed, whoever was still listening."""
    fake_openai.configure(MINI, latency=1.5)
    started = time.monotonic()
    [gave_up] = _provider_call(fake_openai, [_req(tones([440]), request_id="slow")], timeout=0.5)
    assert isinstance(gave_up, ProviderError) and gave_up.code == "timeout" and gave_up.billing_unknown
    assert time.monotonic() - started < 1.4
    [entry] = wait_until(fake_openai.request_log, timeout=10, what="the abandoned request logged")
    assert entry["request_id"] == "slow" and entry["code"] == "client_disconnected" and entry["billed"]
    assert [b["request_id"] for b in fake_openai.billing_log()] == ["slow"]
    fake_openai.configure(MINI, latency=0.0)
    fake_openai.script(MINI, [Fault("slow", seconds=1.5)])
    [slow] = _provider_call(fake_openai, [_req(tones([440]), request_id="scripted")], timeout=0.5)
    assert isinstance(slow, ProviderError) and slow.code == "timeout"
    wait_until(lambda: len(fake_openai.billing_log()) == 2, timeout=10, what="the slow answer billed")
    [ok] = _provider_call(fake_openai, [_req(tones([440]), request_id="fast")], timeout=5)
    assert isinstance(ok, TranscriptionResult)
    assert [b["request_id"] for b in fake_openai.billing_log()] == ["slow", "scripted", "fast"]


def test_latency_runs_from_the_requests_arrival(fake_openai: FakeOpenAI) -> None:
    """A 1 s provider answers 1 s after the request arrived, however long its upload took to read."""
    fake_openai.configure(MINI, latency=1.0)
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{MINI}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.flac"\r\n'
        "Content-Type: audio/flac\r\n\r\n"
    ).encode()
    audio = tones([440])
    tail = f"\r\n--{boundary}--\r\n".encode()

    def slow_body() -> Any:
        yield head
        for i in range(0, len(audio), max(1, len(audio) // 6)):
            time.sleep(0.1)  # the upload trickles in over ~0.6 s
            yield audio[i : i + max(1, len(audio) // 6)]
        yield tail

    started = time.monotonic()
    answer = httpx.post(
        f"{fake_openai.base_url}/audio/transcriptions",
        content=slow_body(),
        headers={
            "authorization": f"Bearer {FAKE_OPENAI_API_KEY}",
            "content-type": f"multipart/form-data; boundary={boundary}",
        },
        timeout=10,
    )
    elapsed = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == "tone440"
    # Not 1 s after the body was read (that would be >= 1.6 s), but 1 s after the request came in.
    assert 0.95 <= elapsed < 1.45, elapsed
    [entry] = fake_openai.request_log()
    assert 0.95 <= entry["ts"] - entry["received"] < 1.3


def test_random_faults_are_reproducible_with_a_seed(fake_openai: FakeOpenAI) -> None:
    audio = tones([440])

    def run() -> list[str]:
        fake_openai.reset()
        fake_openai.seed(99)
        fake_openai.configure(MINI, faults={"server_error": 0.3, "rate_limit": 0.2}, retry_after_ms=10)
        outcomes: list[str] = []
        for _ in range(30):
            [r] = _provider_call(fake_openai, [_req(audio)])
            outcomes.append(r.code if isinstance(r, ProviderError) else "ok")
        return outcomes

    first, second = run(), run()
    assert first == second
    assert 5 <= first.count("ok") <= 25
    assert {"http_500", "rate_limit_exceeded", "ok"} == set(first)


def test_hundreds_of_concurrent_requests(fake_openai: FakeOpenAI) -> None:
    fake_openai.configure(MINI, latency=4.0)
    audio = tones([440])
    started = time.monotonic()
    results = _provider_call(fake_openai, [_req(audio, request_id=f"c{i}") for i in range(300)], timeout=60)
    elapsed = time.monotonic() - started
    assert all(isinstance(r, TranscriptionResult) and r.text == "tone440" for r in results)
    # Held open together, not served a few at a time: two at a time would take 600 s.
    assert fake_openai.max_in_flight >= 200, fake_openai.max_in_flight
    assert elapsed < 30.0, elapsed
    assert sorted(b["request_id"] for b in fake_openai.billing_log()) == sorted(f"c{i}" for i in range(300))


def test_list_models_and_retiring_warning(fake_openai: FakeOpenAI) -> None:
    fake_openai.add_model("gpt-transcribe", "2026-12-31")

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            return await list_models(client, fake_openai.base_url, FAKE_OPENAI_API_KEY)

    models = asyncio.run(run())
    from datetime import date

    assert retiring_models(models, ["gpt-transcribe", MINI, "local"], date(2026, 11, 25)) == [
        ("gpt-transcribe", date(2026, 12, 31))
    ]


def test_runs_as_a_separate_process_scripted_over_http() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_server", "--port", str(port), "--api-key", "sk-only-this"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 20, proc=proc)
        root = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=root) as admin:
            assert admin.post(f"/_fake/models/{MINI}/script", json=["quota"]).status_code == 200
            assert admin.post(f"/_fake/models/{MINI}", json={"latency": 0.05}).json()["latency"] == 0.05
            assert admin.post(f"/_fake/models/{MINI}", json={"nonsense": 1}).status_code == 400
        client = openai.OpenAI(base_url=f"{root}/v1", api_key="sk-only-this", max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            client.audio.transcriptions.create(model=MINI, file=("a.flac", tones([440]), "audio/flac"))
        assert info.value.code == "insufficient_quota"
        ok = client.audio.transcriptions.create(
            model=MINI,
            file=("a.flac", tones([880]), "audio/flac"),
            extra_headers={"X-Client-Request-Id": "p1"},
        )
        assert ok.text == "tone880"
        with pytest.raises(openai.AuthenticationError) as denied:
            openai.OpenAI(base_url=f"{root}/v1", api_key="sk-wrong-key-123456", max_retries=0).models.list()
        assert "sk-wrong-key-123456" not in denied.value.message
        with httpx.Client(base_url=root) as admin:
            billing = admin.get("/_fake/billing").json()
            assert [(b["request_id"], b["text"]) for b in billing] == [("p1", "tone880")]
            assert [r["status"] for r in admin.get("/_fake/requests").json()] == [429, 200]
            admin.post("/_fake/reset")
            assert admin.get("/_fake/billing").json() == []
            assert json.loads(admin.get(f"/_fake/models/{MINI}").text)["latency"] == 0.0
    finally:
        proc.terminate()
        proc.wait(10)


def test_tone_samples_helper_is_what_the_fake_hears() -> None:
    samples = tone_samples([440], tone_seconds=0.5, gap_seconds=0.5, lead_seconds=0.0)
    assert samples.size == 16_000
    assert float(np.abs(samples[:8000]).max()) == pytest.approx(0.5, abs=0.01)
    assert float(np.abs(samples[8000:]).max()) == 0.0


def test_fixture_points_settings_at_the_fake_and_starts_clean(fake_openai: FakeOpenAI) -> None:
    from core.settings import get_settings

    settings = get_settings()
    assert settings.openai_base_url == fake_openai.base_url
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == FAKE_OPENAI_API_KEY
    assert fake_openai.base_url.startswith("http://127.0.0.1:") and fake_openai.base_url.endswith("/v1")
    assert fake_openai.billing_log() == [] and fake_openai.request_log() == []
    assert fake_openai.behaviour(MINI).latency == 0.0


# ---- another provider than OpenAI: own prices, a billing minimum, capabilities, account-wide failures ----

KEY_A = "sk-acme-account-a-0123456789"
KEY_B = "sk-acme-account-b-9876543210"
OPENAI_401 = (
    "Incorrect API key provided: {masked}. You can find your API key at "
    "https://platform.openai.com/account/api-keys."
)
OPENAI_QUOTA = (
    "You exceeded your current quota, please check your plan and billing details. For more information "
    "on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)


def _host(**kwargs: Any) -> FakeOpenAI:
    """A provider like the cheap Whisper hosts: a json-only model, a verbose one with words billing a 10 s
    minimum, a segment-only one."""
    specs = {
        "turbo-json": ModelSpec(per_minute=Decimal("0.002"), response_formats=("json", "text")),
        "large-v3": ModelSpec(
            per_minute=Decimal("0.004"), min_billed_seconds=10, response_formats=("json", "verbose_json")
        ),
        "segments-only": ModelSpec(per_minute=Decimal("0.003"), words=False),
        "no-usage": ModelSpec(per_minute=Decimal("0.003"), usage=False),
    }
    return FakeOpenAI(models={}, specs=specs, **kwargs)


def _post(fake: FakeOpenAI, key: str, model: str, audio: bytes, **fields: Any) -> httpx.Response:
    data: dict[str, Any] = {"model": model, **fields}
    return httpx.post(
        f"{fake.base_url}/audio/transcriptions",
        headers={"Authorization": f"Bearer {key}", "X-Client-Request-Id": f"{model}-{time.monotonic_ns()}"},
        data=data,
        files={"file": ("a.flac", audio, "audio/flac")},
        timeout=10,
    )


def test_own_prices_and_a_minimum_billed_length_are_what_the_billing_log_invoices() -> None:
    short, long = tones([440]), tones([300] * 16)  # 0.9 s and 11.4 s
    with _host(api_keys={KEY_A}) as host:
        answers = [
            _post(host, KEY_A, model, audio)
            for model in ("turbo-json", "large-v3")
            for audio in (short, long)
        ]
        assert [a.status_code for a in answers] == [200] * 4
        # the answer's usage says the audio's own seconds; the invoice bills at least the minimum
        assert [a.json()["usage"] for a in answers] == [
            {"type": "duration", "seconds": s} for s in (1, 12, 1, 12)
        ]
        billed = [
            (b["model"], b["usage"]["seconds"], b["billed_seconds"], b["usd"]) for b in host.billing_log()
        ]
        assert billed == [
            ("turbo-json", 1, 1, "0.00003333"),  # 1 s at $0.002/min
            ("turbo-json", 12, 12, "0.00040000"),
            ("large-v3", 1, 10, "0.00066667"),  # 10 s minimum at $0.004/min
            ("large-v3", 12, 12, "0.00080000"),
        ]
        # OpenAI's own models keep OpenAI's prices on an instance that has specs
        host.add_model("whisper-1")
        assert _post(host, KEY_A, "whisper-1", short).status_code == 200
        assert host.billing_log()[-1]["usd"] == "0.00010000" and host.billing_log()[-1]["billed_seconds"] == 1
        # a server that does not say its usage invoices the request all the same
        silent = [
            _post(host, KEY_A, "no-usage", long, response_format=f).json() for f in ("json", "verbose_json")
        ]
        assert silent[0] == {"text": " ".join(["tone300"] * 16)} and "usage" not in silent[1]
        assert [b["usd"] for b in host.billing_log()[-2:]] == ["0.00060000"] * 2  # 12 s at $0.003/min
        assert [b["usage_answered"] for b in host.billing_log()] == [True] * 5 + [False] * 2


def test_capabilities_json_only_words_and_segments_only() -> None:
    audio = tones([500, 1000])
    with _host() as host:
        refused = _post(host, KEY_A, "turbo-json", audio, response_format="verbose_json")
        assert refused.status_code == 400
        assert refused.json() == {
            "error": {
                "message": "response_format 'verbose_json' is not compatible with model 'turbo-json'. "
                "Use 'json' or 'text' instead.",
                "type": "invalid_request_error",
                "param": "response_format",
                "code": "unsupported_value",
            }
        }
        granularities = {"timestamp_granularities[]": ["segment", "word"]}
        words = _post(host, KEY_A, "large-v3", audio, response_format="verbose_json", **granularities).json()
        assert [s["text"] for s in words["segments"]] == [" tone500", " tone1000"]
        assert [w["word"] for w in words["words"]] == ["tone500", "tone1000"]
        plain = _post(
            host, KEY_A, "segments-only", audio, response_format="verbose_json", **granularities
        ).json()
        assert [s["text"] for s in plain["segments"]] == [" tone500", " tone1000"] and "words" not in plain
        sent = [(r["response_format"], r["granularities"]) for r in host.request_log()]
        assert sent == [("verbose_json", [])] + [("verbose_json", ["segment", "word"])] * 2
        assert host.billing_log()[0]["model"] == "large-v3"  # the refused request was not billed
        assert len(host.billing_log()) == 2
        # through voxq's provider: the json-only refusal is a 400 of the request, not of the audio
        [result] = _provider_call(host, [_req(audio, model="turbo-json", want_timestamps=True)])
        assert isinstance(result, ProviderError) and result.code == "unsupported_value"


def test_a_key_revoked_mid_run_gets_openais_401_and_the_other_key_goes_on() -> None:
    audio = tones([440])
    with _host(api_keys={KEY_A, KEY_B}) as host:
        host.revoke_key(KEY_A, after=2)  # after two more billed requests on the account
        first = [_post(host, KEY_A, "turbo-json", audio).status_code for _ in range(2)]
        refused = [_post(host, KEY_A, model, audio) for model in ("turbo-json", "large-v3")]
        assert first == [200, 200] and [r.status_code for r in refused] == [401, 401]
        assert refused[0].json() == {
            "error": {
                "message": OPENAI_401.format(masked="sk-******6789"),
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        assert refused[0].headers["x-request-id"].startswith("req_")
        assert _post(host, KEY_B, "large-v3", audio).status_code == 200
        assert (
            httpx.get(f"{host.base_url}/models", headers={"Authorization": f"Bearer {KEY_A}"}).status_code
            == 401
        )
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=host.base_url, api_key=KEY_A, max_retries=0).audio.transcriptions.create(
                model="turbo-json", file=("a.flac", audio, "audio/flac")
            )
        assert info.value.code == "invalid_api_key"
        assert len(host.billing_log()) == 3 and host.account()["revoked_keys"] == 1
        assert [r["code"] for r in host.request_log()][2:4] == ["invalid_api_key"] * 2
        host.restore_key(KEY_A)
        assert _post(host, KEY_A, "turbo-json", audio).status_code == 200


def test_account_quota_refuses_every_model_with_openais_body() -> None:
    audio = tones([440])
    with _host() as host:
        host.exhaust_quota(None, after=1)
        assert _post(host, KEY_A, "large-v3", audio).status_code == 200
        refused = [_post(host, KEY_A, model, audio) for model in ("turbo-json", "large-v3", "segments-only")]
        assert [r.status_code for r in refused] == [429] * 3
        for answer in refused:
            assert answer.json() == {
                "error": {
                    "message": OPENAI_QUOTA,
                    "type": "insufficient_quota",
                    "param": None,
                    "code": "insufficient_quota",
                }
            }
            assert "retry-after" not in answer.headers  # nothing to wait for
        assert [b["model"] for b in host.billing_log()] == ["large-v3"]
        assert host.account() == {"billed": 1, "quota_after": 1, "quota_exhausted": True, "revoked_keys": 0}
        # voxq's provider reads it as the account's quota, not a rate limit
        [result] = _provider_call(host, [_req(audio, model="turbo-json")])
        assert isinstance(result, ProviderError) and result.code == "insufficient_quota"
        assert result.kind == ErrorKind.NEXT_MODEL
        host.restore_quota()
        assert _post(host, KEY_A, "turbo-json", audio).status_code == 200
        host.reset()  # back to the constructor's specs, no account fault
        assert host.spec("large-v3") == ModelSpec(
            per_minute=Decimal("0.004"), min_billed_seconds=10, response_formats=("json", "verbose_json")
        )
        assert host.account()["quota_after"] is None and host.billing_log() == []


def test_a_call_the_client_gave_up_on_is_invoiced_with_the_minimum() -> None:
    with _host() as host:
        host.configure("large-v3", latency=1.0)
        [result] = _provider_call(
            host, [_req(tones([440]), model="large-v3", request_id="gone")], timeout=0.3
        )
        assert isinstance(result, ProviderError)
        wait_until(lambda: host.billing_log() or None, timeout=5, what="the abandoned call billed")
        [billed] = host.billing_log()
        assert (billed["request_id"], billed["billed_seconds"], billed["usd"]) == ("gone", 10, "0.00066667")
        assert host.request_log()[0]["code"] == "client_disconnected"


def test_accounts_and_specs_are_scripted_over_http_in_a_separate_process() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_server", "--port", str(port), "--api-key", KEY_A],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 20, proc=proc)
        root = f"http://127.0.0.1:{port}"
        fake = FakeOpenAI(port=port)  # only for its URLs: the server is the other process
        audio = tones([440])
        with httpx.Client(base_url=root) as admin:
            spec = {
                "per_minute": "0.004",
                "min_billed_seconds": 10,
                "response_formats": ["json", "verbose_json"],
            }
            configured = admin.post("/_fake/config", json={"specs": {"large-v3": spec}})
            assert configured.json()["specs"]["large-v3"] == {
                **spec,
                "min_billed_seconds": 10.0,
                "words": True,
                "usage": True,
            }
            assert admin.post("/_fake/config", json={"specs": {"x": {"nonsense": 1}}}).status_code == 400
            assert "large-v3" in [
                m["id"]
                for m in httpx.get(f"{root}/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}).json()[
                    "data"
                ]
            ]
            assert _post(fake, KEY_A, "large-v3", audio).status_code == 200
            state = admin.post("/_fake/account", json={"exhaust_quota_after": 1}).json()
            assert state == {"billed": 1, "quota_after": 2, "quota_exhausted": False, "revoked_keys": 0}
            assert _post(fake, KEY_A, "large-v3", audio).status_code == 200
            assert _post(fake, KEY_A, "whisper-1", audio).json()["error"]["code"] == "insufficient_quota"
            admin.post("/_fake/account", json={"exhaust_quota_after": None, "revoke_key": KEY_A})
            assert admin.get("/_fake/account").json()["revoked_keys"] == 1
            assert _post(fake, KEY_A, "whisper-1", audio).json()["error"]["code"] == "invalid_api_key"
            billing = admin.get("/_fake/billing").json()
            assert [(b["model"], b["billed_seconds"], b["usd"]) for b in billing] == [
                ("large-v3", 10, "0.00066667")
            ] * 2
            assert [r["status"] for r in admin.get("/_fake/requests").json()] == [200, 200, 429, 401]
    finally:
        proc.terminate()
        proc.wait(10)


def test_fake_openai_process_helper_scripts_and_reads_a_fake_of_its_own(tmp_path: Path) -> None:
    with fake_openai_process(tmp_path / "fake.log", KEY_A) as fake:
        assert (
            fake.set_specs({"large-v3": {"per_minute": "0.004", "min_billed_seconds": 10}})["large-v3"][
                "min_billed_seconds"
            ]
            == 10.0
        )
        assert fake.configure("large-v3", latency=0.05)["latency"] == 0.05
        assert fake.account(revoke_key=KEY_A, revoke_after=1)["revoked_keys"] == 0
        host = FakeOpenAI(port=fake.port)  # for its URLs only
        assert [_post(host, KEY_A, "large-v3", tones([440])).status_code for _ in range(2)] == [200, 401]
        assert fake.account()["revoked_keys"] == 1
        assert [(b["billed_seconds"], b["usd"]) for b in fake.billing_log()] == [(10, "0.00066667")]
        assert [r["code"] for r in fake.request_log()] == [None, "invalid_api_key"]
    assert fake.proc.poll() is not None  # stopped at the end
