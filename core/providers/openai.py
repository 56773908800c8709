"""The OpenAI-compatible transcription client: one multipart POST, errors translated in one place.

Works against api.openai.com and anything speaking the same API (`OPENAI_BASE_URL`: speaches, LocalAI,
vLLM, tests/fakes/openai_server.py). The shared `httpx.AsyncClient` is created once per worker process
and passed in (worker/runtime.py: its pool sized to the process's in-flight limit), so hundreds of
concurrent calls reuse one connection pool. The request is httpx's own multipart POST (`data=`/`files=`).

How a failure maps to what the pipeline does next (`translate_error`, the only place that decides):

    429 rate_limit_exceeded, 408, 409, 5xx, timeouts, connection errors  -> RETRY (honour Retry-After;
        a 429 without one: x-ratelimit-reset-requests/-tokens of the exhausted limit)
    429 insufficient_quota, 401, 403                                     -> NEXT_MODEL, circuit opens
    404/400 model_not_found                                               -> NEXT_MODEL, model_gone
    400 on param `file` (or no param, with an audio code or message)      -> INVALID_AUDIO
    413, or 400 "audio longer than N seconds"                             -> TOO_LARGE (re-chunk smaller)
    any other 4xx (e.g. a 400 on `language`/`prompt`: a request bug)      -> NEXT_MODEL, circuit stays shut

Why "any other 4xx" is NEXT_MODEL: the provider refused this request for a reason retrying cannot fix
(e.g. a parameter this model does not accept), and another model in the chain may accept it; failing
the job outright would lose work another model can do. It is about this request, not the model's
health, so it does not open the model's circuit for the whole fleet.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx

from core.languages import iso_language
from core.providers.base import ErrorKind, ProviderError, TranscriptionRequest, TranscriptionResult

# 400 codes that say the audio itself is the problem, whatever the param (`invalid_value` is not one: it is
# about whichever parameter `param` names).
_AUDIO_ERROR_CODES = frozenset({"audio_too_short", "invalid_file_format", "unsupported_file", "invalid_file"})
# "audio duration 1500 seconds is longer than 1400 seconds which is the maximum for this model"
_TOO_LONG_MESSAGE = re.compile(
    r"longer than [\d.]+ seconds|maximum (?:audio )?(?:duration|length)", re.IGNORECASE
)
# A 400 naming no parameter counts as bad audio only when its message says so about the file
# ("Invalid file format. Supported formats: [...]" has neither code nor param).
_AUDIO_MESSAGE = re.compile(
    r"\bfile format\b|\b(?:audio|file)\b.{0,40}\bcorrupt"
    r"|could not (?:decode|process|read) (?:the )?(?:audio|file)",
    re.IGNORECASE,
)
# OpenAI echoes a masked key in 401 messages ("Incorrect API key provided: sk-ab***cd"); never keep it.
_KEY_PATTERN = re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-*.]{3,}")
_MAX_MESSAGE_CHARS = 500
# Request bodies up to this size (a voicemail's FLAC) are joined before sending; a long chunk's is
# streamed as it is rather than copied.
JOIN_BODY_MAX_BYTES = 1 << 20


def parse_retry_after(headers: httpx.Headers, *, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` (ms) or `retry-after` (seconds or HTTP date), else None."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(float(raw_ms) / 1000.0, 0.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: str) -> float | None:
    """Seconds in a duration the way OpenAI writes its `x-ratelimit-reset-*` headers ("1s", "6m0s",
    "20ms", "1h2m3.5s"; a bare number is seconds), else None."""
    text = value.strip().lower()
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_rate_limit_reset(headers: httpx.Headers) -> float | None:
    """Seconds until the exhausted limit resets, from OpenAI's `x-ratelimit-reset-requests`/`-tokens`
    (those whose `x-ratelimit-remaining-*` is 0, or every one given when none says), else None."""
    waits: list[float] = []
    for limit in ("requests", "tokens"):
        raw = headers.get(f"x-ratelimit-reset-{limit}")
        remaining = headers.get(f"x-ratelimit-remaining-{limit}")
        seconds = parse_duration(raw) if raw is not None else None
        if seconds is not None and (remaining is None or remaining.strip() in ("0", "0.0")):
            waits.append(seconds)
    return max(waits) if waits else None


def _scrub(message: str, secret: str | None) -> str:
    if secret:
        message = message.replace(secret, "***")
    message = _KEY_PATTERN.sub("***", message)
    return message[:_MAX_MESSAGE_CHARS]


@dataclass(frozen=True)
class ErrorBody:
    """What an error answer's body says, whatever its shape (see `error_body`)."""

    code: str | None = None
    type: str | None = None
    param: str | None = None
    message: str | None = None


def _text(value: object) -> str | None:
    return str(value) if value is not None and value != "" else None


def _from_error_object(error: dict[str, Any]) -> ErrorBody:
    return ErrorBody(
        _text(error.get("code")),
        _text(error.get("type")),
        _text(error.get("param")),
        _text(error.get("message")),
    )


def _from_validation(items: list[Any]) -> ErrorBody:
    """FastAPI/pydantic's `{"detail": [{"loc": ["body", "language"], "msg": ..., "type": ...}]}`."""
    messages, params = [], []
    for item in items:
        if not isinstance(item, dict):
            continue
        loc = [str(part) for part in item.get("loc") or [] if part not in ("body", "query", "form")]
        messages.append(f"{'.'.join(loc)}: {item.get('msg')}" if loc else str(item.get("msg")))
        if loc:
            params.append(loc[0])
    first = items[0] if items and isinstance(items[0], dict) else {}
    param = params[0] if len(set(params)) == 1 else None
    return ErrorBody(None, _text(first.get("type")), param, "; ".join(messages) or None)


def _from_json(body: object) -> ErrorBody | None:
    """OpenAI's `{"error": {...}}`, FastAPI's `{"detail": {"error": {...}}}`, `{"detail": "text"}` and
    `{"detail": [validation errors]}`, `{"error": "text"}`, `{"message": "text"}`; None for other JSON."""
    if not isinstance(body, dict):
        return None
    detail = body.get("detail")
    if isinstance(detail, dict):
        return _from_json(detail) or ErrorBody(message=_text(detail.get("msg")))
    if isinstance(detail, list):
        return _from_validation(detail)
    error = body.get("error")
    if isinstance(error, dict):
        return _from_error_object(error)
    for value in (error, detail, body.get("message")):
        if isinstance(value, str) and value.strip():
            return ErrorBody(_text(body.get("code")), _text(body.get("type")), None, value)
    return None


_TAGS = re.compile(r"<[^>]+>")
_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def error_body(response: httpx.Response) -> ErrorBody:
    """What an error answer says, from the body shapes OpenAI-compatible servers use (see `_from_json`), or
    its plain text (an HTML page's title); empty when the body says nothing."""
    try:
        raw = response.text
    except (UnicodeDecodeError, LookupError):
        return ErrorBody()
    try:
        parsed = _from_json(json.loads(raw))
    except ValueError:
        parsed = None
    if parsed is not None:
        return parsed
    title = _TITLE.search(raw)
    text = title.group(1) if title else _TAGS.sub(" ", raw)
    text = " ".join(text.split())
    return ErrorBody(message=text[: _MAX_MESSAGE_CHARS * 2] or None)


def _about_the_audio(code: str | None, param: str | None, message: str) -> bool:
    """A 400 that blames the audio: its param is `file`, or it names no other parameter and its code or
    message is about the file. A 400 about `language`, `prompt` or any other parameter is a request the
    model refuses, not bad audio."""
    if param == "file":
        return True
    if param is not None:
        return False
    return code in _AUDIO_ERROR_CODES or _AUDIO_MESSAGE.search(message) is not None


def translate_error(
    response: httpx.Response | None, exc: Exception | None, *, secret: str | None = None
) -> ProviderError:
    """Turn a failed call (an error response, or a transport exception) into the ProviderError to act on."""
    if response is None:
        if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
            code = "connect_error"
        elif isinstance(exc, httpx.TimeoutException):
            code = "timeout"
        else:
            code = "transport_error"
        detail = type(exc).__name__ if exc is not None else "no response"
        # Sent, then the answer was lost: the provider may have finished and billed it all the same.
        sent = isinstance(exc, httpx.ReadTimeout | httpx.ReadError | httpx.RemoteProtocolError)
        return ProviderError(
            f"provider call failed: {detail}", kind=ErrorKind.RETRY, code=code, billing_unknown=sent
        )

    status = response.status_code
    body = error_body(response)
    err_code, err_type, param = body.code, body.type, body.param
    message = _scrub(body.message or f"HTTP {status} from provider", secret)
    code = err_code or f"http_{status}"
    retry_after = parse_retry_after(response.headers)
    if retry_after is None and status == 429:
        retry_after = parse_rate_limit_reset(response.headers)

    def error(kind: ErrorKind, **extra: Any) -> ProviderError:
        return ProviderError(
            message, kind=kind, code=code, http_status=status, retry_after=retry_after, **extra
        )

    if status == 429:
        if err_code == "insufficient_quota" or err_type == "insufficient_quota":
            return error(ErrorKind.NEXT_MODEL)
        return error(ErrorKind.RETRY)
    if status in (408, 409) or status >= 500:
        return error(ErrorKind.RETRY)
    if status in (401, 403):
        # Said so in the message (the attempt row, the job's fallback reason): a wrong or revoked key.
        refused = f"the provider refused the API key (HTTP {status}{' ' + err_code if err_code else ''})"
        return ProviderError(
            f"{refused}: {message}"[:_MAX_MESSAGE_CHARS],
            kind=ErrorKind.NEXT_MODEL,
            code=code,
            http_status=status,
            auth_failed=True,
        )
    if err_code == "model_not_found" and status in (400, 404):
        return error(ErrorKind.NEXT_MODEL, model_gone=True)
    if status == 413 or (status == 400 and _TOO_LONG_MESSAGE.search(message) is not None):
        return error(ErrorKind.TOO_LARGE)
    if status == 400 and _about_the_audio(err_code, param, message):
        return error(ErrorKind.INVALID_AUDIO)
    if 400 <= status < 500:
        return error(ErrorKind.NEXT_MODEL, opens_circuit=False)
    # 1xx/3xx: not an answer we understand; the next attempt may get a real one.
    return error(ErrorKind.RETRY)


def _segments(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    raw = body.get("segments")
    if not isinstance(raw, list):
        return None
    words = body.get("words") if isinstance(body.get("words"), list) else []
    segments: list[dict[str, Any]] = []
    for seg in raw:
        start, end = float(seg.get("start", 0.0)), float(seg.get("end", 0.0))
        item: dict[str, Any] = {"start": start, "end": end, "text": str(seg.get("text", ""))}
        if words:
            item["words"] = [
                {"start": float(w["start"]), "end": float(w["end"]), "word": str(w["word"])}
                for w in words
                if start <= float(w.get("start", -1.0)) < max(end, start + 1e-9)
            ]
        segments.append(item)
    return segments


class OpenAIProvider:
    """Transcribes through an OpenAI-compatible `/audio/transcriptions` endpoint."""

    name = "openai"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        base_url: str,
        api_key: str | None,
        timeout: float,
        headers: dict[str, str] | None = None,
        name: str = "openai",
    ) -> None:
        self.name = name  # the providers configuration's name, recorded on each attempt
        self._client = client
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._extra_headers = dict(headers or {})  # the providers file's `headers` (never a credential)

    def _headers(self, request_id: str | None) -> dict[str, str]:
        headers = {**self._extra_headers, "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if request_id:
            headers["X-Client-Request-Id"] = request_id
        return headers

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        """Transcribe one request or raise ProviderError (see the module docstring for the rules)."""
        # The format comes with the request (the model's configured capabilities); this module keeps no
        # list of models. Without one: verbose_json when timestamps are wanted.
        response_format = request.response_format or ("verbose_json" if request.want_timestamps else "json")
        verbose = response_format == "verbose_json"
        data: dict[str, str | list[str]] = {"model": request.model, "response_format": response_format}
        if verbose:
            data["timestamp_granularities[]"] = ["segment", "word"]
        if request.language:
            data["language"] = request.language
        if request.prompt:
            data["prompt"] = request.prompt
        files = {"file": (request.filename, request.audio, request.content_type)}
        started = time.monotonic()
        try:
            http_request = self._client.build_request(
                "POST",
                f"{self._base_url}/audio/transcriptions",
                data=data,
                files=files,
                headers=self._headers(request.request_id),
                timeout=httpx.Timeout(self._timeout, connect=min(self._timeout, 10.0)),
            )
            if len(request.audio) <= JOIN_BODY_MAX_BYTES:
                # The multipart body as one write instead of one per part header and field (each a
                # socket send under its own timeout scope); the same bytes and headers go out.
                await http_request.aread()
            response = await self._client.send(http_request)
        except httpx.HTTPError as exc:
            raise translate_error(None, exc, secret=self._api_key) from None
        if response.status_code != 200:
            raise translate_error(response, None, secret=self._api_key)
        return self._result(request, response.content, response.headers.get("x-request-id"), verbose, started)

    def _result(
        self,
        request: TranscriptionRequest,
        content: bytes,
        provider_request_id: str | None,
        verbose: bool,
        started: float,
    ) -> TranscriptionResult:
        """The transcription of a 200 answer's body, or ProviderError(RETRY) when it is not one."""
        try:
            body = json.loads(content)
            text = body["text"]
            if not isinstance(text, str):
                raise TypeError("text is not a string")
            segments = _segments(body) if verbose else None
        except (ValueError, KeyError, TypeError, AttributeError):
            # A 200 that is not a transcription (a proxy's page, a truncated body, malformed segments):
            # worth another try, and billed for all we know (a provider bills what it answered).
            raise ProviderError(
                "provider answered 200 without a transcription",
                kind=ErrorKind.RETRY,
                code="bad_response",
                http_status=200,
                billing_unknown=True,
            ) from None
        usage = body.get("usage")
        return TranscriptionResult(
            text=text,
            model=request.model,
            # whisper-1 names the language ("english"): stored and served as its ISO-639-1 code.
            language=iso_language(body.get("language")) or request.language,
            segments=segments,
            usage=usage if isinstance(usage, dict) else None,
            http_status=200,
            extra={
                "provider_request_id": provider_request_id,
                "latency_seconds": round(time.monotonic() - started, 4),
            },
        )


def _parse_shutdown(value: object) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), tz=UTC).date()
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError:
        return None


async def list_models(
    client: httpx.AsyncClient, base_url: str, api_key: str | None
) -> dict[str, date | None]:
    """Model ids the provider lists, each with its announced `shutdown_date` (None when not announced)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = await client.get(f"{base_url.rstrip('/')}/models", headers=headers, timeout=15.0)
    except httpx.HTTPError as exc:
        raise translate_error(None, exc, secret=api_key) from None
    if response.status_code != 200:
        raise translate_error(response, None, secret=api_key)
    models: dict[str, date | None] = {}
    for item in response.json().get("data", []):
        if isinstance(item, dict) and "id" in item:
            models[str(item["id"])] = _parse_shutdown(item.get("shutdown_date"))
    return models


def retiring_models(
    models: dict[str, date | None], configured: list[str], today: date, within_days: int = 90
) -> list[tuple[str, date]]:
    """Configured models whose shutdown date is on or before `today + within_days` (past dates too)."""
    horizon = today + timedelta(days=within_days)
    found: list[tuple[str, date]] = []
    for model in configured:
        shutdown = models.get(model)
        if shutdown is not None and shutdown <= horizon:
            found.append((model, shutdown))
    return found
