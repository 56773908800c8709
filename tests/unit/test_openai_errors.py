"""The OpenAI client's request shape and its one error-translation function, over httpx.MockTransport."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Callable
from datetime import date
from typing import Any

import httpx
import pytest

from core.providers.base import ErrorKind, ProviderError, TranscriptionRequest
from core.providers.openai import (
    OpenAIProvider,
    list_models,
    parse_retry_after,
    retiring_models,
    translate_error,
)

API_KEY = "sk-proj-SECRETSECRETSECRET1234"
BASE = "https://provider.test/v1"


def _request(**overrides: Any) -> TranscriptionRequest:
    fields: dict[str, Any] = {
        "audio": b"fLaC-bytes",
        "filename": "chunk.flac",
        "content_type": "audio/flac",
        "model": "gpt-4o-mini-transcribe",
        "audio_seconds": 3.0,
        "request_id": "attempt-123",
    }
    fields.update(overrides)
    return TranscriptionRequest(**fields)


def _error_response(
    status: int,
    code: str | None,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    message: str = "boom",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


def _call(
    handler: Callable[[httpx.Request], httpx.Response], request: TranscriptionRequest | None = None
) -> Any:
    async def run() -> Any:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            provider = OpenAIProvider(client, base_url=BASE + "/", api_key=API_KEY, timeout=5.0)
            return await provider.transcribe(request or _request())

    return asyncio.run(run())


def _raised(response: httpx.Response, **request: Any) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        _call(lambda _req: response, _request(**request) if request else None)
    return info.value


def _form(request: httpx.Request) -> tuple[dict[str, list[str]], dict[str, tuple[str, str, bytes]]]:
    """Parse the multipart body the client sent: ({field: [values]}, {file field: (name, type, bytes)})."""
    from email.parser import BytesParser
    from email.policy import HTTP

    raw = b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + request.content
    message = BytesParser(policy=HTTP).parsebytes(raw)
    fields: dict[str, list[str]] = {}
    files: dict[str, tuple[str, str, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True)
        if filename:
            files[str(name)] = (filename, part.get_content_type(), payload)
        else:
            fields.setdefault(str(name), []).append(payload.decode())
    return fields, files


# ---- the request ----


def test_json_model_request_shape_and_result() -> None:
    seen: list[httpx.Request] = []
    usage = {
        "type": "tokens",
        "input_tokens": 30,
        "output_tokens": 5,
        "total_tokens": 35,
        "input_token_details": {"audio_tokens": 28, "text_tokens": 2},
    }

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json={"text": "hello", "usage": usage}, headers={"x-request-id": "req_1"})

    # The worker passes the format the model's capabilities allow (worker.entries.response_format).
    request = _request(language="en", prompt="previous tail", want_timestamps=True, response_format="json")
    result = _call(handler, request)
    req = seen[0]
    assert req.method == "POST"
    assert str(req.url) == BASE + "/audio/transcriptions"
    assert req.headers["authorization"] == f"Bearer {API_KEY}"
    assert req.headers["x-client-request-id"] == "attempt-123"
    fields, files = _form(req)
    assert fields["model"] == ["gpt-4o-mini-transcribe"]
    # gpt-4o models answer json only (their capabilities), even when timestamps are wanted.
    assert fields["response_format"] == ["json"]
    assert "timestamp_granularities[]" not in fields
    assert fields["language"] == ["en"] and fields["prompt"] == ["previous tail"]
    assert files["file"] == ("chunk.flac", "audio/flac", b"fLaC-bytes")
    assert result.text == "hello"
    assert result.usage == usage
    assert result.http_status == 200
    assert result.segments is None
    assert result.extra["provider_request_id"] == "req_1"


def test_whisper_with_timestamps_asks_verbose_json_and_fills_segments() -> None:
    seen: list[httpx.Request] = []
    body = {
        "task": "transcribe",
        "language": "english",
        "duration": 2.0,
        "text": "a b",
        "segments": [
            {"id": 0, "start": 0.0, "end": 1.0, "text": " a"},
            {"id": 1, "start": 1.0, "end": 2.0, "text": " b"},
        ],
        "words": [{"word": "a", "start": 0.1, "end": 0.5}, {"word": "b", "start": 1.2, "end": 1.6}],
        "usage": {"type": "duration", "seconds": 2},
    }

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json=body)

    result = _call(handler, _request(model="whisper-1", want_timestamps=True))
    fields, _ = _form(seen[0])
    assert fields["response_format"] == ["verbose_json"]
    assert fields["timestamp_granularities[]"] == ["segment", "word"]
    assert "language" not in fields and "prompt" not in fields
    assert result.usage == {"type": "duration", "seconds": 2}
    assert result.segments == [
        {"start": 0.0, "end": 1.0, "text": " a", "words": [{"start": 0.1, "end": 0.5, "word": "a"}]},
        {"start": 1.0, "end": 2.0, "text": " b", "words": [{"start": 1.2, "end": 1.6, "word": "b"}]},
    ]


def test_whisper_without_timestamps_asks_json() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json={"text": "x"})

    result = _call(handler, _request(model="whisper-1"))
    assert _form(seen[0])[0]["response_format"] == ["json"]
    assert result.usage is None


def test_200_without_text_is_retried() -> None:
    err = _raised(httpx.Response(200, text="<html>proxy</html>"))
    assert err.kind is ErrorKind.RETRY and err.code == "bad_response"
    for body in ({"text": None}, {"usage": {}}, ["text"]):
        err = _raised(httpx.Response(200, json=body))
        assert err.kind is ErrorKind.RETRY and err.code == "bad_response"


def test_unparseable_200s_may_be_billed() -> None:
    """A 200 is an answer the provider billed, parseable or not (issue #16, item 6)."""
    bad_segments = {"text": "x", "segments": [{"start": "soon", "end": 1}]}
    for response in (
        httpx.Response(200, text="<html>proxy</html>"),
        httpx.Response(200, json={"text": None}),
        httpx.Response(200, json=bad_segments),
    ):
        err = _raised(response, model="whisper-1", want_timestamps=True)
        assert (err.code, err.http_status, err.billing_unknown) == ("bad_response", 200, True)


# ---- error translation: every rule ----


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504])
def test_transient_statuses_retry(status: int) -> None:
    err = _raised(_error_response(status, None, type="server_error"))
    assert err.kind is ErrorKind.RETRY
    assert err.code == f"http_{status}"
    assert err.http_status == status
    assert not err.opens_circuit


def test_html_502_from_a_proxy_is_retried() -> None:
    err = _raised(httpx.Response(502, text="<html><h1>502 Bad Gateway</h1></html>"))
    assert err.kind is ErrorKind.RETRY and err.code == "http_502"


def test_rate_limit_retries_with_retry_after_ms() -> None:
    err = _raised(
        _error_response(
            429,
            "rate_limit_exceeded",
            type="requests",
            headers={"retry-after-ms": "1500", "retry-after": "2"},
        )
    )
    assert err.kind is ErrorKind.RETRY
    assert err.code == "rate_limit_exceeded"
    assert err.retry_after == pytest.approx(1.5)


def test_rate_limit_retry_after_seconds_and_http_date() -> None:
    err = _raised(_error_response(429, "rate_limit_exceeded", headers={"retry-after": "7"}))
    assert err.retry_after == pytest.approx(7.0)
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    err = _raised(_error_response(429, "rate_limit_exceeded", headers={"retry-after": future}))
    assert err.retry_after is not None and 27 <= err.retry_after <= 31
    err = _raised(_error_response(429, "rate_limit_exceeded"))
    assert err.kind is ErrorKind.RETRY and err.retry_after is None


def test_parse_retry_after_edge_cases() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == pytest.approx(0.25)
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "junk", "retry-after": "3"})) == 3.0
    assert parse_retry_after(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert parse_retry_after(httpx.Headers({"retry-after": "-5"})) == 0.0


@pytest.mark.parametrize(
    ("status", "code", "type_"),
    [
        (429, "insufficient_quota", "insufficient_quota"),
        (401, "invalid_api_key", "invalid_request_error"),
        (403, None, "invalid_request_error"),
    ],
)
def test_quota_and_auth_go_to_next_model_and_open_circuit(status: int, code: str | None, type_: str) -> None:
    err = _raised(_error_response(status, code, type=type_, headers={"retry-after": "1"}))
    assert err.kind is ErrorKind.NEXT_MODEL
    assert err.opens_circuit
    assert not err.model_gone
    assert err.code == (code or f"http_{status}")


@pytest.mark.parametrize("status", [400, 404])
def test_model_not_found_retires_the_model(status: int) -> None:
    err = _raised(_error_response(status, "model_not_found", message="The model `x` does not exist"))
    assert err.kind is ErrorKind.NEXT_MODEL
    assert err.model_gone and err.opens_circuit
    assert err.code == "model_not_found"


def test_plain_404_is_next_model_but_not_retired() -> None:
    err = _raised(_error_response(404, None, message="Not found"))
    assert err.kind is ErrorKind.NEXT_MODEL
    assert not err.model_gone and not err.opens_circuit


@pytest.mark.parametrize(
    ("code", "param", "message"),
    [
        ("invalid_value", "file", "Audio file might be corrupted or unsupported"),
        ("audio_too_short", "file", "Audio file is too short. Minimum audio length is 0.1 seconds."),
        (None, None, "Invalid file format. Supported formats: ['flac', 'mp3']"),
    ],
)
def test_invalid_audio(code: str | None, param: str | None, message: str) -> None:
    err = _raised(_error_response(400, code, param=param, message=message))
    assert err.kind is ErrorKind.INVALID_AUDIO
    assert err.message == message
    assert err.code == (code or "http_400")


def test_413_is_too_large() -> None:
    err = _raised(_error_response(413, None, type="server_error", message="Maximum content size exceeded"))
    assert err.kind is ErrorKind.TOO_LARGE and err.http_status == 413


def test_audio_longer_than_the_model_accepts_is_too_large() -> None:
    message = "audio duration 1500.2 seconds is longer than 1400 seconds which is the maximum for this model"
    err = _raised(_error_response(400, "invalid_value", message=message))
    assert err.kind is ErrorKind.TOO_LARGE and err.code == "invalid_value"
    short = _raised(_error_response(400, "audio_too_short", message="Minimum audio length is 0.1 seconds."))
    assert short.kind is ErrorKind.INVALID_AUDIO


def test_other_4xx_is_next_model_without_opening_the_circuit() -> None:
    err = _raised(
        _error_response(
            400,
            "unsupported_value",
            param="response_format",
            message="response_format 'verbose_json' is not compatible with model",
        )
    )
    assert err.kind is ErrorKind.NEXT_MODEL
    assert not err.opens_circuit and not err.model_gone
    assert err.code == "unsupported_value"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (httpx.ReadTimeout("read timed out"), "timeout"),
        (httpx.WriteTimeout("write timed out"), "timeout"),
        (httpx.PoolTimeout("pool"), "timeout"),
        (httpx.ConnectTimeout("connect timed out"), "connect_error"),
        (httpx.ConnectError("refused"), "connect_error"),
        (httpx.RemoteProtocolError("server closed"), "transport_error"),
    ],
)
def test_transport_failures_retry(exc: Exception, code: str) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(ProviderError) as info:
        _call(handler)
    assert info.value.kind is ErrorKind.RETRY
    assert info.value.code == code
    assert info.value.http_status is None


@pytest.mark.parametrize(
    ("exc", "maybe_billed"),
    [
        (httpx.ReadTimeout("read timed out"), True),  # sent: the provider may have finished it
        (httpx.ReadError("reset"), True),
        (httpx.RemoteProtocolError("server closed"), True),
        (httpx.WriteTimeout("write timed out"), False),  # the upload never completed
        (httpx.PoolTimeout("pool"), False),  # never sent
        (httpx.ConnectTimeout("connect timed out"), False),
        (httpx.ConnectError("refused"), False),
    ],
)
def test_lost_answers_may_be_billed(exc: Exception, maybe_billed: bool) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(ProviderError) as info:
        _call(handler)
    assert info.value.billing_unknown is maybe_billed


def test_api_key_never_in_messages() -> None:
    message = f"Incorrect API key provided: {API_KEY}. Also sk-ab*****************wxyz."
    err = _raised(_error_response(401, "invalid_api_key", message=message))
    assert API_KEY not in err.message and "SECRET" not in err.message
    assert "sk-ab" not in err.message
    direct = translate_error(_error_response(401, None, message=f"key {API_KEY} bad"), None, secret=API_KEY)
    assert API_KEY not in str(direct)


def test_translate_error_without_response_or_exception() -> None:
    err = translate_error(None, None)
    assert err.kind is ErrorKind.RETRY and err.code == "transport_error"


# ---- model retirement ----


def test_list_models_and_retiring() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        assert req.url.path == "/v1/models"
        assert req.headers["authorization"] == f"Bearer {API_KEY}"
        return httpx.Response(
            200,
            json={
                "object": "list",
                "data": [
                    {
                        "id": "whisper-1",
                        "object": "model",
                        "created": 1,
                        "owned_by": "x",
                        "shutdown_date": "2027-02-26",
                    },
                    {"id": "gpt-transcribe", "object": "model", "created": 1, "owned_by": "x"},
                    {
                        "id": "old",
                        "object": "model",
                        "created": 1,
                        "owned_by": "x",
                        "shutdown_date": 1_700_000_000,
                    },
                ],
            },
        )

    async def run() -> dict[str, date | None]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await list_models(client, BASE, API_KEY)

    models = asyncio.run(run())
    assert models == {"whisper-1": date(2027, 2, 26), "gpt-transcribe": None, "old": date(2023, 11, 14)}
    configured = ["whisper-1", "gpt-transcribe", "old", "not-listed"]
    # 2027-02-26 is 93 days after 2026-11-25 and exactly 90 after 2026-11-28; past dates always warn.
    assert retiring_models(models, configured, date(2026, 11, 25)) == [("old", date(2023, 11, 14))]
    assert retiring_models(models, configured, date(2026, 11, 28)) == [
        ("whisper-1", date(2027, 2, 26)),
        ("old", date(2023, 11, 14)),
    ]
    assert retiring_models(models, configured, date(2026, 11, 25), within_days=100) == [
        ("whisper-1", date(2027, 2, 26)),
        ("old", date(2023, 11, 14)),
    ]


def test_list_models_error_is_translated() -> None:
    async def run() -> None:
        transport = httpx.MockTransport(lambda req: _error_response(401, "invalid_api_key"))
        async with httpx.AsyncClient(transport=transport) as client:
            await list_models(client, BASE, API_KEY)

    with pytest.raises(ProviderError) as info:
        asyncio.run(run())
    assert info.value.kind is ErrorKind.NEXT_MODEL


# ---- error bodies of other shapes (issue #16, item 15) ----

LANGUAGE_ERROR = {"message": "Invalid language 'xx'.", "type": "invalid_request_error", "param": "language"}


@pytest.mark.parametrize(
    ("response", "code", "param", "message"),
    [
        (
            httpx.Response(400, json={"error": {**LANGUAGE_ERROR, "code": "invalid_value"}}),
            "invalid_value",
            "language",
            "Invalid language 'xx'.",
        ),
        (
            httpx.Response(400, json={"detail": {"error": {**LANGUAGE_ERROR, "code": "invalid_value"}}}),
            "invalid_value",
            "language",
            "Invalid language 'xx'.",
        ),
        (
            httpx.Response(400, json={"detail": "Invalid language 'xx'."}),
            "http_400",
            None,
            "Invalid language 'xx'.",
        ),
        (
            httpx.Response(
                422,
                json={
                    "detail": [{"loc": ["body", "language"], "msg": "Input should be 'en'", "type": "enum"}]
                },
            ),
            "http_422",
            "language",
            "language: Input should be 'en'",
        ),
        (httpx.Response(400, text="Invalid language 'xx'."), "http_400", None, "Invalid language 'xx'."),
        (httpx.Response(500, text="x" * 2000), "http_500", None, "x" * 500),
        (
            httpx.Response(
                502, html="<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
            ),
            "http_502",
            None,
            "502 Bad Gateway",
        ),
        (httpx.Response(503, content=b""), "http_503", None, "HTTP 503 from provider"),
    ],
    ids=["openai", "fastapi-error", "detail-text", "validation", "plain-text", "long-text", "html", "empty"],
)
def test_error_bodies_of_every_common_shape_keep_the_providers_message(
    response: httpx.Response, code: str, param: str | None, message: str
) -> None:
    from core.providers.openai import error_body

    err = _raised(response)
    assert (err.code, err.message) == (code, message)
    assert error_body(response).param == param
    # A 400 about the language is a request bug, not bad audio, whatever the body's shape.
    if response.status_code == 400 and param == "language":
        assert err.kind is ErrorKind.NEXT_MODEL and not err.opens_circuit


def test_a_fastapi_shaped_quota_error_is_still_quota() -> None:
    body = {
        "detail": {"error": {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}}
    }
    err = _raised(httpx.Response(429, json=body))
    assert err.kind is ErrorKind.NEXT_MODEL and err.opens_circuit and err.code == "insufficient_quota"


@pytest.mark.parametrize(
    ("code", "param", "message"),
    [
        ("invalid_value", "language", "Invalid language 'xx'. Language parameter must be ISO-639-1."),
        ("invalid_value", "prompt", "The prompt is too long for this audio model."),
        ("invalid_value", None, "Invalid value for 'temperature'."),
        (None, "response_format", "response_format 'srt' is not supported for audio of this model"),
    ],
)
def test_a_400_about_another_parameter_is_not_bad_audio(
    code: str | None, param: str | None, message: str
) -> None:
    """Issue #16, item 11: only a 400 on `file` (or one naming no parameter that blames the file) is bad
    audio; one on `language` or `prompt` is a request bug: that model refuses it, the circuit stays shut."""
    err = _raised(_error_response(400, code, param=param, message=message))
    assert err.kind is ErrorKind.NEXT_MODEL
    assert not err.opens_circuit and not err.model_gone


# ---- OpenAI's x-ratelimit-reset-* headers (issue #16, item 12) ----


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0.5", 0.5),
        ("soon", None),
        ("", None),
    ],
)
def test_parse_duration_reads_openai_reset_values(value: str, seconds: float | None) -> None:
    from core.providers.openai import parse_duration

    assert parse_duration(value) == (pytest.approx(seconds) if seconds is not None else None)


def test_a_429_without_retry_after_waits_for_the_exhausted_limit_to_reset() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1.5s",
        "x-ratelimit-remaining-tokens": "149000",
        "x-ratelimit-reset-tokens": "6m0s",  # not exhausted: not what this 429 is about
    }
    err = _raised(_error_response(429, "rate_limit_exceeded", type="requests", headers=headers))
    assert err.kind is ErrorKind.RETRY and err.retry_after == pytest.approx(1.5)
    tokens = {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "20ms"}
    assert _raised(_error_response(429, "rate_limit_exceeded", headers=tokens)).retry_after == pytest.approx(
        0.02
    )
    # Retry-After, when given, wins; a bare 429 says nothing.
    both = {**headers, "retry-after-ms": "250"}
    assert _raised(_error_response(429, "rate_limit_exceeded", headers=both)).retry_after == pytest.approx(
        0.25
    )
    assert _raised(_error_response(429, "rate_limit_exceeded")).retry_after is None


@pytest.mark.parametrize(("status", "code"), [(401, "invalid_api_key"), (403, None)])
def test_a_refused_key_says_so_and_is_flagged(status: int, code: str | None) -> None:
    """Issue #16, item 14: a 401/403 is flagged `auth_failed` and its message says the key was refused."""
    err = _raised(_error_response(status, code, message=f"Incorrect API key provided: {API_KEY}."))
    assert err.auth_failed and err.kind is ErrorKind.NEXT_MODEL and err.opens_circuit
    label = f"HTTP {status} {code}" if code else f"HTTP {status}"
    assert err.message.startswith(f"the provider refused the API key ({label}): Incorrect API key provided: ")
    assert API_KEY not in err.message and "SECRET" not in err.message
    quota = _raised(_error_response(429, "insufficient_quota", type="insufficient_quota"))
    assert not quota.auth_failed
