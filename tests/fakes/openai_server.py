"""A real HTTP server that speaks OpenAI's transcription wire format, with scripted faults.

Endpoints (OpenAI's): `POST /v1/audio/transcriptions` (multipart), `GET /v1/models`.
Errors are `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes, messages and
headers (`x-request-id`, `retry-after-ms`, `retry-after`, `x-ratelimit-*`).

What it "hears": it transcribes pure tones, so tests can check content and order without speech.
The audio is decoded with PyAV to 16 kHz mono, split at silences (20 ms frames; a frame is silent below
max(0.01, 5% of the loudest frame's) RMS; gaps up to 0.1 s are bridged and regions under 60 ms dropped),
and each region becomes the word `tone<F>`, F its dominant FFT frequency rounded to the nearest 10 Hz:
"tone440 tone880". Silent audio gives "". Audio under 0.1 s gets OpenAI's 400 `audio_too_short`.

What it bills (usage):
- gpt-4o-transcribe, gpt-4o-mini-transcribe: tokens. audio_tokens = ceil(10 * seconds) (OpenAI documents
  user audio at about 1 token per 100 ms), text_tokens = ceil(len(prompt) / 4),
  output_tokens = ceil(len(text) / 4) + 1 (the end token), input = audio + text, total = input + output.
- whisper-1 and gpt-transcribe: `{"type": "duration", "seconds": ceil(seconds)}`.
Each billed request also says what it cost, `usd` (a decimal string, 8 places), from the fake's own
list prices (`LIST_PRICES`, FACTS.md; kept apart from voxq's price tables on purpose, so tests check
voxq's costs against what the provider says it charged); None for a model it has no price for.

Another provider than OpenAI: per instance, a `ModelSpec` per model (constructor `specs=`, `set_spec`,
`POST /_fake/config {"specs": {...}}`) gives its per-minute list price, a minimum billed length per
request (`min_billed_seconds`: the answer's usage says the audio's own ceil(seconds), the billing log
bills max(that, minimum), as hosts with a 10 s minimum invoice), the response formats it accepts (others:
400 `unsupported_value`, as OpenAI's gpt-4o models answer `verbose_json`) and whether its `verbose_json`
carries `words` (segment-only servers ignore `timestamp_granularities`) and whether answers say their `usage`
(the request is invoiced either way).
Only successful answers are billed; every billed answer is in `billing_log()` with the caller's
X-Client-Request-Id. A request that hangs (a scripted `timeout`) is never answered and never billed. A
request whose client hangs up while it is being worked on (its timeout shorter than the latency, or a
scripted `slow` answer) is finished and billed all the same, as OpenAI does (request log code
`client_disconnected`, `billed` true): the billing log is what the provider charged, not what clients
received.

Account-wide, at runtime: `exhaust_quota(None, after=N)` (every model answers 429 insufficient_quota once
N more requests were billed on the account) and `revoke_key(key, after=N)` (that key gets OpenAI's 401
invalid_api_key from then on, before anything else is looked at); `POST /_fake/account`.

Scripted behaviour, per model, at runtime (Python API in-process; JSON under `/_fake/...` otherwise):
latency, a fault mix by probability from a seeded RNG, a queue of scripted answers for the next
requests, quota exhaustion (now or after N billed requests), model_not_found, an RPM limit (sliding
60 s window of accepted requests), the maximum file size (413 above it; 25 MB like OpenAI) and the
longest audio gpt-4o models accept (400 above it; 1400 s like OpenAI).

Admin endpoints: POST /_fake/reset; POST /_fake/seed {"seed"}; POST /_fake/config {"max_file_bytes",
"max_audio_seconds", "models": {id: shutdown_date}, "specs": {id: ModelSpec fields}};
GET|POST /_fake/account {"exhaust_quota_after": N|null, "revoke_key": key, "revoke_after": N,
"restore_key": key}; GET|POST /_fake/models/{model} (ModelBehaviour fields, plus "exhaust_quota_after");
POST /_fake/models/{model}/script [fault, ...] (a kind name or a Fault as a dict; its `shape` writes the
error body as another server would, ERROR_SHAPES); GET /_fake/billing[?since=&until=];
GET /_fake/requests (since/until: Unix seconds of billing).

Run in-process: `fake = FakeOpenAI().start(); fake.base_url  # http://127.0.0.1:N/v1; fake.stop()`.
Run alone: `python -m tests.fakes.openai_server --port N`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from typing import Any

import anyio.to_thread
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

MAX_FILE_BYTES = 26_214_400
MAX_TOKEN_MODEL_AUDIO_SECONDS = 1400.0
SUPPORTED_EXTENSIONS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
JSON_ONLY_MODELS = ("gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-transcribe")
TOKEN_MODELS = ("gpt-4o-transcribe", "gpt-4o-mini-transcribe")
AUDIO_TOKENS_PER_SECOND = 10
# USD: token prices per 1M tokens, `per_minute` per minute of billed audio (OpenAI's list prices, Nov 2026).
LIST_PRICES: dict[str, dict[str, Decimal]] = {
    "gpt-4o-mini-transcribe": {
        "audio_in": Decimal("3.00"),
        "text_in": Decimal("1.25"),
        "out": Decimal("5.00"),
    },
    "gpt-4o-transcribe": {"audio_in": Decimal("6.00"), "text_in": Decimal("2.50"), "out": Decimal("10.00")},
    "whisper-1": {"per_minute": Decimal("0.006")},
    "gpt-transcribe": {"per_minute": Decimal("0.0045")},
}
SAMPLE_RATE = 16_000
# How whisper-1's verbose_json names a few languages (it answers names, not the ISO codes it is sent).
WHISPER_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "jv": "javanese"}
MAX_DECODE_SECONDS = 4 * 3600

# OpenAI's guide: these three shut down on 2027-02-26.
DEFAULT_MODELS: dict[str, str | None] = {
    "gpt-4o-mini-transcribe": "2027-02-26",
    "gpt-4o-transcribe": "2027-02-26",
    "whisper-1": "2027-02-26",
    "gpt-transcribe": None,
}

FAULT_KINDS = (
    "ok",  # answer normally (useful in a script: "fail, fail, then succeed")
    "rate_limit",  # 429 rate_limit_exceeded with retry-after-ms / retry-after
    "server_error",  # 500 (or `status`: 502, 503 ...)
    "timeout",  # hang without answering until the client gives up (or `seconds`), never billed
    "slow",  # answer normally after `seconds` (ModelBehaviour.slow_seconds), billed even if the client left
    "quota",  # 429 insufficient_quota
    "model_not_found",  # 404 model_not_found
    "invalid_file",  # 400 invalid_value, param file
    "auth",  # 401 invalid_api_key
    "too_large",  # 413
    "error",  # any: `status`, `code`, `type`, `message`, `param`
)

# Error bodies of OpenAI-compatible servers: OpenAI's `{"error": {...}}`; a FastAPI server's
# `{"detail": {"error": {...}}}` (faster-whisper-server in --config mode), `{"detail": "message"}` and
# `{"detail": [{"loc": ["body", param], "msg", "type"}]}` (request validation); plain text.
ERROR_SHAPES = ("openai", "fastapi", "detail_text", "validation", "text")


@dataclass
class Fault:
    """One scripted answer. `kind` is one of FAULT_KINDS; the other fields refine it."""

    kind: str
    status: int | None = None
    retry_after_ms: int | None = None
    retry_after: str | None = None  # seconds or an HTTP date, sent verbatim
    seconds: float | None = None  # timeout: how long to hang at most
    code: str | None = None
    type: str | None = None
    message: str | None = None
    param: str | None = None
    # How the error body is written (ERROR_SHAPES): OpenAI's by default, or another server's.
    shape: str = "openai"
    # rate_limit: exactly these headers instead of retry-after(-ms) (e.g. only OpenAI's
    # `x-ratelimit-reset-requests`; {} for a bare 429 that says nothing about when to come back).
    headers: dict[str, str] | None = None
    text: str | None = None  # "ok": answer this text instead of what the fake heard (speech it can't hear)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {FAULT_KINDS}")
        if self.shape not in ERROR_SHAPES:
            raise ValueError(f"unknown error shape {self.shape!r}; one of {ERROR_SHAPES}")

    @classmethod
    def of(cls, value: Fault | str | dict[str, Any]) -> Fault:
        """A Fault from a Fault, a kind name or a dict (the admin endpoints' JSON)."""
        if isinstance(value, Fault):
            return value
        if isinstance(value, str):
            return cls(kind=value)
        return cls(**value)


@dataclass
class ModelBehaviour:
    """How the fake treats requests for one model."""

    latency: float = 0.0  # seconds from the request's arrival to its answer (reading and parsing included)
    latency_jitter: float = 0.0  # plus uniform(0, jitter)
    faults: dict[str, float] = field(default_factory=dict)  # kind[:status] -> probability per request
    retry_after_ms: int | None = 250  # sent with random rate_limit faults
    quota_after: int | None = None  # insufficient_quota once this many requests were billed (0 = now)
    gone: bool = False  # 404 model_not_found from now on
    rpm_limit: int | None = None  # 429 beyond this many accepted requests in 60 s
    hang_seconds: float = 300.0  # timeout faults hang at most this long
    slow_seconds: float = 10.0  # slow faults answer after this long


@dataclass(frozen=True)
class ModelSpec:
    """What one model of this provider is (per instance): its price, billing minimum and answers."""

    per_minute: Decimal | None = None  # USD per billed minute; None: LIST_PRICES (or unpriced)
    min_billed_seconds: float = 0.0  # each request is billed at least this long
    response_formats: tuple[str, ...] | None = None  # None: OpenAI's rule (JSON_ONLY_MODELS)
    words: bool = True  # verbose_json has `words` when asked for them
    usage: bool = True  # the answer says its `usage` (self-hosted servers do not; it is billed all the same)

    @classmethod
    def of(cls, value: ModelSpec | dict[str, Any]) -> ModelSpec:
        """A spec from a spec or the admin endpoints' JSON (prices as strings or numbers)."""
        if isinstance(value, ModelSpec):
            return value
        fields = dict(value)
        if fields.get("per_minute") is not None:
            fields["per_minute"] = Decimal(str(fields["per_minute"]))
        if fields.get("response_formats") is not None:
            fields["response_formats"] = tuple(str(f) for f in fields["response_formats"])
        if "min_billed_seconds" in fields:
            fields["min_billed_seconds"] = float(fields["min_billed_seconds"])
        return cls(**fields)

    def as_json(self) -> dict[str, Any]:
        """The spec as the admin endpoints show it."""
        return {
            "per_minute": None if self.per_minute is None else str(self.per_minute),
            "min_billed_seconds": self.min_billed_seconds,
            "response_formats": None if self.response_formats is None else list(self.response_formats),
            "words": self.words,
            "usage": self.usage,
        }


@dataclass
class Decoded:
    """What the fake heard in a file."""

    duration: float
    regions: list[tuple[float, float, int]]  # (start, end, frequency Hz)
    said: str | None = None  # a scripted answer's text (Fault.text), for speech the fake cannot hear

    @property
    def text(self) -> str:
        """The transcript: the scripted text, else one `tone<F>` word per region."""
        if self.said is not None:
            return self.said
        return " ".join(f"tone{freq}" for _, _, freq in self.regions)


class InvalidAudio(Exception):
    """The upload is not decodable audio."""


def decode_audio(data: bytes) -> Decoded:
    """Decode any container PyAV reads to 16 kHz mono and find its tones (see the module docstring)."""
    import av

    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InvalidAudio("no audio stream")
            stream = container.streams.audio[0]
            resampler: av.AudioResampler | None = None
            for frame in container.decode(stream):
                direct = _direct_samples(frame)
                if direct is not None and resampler is None:
                    # 16 kHz mono already (what voxq uploads): skip the resampler, a third of the CPU.
                    chunks.append(direct)
                    total += direct.size
                else:
                    resampler = resampler or av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                    for out in resampler.resample(frame):
                        arr = out.to_ndarray().reshape(-1)
                        chunks.append(arr)
                        total += arr.size
                if total > MAX_DECODE_SECONDS * SAMPLE_RATE:
                    raise InvalidAudio("audio too long")
            for out in resampler.resample(None) if resampler is not None else []:
                chunks.append(out.to_ndarray().reshape(-1))
    except InvalidAudio:
        raise
    except Exception as exc:  # PyAV raises many error types for garbage input
        raise InvalidAudio(type(exc).__name__) from exc
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, dtype=np.float32)
    return Decoded(duration=samples.size / SAMPLE_RATE, regions=find_tones(samples, SAMPLE_RATE))


def _direct_samples(frame: Any) -> np.ndarray | None:
    """Float samples of a 16 kHz mono s16/flt frame without resampling; None for anything else."""
    if frame.sample_rate != SAMPLE_RATE or frame.layout.nb_channels != 1:
        return None
    name = frame.format.name
    if name in ("s16", "s16p"):
        return frame.to_ndarray().reshape(-1).astype(np.float32) / 32768.0
    if name in ("flt", "fltp"):
        return frame.to_ndarray().reshape(-1).astype(np.float32)
    return None


def find_tones(samples: np.ndarray, rate: int) -> list[tuple[float, float, int]]:
    """Non-silent regions of `samples` with each one's dominant frequency (nearest 10 Hz)."""
    frame = rate // 50  # 20 ms
    n_frames = samples.size // frame
    if n_frames == 0:
        return []
    frames = samples[: n_frames * frame].reshape(n_frames, frame)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    threshold = max(0.01, 0.05 * float(rms.max()))
    loud = rms >= threshold
    regions: list[list[int]] = []
    for i, is_loud in enumerate(loud):
        if not is_loud:
            continue
        if regions and i - regions[-1][1] <= 5:  # bridge gaps of up to 0.1 s
            regions[-1][1] = i + 1
        else:
            regions.append([i, i + 1])
    found: list[tuple[float, float, int]] = []
    for start, end in regions:
        if end - start < 3:  # under 60 ms: a click, not a tone
            continue
        segment = samples[start * frame : end * frame].astype(np.float64)
        window = np.hanning(segment.size)
        n_fft = max(segment.size, rate * 2)  # zero-pad to 0.5 Hz bins
        spectrum = np.abs(np.fft.rfft(segment * window, n=n_fft))
        spectrum[0] = 0.0
        peak = int(np.argmax(spectrum))
        freq = peak * rate / n_fft
        found.append((start * frame / rate, end * frame / rate, round(freq / 10.0) * 10))
    return found


def billed_seconds(usage: dict[str, Any], spec: ModelSpec | None = None) -> int | None:
    """The seconds a duration-priced answer is billed for: its usage's seconds, at least the model's
    minimum (None for token usage)."""
    if usage.get("type") != "duration":
        return None
    minimum = math.ceil(spec.min_billed_seconds) if spec is not None else 0
    return max(int(usage["seconds"]), minimum)


def billed_usd(model: str, usage: dict[str, Any], spec: ModelSpec | None = None) -> str | None:
    """What the fake charges for one answer with this `usage`: the spec's per-minute price and minimum,
    else `LIST_PRICES`; None if unpriced."""
    prices: dict[str, Decimal] | None = None
    if spec is not None and spec.per_minute is not None:
        prices = {"per_minute": spec.per_minute}
    else:
        known = [name for name in LIST_PRICES if model == name or model.startswith(name + "-")]
        prices = LIST_PRICES[max(known, key=len)] if known else None
    if prices is None:
        return None
    if usage["type"] == "tokens" and "audio_in" in prices:
        details = usage["input_token_details"]
        usd = (
            details["audio_tokens"] * prices["audio_in"]
            + details["text_tokens"] * prices["text_in"]
            + usage["output_tokens"] * prices["out"]
        ) / 1_000_000
    elif usage["type"] == "duration" and "per_minute" in prices:
        usd = Decimal(billed_seconds(usage, spec) or 0) * prices["per_minute"] / 60
    else:
        return None
    return str(usd.quantize(Decimal("0.00000001")))


def _error(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class FakeOpenAI:
    """The fake OpenAI API: state, scripting API, and the server that runs it."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 1234,
        models: dict[str, str | None] | None = None,
        api_keys: set[str] | None = None,
        specs: dict[str, ModelSpec] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._initial_specs = {m: ModelSpec.of(spec) for m, spec in (specs or {}).items()}
        self._initial_models = dict(DEFAULT_MODELS if models is None else models)
        for model in self._initial_specs:
            self._initial_models.setdefault(model, None)
        self._initial_seed = seed
        self.api_keys = api_keys  # None: any non-empty bearer token is accepted
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()
        self.app = Starlette(
            routes=[
                Route("/v1/audio/transcriptions", self._transcribe, methods=["POST"]),
                Route("/v1/models", self._list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self._get_model, methods=["GET"]),
                Route("/_fake/reset", self._admin_reset, methods=["POST"]),
                Route("/_fake/seed", self._admin_seed, methods=["POST"]),
                Route("/_fake/config", self._admin_config, methods=["POST"]),
                Route("/_fake/account", self._admin_account, methods=["POST", "GET"]),
                Route("/_fake/models/{model:path}/script", self._admin_script, methods=["POST"]),
                Route("/_fake/models/{model:path}", self._admin_model, methods=["POST", "GET"]),
                Route("/_fake/billing", self._admin_billing, methods=["GET"]),
                Route("/_fake/requests", self._admin_requests, methods=["GET"]),
            ]
        )

    # ---- state and scripting (thread-safe; callable from tests while the server runs) ----

    def reset(self) -> None:
        """Forget all behaviour, scripts and logs; back to the constructor's models and seed."""
        with self._lock:
            self.models: dict[str, str | None] = dict(self._initial_models)
            self._behaviour: dict[str, ModelBehaviour] = {}
            self._scripts: dict[str, deque[Fault]] = {}
            self._billed_count: dict[str, int] = {}
            self._specs: dict[str, ModelSpec] = dict(self._initial_specs)
            # Account-wide: requests billed, insufficient_quota from this count on, revoked keys (key ->
            # the count from which it is refused).
            self._account_billed = 0
            self._account_quota_after: int | None = None
            self._revoked: dict[str, int] = {}
            self._accepted: dict[str, deque[float]] = {}
            self._billing: list[dict[str, Any]] = []
            self._requests: list[dict[str, Any]] = []
            self._rng = random.Random(self._initial_seed)
            self.max_file_bytes = MAX_FILE_BYTES
            # gpt-4o(-mini)-transcribe refuse audio longer than this (OpenAI: 1400 s per request).
            self.max_audio_seconds = MAX_TOKEN_MODEL_AUDIO_SECONDS
            # Requests of an earlier test may still be in flight: keep counting them, not from zero.
            self.in_flight: int = getattr(self, "in_flight", 0)
            self.max_in_flight = self.in_flight

    def seed(self, seed: int) -> None:
        """Re-seed the RNG behind random faults and latency jitter."""
        with self._lock:
            self._rng = random.Random(seed)

    def configure(self, model: str, **changes: Any) -> ModelBehaviour:
        """Change how `model` behaves (fields of ModelBehaviour); returns the new behaviour."""
        with self._lock:
            behaviour = self._behaviour.setdefault(model, ModelBehaviour())
            for key, value in changes.items():
                if not hasattr(behaviour, key):
                    raise ValueError(f"unknown behaviour {key!r}")
                if key == "faults":
                    for kind in value:
                        name, _, status = kind.partition(":")
                        Fault(kind=name, status=int(status) if status else None)  # validates it
                    value = dict(value)
                setattr(behaviour, key, value)
            return ModelBehaviour(**asdict(behaviour))

    def behaviour(self, model: str) -> ModelBehaviour:
        """A copy of how `model` behaves now."""
        with self._lock:
            return ModelBehaviour(**asdict(self._behaviour.get(model, ModelBehaviour())))

    def script(self, model: str, faults: list[Fault | str | dict[str, Any]]) -> None:
        """Queue answers: the next len(faults) requests for `model` get these, in order."""
        parsed = [Fault.of(f) for f in faults]
        with self._lock:
            self._scripts.setdefault(model, deque()).extend(parsed)

    def exhaust_quota(self, model: str | None = None, after: int = 0) -> None:
        """429 insufficient_quota once `after` more requests were billed (0: from now on): for `model`
        (counting its billed requests), or for every model of the account when `model` is None (counting
        the account's)."""
        with self._lock:
            if model is None:
                self._account_quota_after = self._account_billed + after
                return
            already = self._billed_count.get(model, 0)
            self._behaviour.setdefault(model, ModelBehaviour()).quota_after = already + after

    def restore_quota(self) -> None:
        """The account has quota again (a model's own `quota_after` stays)."""
        with self._lock:
            self._account_quota_after = None

    def revoke_key(self, key: str, after: int = 0) -> None:
        """`key` is refused (401 invalid_api_key, OpenAI's body) once `after` more requests were billed on
        the account (0: from now on)."""
        with self._lock:
            self._revoked[key] = self._account_billed + after

    def restore_key(self, key: str) -> None:
        """`key` is accepted again."""
        with self._lock:
            self._revoked.pop(key, None)

    def set_spec(self, model: str, **fields: Any) -> ModelSpec:
        """Change what `model` is (ModelSpec fields; it is listed in /v1/models from now on)."""
        with self._lock:
            current = self._specs.get(model, ModelSpec()).as_json()
            unknown = set(fields) - set(current)
            if unknown:
                raise ValueError(f"unknown spec field {sorted(unknown)[0]!r}")
            spec = ModelSpec.of({**current, **fields})
            self._specs[model] = spec
            self.models.setdefault(model, None)
            return spec

    def spec(self, model: str) -> ModelSpec | None:
        """What this instance says `model` is (None: OpenAI's defaults)."""
        with self._lock:
            return self._specs.get(model)

    def account(self) -> dict[str, Any]:
        """Account-wide state: requests billed, the quota limit, how many keys are revoked now."""
        with self._lock:
            return {
                "billed": self._account_billed,
                "quota_after": self._account_quota_after,
                "quota_exhausted": self._account_exhausted(),
                "revoked_keys": sum(1 for at in self._revoked.values() if self._account_billed >= at),
            }

    def _account_exhausted(self) -> bool:
        """Under the lock: the account's quota has run out."""
        return self._account_quota_after is not None and self._account_billed >= self._account_quota_after

    def retire(self, model: str) -> None:
        """`model` answers 404 model_not_found from now on (and leaves /v1/models)."""
        with self._lock:
            self._behaviour.setdefault(model, ModelBehaviour()).gone = True

    def add_model(self, model: str, shutdown_date: str | None = None) -> None:
        """List `model` in /v1/models (with an optional shutdown date, ISO format)."""
        with self._lock:
            self.models[model] = shutdown_date

    def billing_log(self) -> list[dict[str, Any]]:
        """Every billed request: {request_id, model, audio_seconds, usage, billed_seconds (duration
        usage: what was invoiced, at least the model's minimum), usage_answered (the answer said its usage),
        usd, text, ts, x_request_id}."""
        with self._lock:
            return [dict(entry) for entry in self._billing]

    def request_log(self) -> list[dict[str, Any]]:
        """Every request received: {request_id, model, status, code, fault, prompt, response_format,
        granularities, received, ts, x_request_id}; `received` is when the request arrived and `ts` when it
        was answered (epoch s)."""
        with self._lock:
            return [dict(entry) for entry in self._requests]

    # ---- server lifecycle ----

    @property
    def base_url(self) -> str:
        """The OpenAI base URL clients use, ending in /v1."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        """The server's root (admin endpoints live under /_fake)."""
        return f"http://{self.host}:{self.port}"

    def _config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            backlog=4096,
            timeout_keep_alive=30,
        )

    def start(self) -> FakeOpenAI:
        """Serve on a free 127.0.0.1 port (or the given one) in a background thread; return self."""
        if self.port == 0:
            from voxq.embedded import free_port

            self.port = free_port()
        self._server = uvicorn.Server(self._config())
        self._thread = threading.Thread(target=self._server.run, name="fake-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (hanging requests are cut)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- request handling ----

    def _log(self, entry: dict[str, Any]) -> None:
        entry["ts"] = time.time()
        with self._lock:
            self._requests.append(entry)

    def _auth_error(self, request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            return _error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        with self._lock:
            revoked = token in self._revoked and self._account_billed >= self._revoked[token]
        if revoked or (self.api_keys is not None and token not in self.api_keys):
            masked = token[:3] + "*" * 6 + token[-4:] if len(token) > 8 else "***"
            return _error(
                401,
                f"Incorrect API key provided: {masked}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        return None

    def _pick_fault(self, model: str) -> tuple[Fault | None, ModelBehaviour]:
        """The scripted or random fault for this request (None: answer normally), under the lock."""
        behaviour = self._behaviour.get(model, ModelBehaviour())
        script = self._scripts.get(model)
        if script:
            return script.popleft(), behaviour
        if behaviour.gone:
            return Fault("model_not_found"), behaviour
        if self._account_exhausted():
            return Fault("quota"), behaviour
        if behaviour.quota_after is not None and self._billed_count.get(model, 0) >= behaviour.quota_after:
            return Fault("quota"), behaviour
        draw = self._rng.random()
        cumulative = 0.0
        for kind, probability in behaviour.faults.items():
            cumulative += probability
            if draw < cumulative:
                # "server_error:503" picks a status for a random fault (a 5% mix of 500 and 503)
                name, _, status = kind.partition(":")
                return (
                    Fault(
                        name, status=int(status) if status else None, retry_after_ms=behaviour.retry_after_ms
                    ),
                    behaviour,
                )
        return None, behaviour

    def _rpm_check(self, model: str, behaviour: ModelBehaviour) -> float | None:
        """None when under the RPM limit (and the request is counted); else seconds until a slot frees."""
        now = time.monotonic()
        window = self._accepted.setdefault(model, deque())
        while window and window[0] <= now - 60.0:
            window.popleft()
        if behaviour.rpm_limit is not None and len(window) >= behaviour.rpm_limit:
            return max(window[0] + 60.0 - now, 0.001)
        window.append(now)
        return None

    def _fault_response(
        self, fault: Fault, model: str, behaviour: ModelBehaviour, request: Request
    ) -> Response:
        if fault.kind == "rate_limit" and fault.headers is not None:
            return _error(
                429,
                fault.message
                or f"Rate limit reached for {model} in organization org-fake on requests per min "
                "(RPM). Please try again shortly.",
                type="requests",
                code="rate_limit_exceeded",
                headers=dict(fault.headers),
            )
        if fault.kind == "rate_limit":
            headers: dict[str, str] = {}
            ms = fault.retry_after_ms if fault.retry_after_ms is not None else behaviour.retry_after_ms
            if ms is not None:
                headers["retry-after-ms"] = str(ms)
                headers["retry-after"] = str(max(1, math.ceil(ms / 1000)))
                # OpenAI also says which limit ran out and when it resets.
                headers["x-ratelimit-remaining-requests"] = "0"
                headers["x-ratelimit-reset-requests"] = f"{ms}ms"
            if fault.retry_after is not None:
                headers["retry-after"] = fault.retry_after
                if fault.retry_after_ms is None:
                    headers.pop("retry-after-ms", None)
            return _error(
                429,
                fault.message
                or f"Rate limit reached for {model} in organization org-fake on requests per min (RPM). "
                "Please try again shortly.",
                type="requests",
                code="rate_limit_exceeded",
                headers=headers,
            )
        if fault.kind == "server_error":
            status = fault.status or 500
            if status == 502:
                # Real 502s come from the edge proxy as HTML, not JSON.
                return Response(
                    "<html><head><title>502 Bad Gateway</title></head><body>"
                    "<center><h1>502 Bad Gateway</h1></center></body></html>",
                    status_code=502,
                    media_type="text/html",
                )
            return _error(
                status,
                fault.message or "The server had an error while processing your request. Sorry about that!",
                type="server_error",
            )
        if fault.kind == "quota":
            return _error(
                429,
                "You exceeded your current quota, please check your plan and billing details. For more "
                "information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                type="insufficient_quota",
                code="insufficient_quota",
            )
        if fault.kind == "model_not_found":
            return _error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        if fault.kind == "invalid_file":
            return _error(
                400,
                fault.message or "Audio file might be corrupted or unsupported",
                code="invalid_value",
                param="file",
            )
        if fault.kind == "auth":
            return _error(
                401,
                "Incorrect API key provided: sk-fak******1234. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        if fault.kind == "too_large":
            return self._too_large(int(request.headers.get("content-length", "0") or 0))
        # "error": fully described by the script.
        return _error(
            fault.status or 400,
            fault.message or "Scripted error.",
            type=fault.type or "invalid_request_error",
            code=fault.code,
            param=fault.param,
        )

    def _too_large(self, size: int) -> Response:
        return _error(
            413,
            f"Maximum content size limit ({self.max_file_bytes}) exceeded ({size} bytes read)",
            type="server_error",
        )

    async def _client_left_during(self, request: Request, seconds: float) -> bool:
        """Wait `seconds`; True when the client disconnected in that time (the wait runs to its end)."""
        until = time.monotonic() + seconds
        try:
            async with asyncio.timeout(seconds):
                while True:
                    message = await request.receive()
                    if message["type"] == "http.disconnect":
                        break
        except TimeoutError:
            return False
        await asyncio.sleep(max(until - time.monotonic(), 0.0))  # the work goes on without a listener
        return True

    async def _hang(self, request: Request, seconds: float) -> None:
        """Answer nothing until the client gives up (disconnects) or `seconds` pass."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    message = await request.receive()
                    if message["type"] == "http.disconnect":
                        return

    async def _transcribe(self, request: Request) -> Response:
        request_id = request.headers.get("x-client-request-id")
        x_request_id = "req_" + uuid.uuid4().hex
        entry: dict[str, Any] = {
            "request_id": request_id,
            "x_request_id": x_request_id,
            "model": None,
            "fault": None,
            "code": None,
            "billed": False,
            "prompt": None,
            "received": time.time(),
        }
        arrived = time.monotonic()
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = await self._handle_transcribe(request, entry, arrived)
        finally:
            with self._lock:
                self.in_flight -= 1
        response.headers["x-request-id"] = x_request_id
        response.headers["openai-version"] = "2020-10-01"
        entry["status"] = response.status_code
        if response.status_code >= 400 and entry["code"] not in ("timeout", "client_disconnected"):
            entry["code"] = _error_code(response)
        self._log(entry)
        return response

    async def _handle_transcribe(self, request: Request, entry: dict[str, Any], arrived: float) -> Response:
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        size = int(request.headers.get("content-length", "0") or 0)
        if size > self.max_file_bytes + 64 * 1024:
            return self._too_large(size)
        try:
            form = await request.form(max_files=4, max_fields=64)
        except Exception:
            return _error(400, "Could not parse multipart form")
        try:
            model = form.get("model")
            upload = form.get("file")
            if not isinstance(model, str) or not model:
                return _error(400, "you must provide a model parameter", code="missing_required_parameter")
            entry["model"] = model
            if not isinstance(upload, UploadFile):
                return _error(
                    400,
                    "Missing required parameter: 'file'.",
                    code="missing_required_parameter",
                    param="file",
                )
            data = await upload.read()
            filename = upload.filename or ""
            response_format = str(form.get("response_format") or "json")
            granularities = [str(g) for g in form.getlist("timestamp_granularities[]")]
            prompt = str(form.get("prompt") or "")
            entry["prompt"] = prompt or None
            entry["response_format"] = response_format
            entry["granularities"] = granularities
            language = form.get("language")
        finally:
            await form.close()

        with self._lock:
            fault, behaviour = self._pick_fault(model)
            wait = None if fault is not None else self._rpm_check(model, behaviour)
            latency = behaviour.latency + (
                self._rng.uniform(0, behaviour.latency_jitter) if behaviour.latency_jitter else 0.0
            )
        # A provider's latency runs from the request's arrival: the time spent here reading and parsing
        # the upload is part of it, not added to it (else a busy fake answers later than configured).
        delay = max(0.0, latency - (time.monotonic() - arrived)) if latency > 0 else 0.0
        if fault is not None and fault.kind == "slow":
            slow = fault.seconds if fault.seconds is not None else behaviour.slow_seconds
            delay = max(delay, slow - (time.monotonic() - arrived))
            fault = Fault("ok")
        if model not in self.models and (fault is None or fault.kind == "ok"):
            fault = Fault("model_not_found")
        if fault is not None:
            entry["fault"] = fault.kind
        if wait is not None:
            return _error(
                429,
                f"Rate limit reached for {model} in organization org-fake on requests per min (RPM): "
                f"Limit {behaviour.rpm_limit}, Used {behaviour.rpm_limit}, Requested 1. "
                f"Please try again in {wait:.3f}s.",
                type="requests",
                code="rate_limit_exceeded",
                headers={
                    "retry-after-ms": str(math.ceil(wait * 1000)),
                    "retry-after": str(math.ceil(wait)),
                    "x-ratelimit-limit-requests": str(behaviour.rpm_limit),
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": f"{math.ceil(wait * 1000)}ms",
                },
            )
        if delay > 0 and await self._client_left_during(request, delay):
            # The client gave up (its timeout was shorter than our latency); the work goes on and is
            # billed, as OpenAI bills a request it processed whoever was still listening.
            entry["code"] = "client_disconnected"
        if fault is not None and fault.kind == "timeout":
            entry["code"] = "timeout"
            await self._hang(request, fault.seconds if fault.seconds is not None else behaviour.hang_seconds)
            return _error(504, "Gateway timeout.", type="server_error")
        if fault is not None and fault.kind != "ok":
            response = self._fault_response(fault, model, behaviour, request)
            return reshape_error(response, fault.shape)

        if len(data) > self.max_file_bytes:
            return self._too_large(len(data))
        extension = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
        if extension not in SUPPORTED_EXTENSIONS:
            return _error(400, f"Invalid file format. Supported formats: {list(SUPPORTED_EXTENSIONS)}")
        if response_format not in ("json", "text", "verbose_json", "srt", "vtt"):
            return _error(
                400, f"Invalid value: '{response_format}'.", code="invalid_value", param="response_format"
            )
        with self._lock:
            spec = self._specs.get(model)
        if spec is not None and spec.response_formats is not None:
            refused = response_format not in spec.response_formats
        else:
            refused = model.startswith(JSON_ONLY_MODELS) and response_format not in ("json", "text")
        if refused:
            return _error(
                400,
                f"response_format '{response_format}' is not compatible with model '{model}'. "
                "Use 'json' or 'text' instead.",
                code="unsupported_value",
                param="response_format",
            )
        try:
            decoded = await anyio.to_thread.run_sync(decode_audio, data)
        except InvalidAudio:
            return _error(
                400, "Audio file might be corrupted or unsupported", code="invalid_value", param="file"
            )
        if decoded.duration < 0.1:
            return _error(
                400,
                "Audio file is too short. Minimum audio length is 0.1 seconds.",
                code="audio_too_short",
                param="file",
            )
        if model.startswith(TOKEN_MODELS) and decoded.duration > self.max_audio_seconds:
            return _error(
                400,
                f"audio duration {decoded.duration:g} seconds is longer than "
                f"{self.max_audio_seconds:g} seconds which is the maximum for this model",
                code="invalid_value",
            )

        if fault is not None and fault.text is not None:
            decoded = replace(decoded, said=fault.text)
        text = decoded.text
        usage = self._usage(model, decoded.duration, prompt, text)
        with self._lock:
            # Quota may have run out while this request decoded; the check and the count are one step.
            quota_after = self._behaviour.get(model, ModelBehaviour()).quota_after
            if self._account_exhausted() or (
                quota_after is not None and self._billed_count.get(model, 0) >= quota_after
            ):
                exhausted = True
            else:
                exhausted = False
                self._billed_count[model] = self._billed_count.get(model, 0) + 1
                self._account_billed += 1
                self._billing.append(
                    {
                        "request_id": entry["request_id"],
                        "x_request_id": entry["x_request_id"],
                        "model": model,
                        "audio_seconds": decoded.duration,
                        "usage": usage,
                        "billed_seconds": billed_seconds(usage, spec),
                        "usage_answered": spec is None or spec.usage,
                        "usd": billed_usd(model, usage, spec),
                        "text": text,
                        "ts": time.time(),
                    }
                )
        if exhausted:
            return self._fault_response(Fault("quota"), model, behaviour, request)
        entry["billed"] = True
        words = spec is None or spec.words
        asked = granularities if words else []  # a segment-only server ignores the granularities
        said = usage if spec is None or spec.usage else None
        return self._answer(model, decoded, said, response_format, asked, language)

    def _usage(self, model: str, seconds: float, prompt: str, text: str) -> dict[str, Any]:
        if model.startswith(TOKEN_MODELS):
            audio_tokens = math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)
            text_tokens = math.ceil(len(prompt) / 4)
            output_tokens = math.ceil(len(text) / 4) + 1
            input_tokens = audio_tokens + text_tokens
            return {
                "type": "tokens",
                "input_tokens": input_tokens,
                "input_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens},
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            }
        return {"type": "duration", "seconds": math.ceil(seconds)}

    def _answer(
        self,
        model: str,
        decoded: Decoded,
        usage: dict[str, Any] | None,
        response_format: str,
        granularities: list[str],
        language: object,
    ) -> Response:
        text = decoded.text
        if response_format == "text":
            return PlainTextResponse(text)
        if response_format in ("srt", "vtt"):
            return PlainTextResponse(_subtitles(decoded, vtt=response_format == "vtt"))
        if response_format == "verbose_json":
            body: dict[str, Any] = {
                "task": "transcribe",
                # whisper-1 names the language ("english") though the request gives an ISO code.
                "language": WHISPER_NAMES.get(str(language or "en"), str(language)),
                "duration": round(decoded.duration, 3),
                "text": text,
            }
            if usage is not None:
                body["usage"] = usage
            if not granularities or "segment" in granularities:
                body["segments"] = [
                    {
                        "id": i,
                        "seek": 0,
                        "start": round(start, 3),
                        "end": round(end, 3),
                        "text": f" tone{freq}",
                        "tokens": [50364, 1000 + i, 50414],
                        "temperature": 0.0,
                        "avg_logprob": -0.2,
                        "compression_ratio": 0.8,
                        "no_speech_prob": 0.01,
                    }
                    for i, (start, end, freq) in enumerate(decoded.regions)
                ]
            if "word" in granularities:
                body["words"] = [
                    {"word": f"tone{freq}", "start": round(start, 3), "end": round(end, 3)}
                    for start, end, freq in decoded.regions
                ]
            return JSONResponse(body)
        return JSONResponse({"text": text, "usage": usage} if usage is not None else {"text": text})

    async def _list_models(self, request: Request) -> Response:
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        with self._lock:
            listed = {
                m: d for m, d in self.models.items() if not self._behaviour.get(m, ModelBehaviour()).gone
            }
        return JSONResponse({"object": "list", "data": [_model_object(m, d) for m, d in listed.items()]})

    async def _get_model(self, request: Request) -> Response:
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        model = request.path_params["model"]
        with self._lock:
            known = model in self.models and not self._behaviour.get(model, ModelBehaviour()).gone
            shutdown = self.models.get(model)
        if not known:
            return _error(
                404,
                f"The model '{model}' does not exist",
                code="model_not_found",
                param="model",
            )
        return JSONResponse(_model_object(model, shutdown))

    # ---- admin endpoints (for a fake running as its own process) ----

    async def _admin_reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"ok": True})

    async def _admin_seed(self, request: Request) -> Response:
        self.seed(int((await request.json())["seed"]))
        return JSONResponse({"ok": True})

    async def _admin_config(self, request: Request) -> Response:
        body = await request.json()
        if "max_file_bytes" in body:
            self.max_file_bytes = int(body["max_file_bytes"])
        if "max_audio_seconds" in body:
            self.max_audio_seconds = float(body["max_audio_seconds"])
        for model, shutdown in (body.get("models") or {}).items():
            self.add_model(model, shutdown)
        specs = {}
        try:
            for model, fields in (body.get("specs") or {}).items():
                specs[model] = self.set_spec(model, **fields).as_json()
        except (TypeError, ValueError, ArithmeticError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"ok": True, "max_file_bytes": self.max_file_bytes, "specs": specs})

    async def _admin_account(self, request: Request) -> Response:
        """Account-wide faults: quota for every model, a key revoked (or restored)."""
        if request.method == "POST":
            body = await request.json()
            try:
                if "exhaust_quota_after" in body:
                    after = body["exhaust_quota_after"]
                    if after is None:
                        self.restore_quota()
                    else:
                        self.exhaust_quota(None, int(after))
                if body.get("revoke_key"):
                    self.revoke_key(str(body["revoke_key"]), int(body.get("revoke_after", 0)))
                if body.get("restore_key"):
                    self.restore_key(str(body["restore_key"]))
            except (TypeError, ValueError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(self.account())

    async def _admin_model(self, request: Request) -> Response:
        model = request.path_params["model"]
        if request.method == "GET":
            return JSONResponse(asdict(self.behaviour(model)))
        body = await request.json()
        try:
            if "exhaust_quota_after" in body:
                self.exhaust_quota(model, int(body.pop("exhaust_quota_after")))
            behaviour = self.configure(model, **body)
        except (TypeError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(asdict(behaviour))

    async def _admin_script(self, request: Request) -> Response:
        try:
            self.script(request.path_params["model"], list(await request.json()))
        except (TypeError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"ok": True})

    async def _admin_billing(self, request: Request) -> Response:
        """The billing log, like a provider's per-request usage export; `?since=&until=` (Unix seconds)
        keep the requests billed in that range."""
        try:
            since = float(request.query_params.get("since", "-inf"))
            until = float(request.query_params.get("until", "inf"))
        except ValueError:
            return JSONResponse({"error": "since and until are Unix timestamps"}, status_code=400)
        return JSONResponse([e for e in self.billing_log() if since <= e["ts"] <= until])

    async def _admin_requests(self, request: Request) -> Response:
        return JSONResponse(self.request_log())


def reshape_error(response: Response, shape: str) -> Response:
    """An OpenAI error answer rewritten in another server's body shape (ERROR_SHAPES); status and
    headers kept. Anything that is not an OpenAI error body is returned as it is."""
    try:
        error = json.loads(bytes(response.body))["error"]
    except (ValueError, KeyError, TypeError):
        return response
    if shape == "openai" or not isinstance(error, dict):
        return response
    headers = {
        k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")
    }
    message = str(error.get("message") or "")
    if shape == "text":
        return PlainTextResponse(message, status_code=response.status_code, headers=headers)
    body: Any
    if shape == "fastapi":
        body = {"detail": {"error": error}}
    elif shape == "detail_text":
        body = {"detail": message}
    else:  # validation
        loc = ["body", error["param"]] if error.get("param") else ["body"]
        body = {"detail": [{"loc": loc, "msg": message, "type": error.get("code") or "value_error"}]}
    return JSONResponse(body, status_code=response.status_code, headers=headers)


def _error_code(response: Response) -> str:
    """The `error.code` the client sees (or http_<status> when there is none), for the request log."""
    try:
        code = json.loads(bytes(response.body))["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return str(code) if code else f"http_{response.status_code}"


def _model_object(model: str, shutdown: str | None) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
    if shutdown is not None:
        obj["shutdown_date"] = shutdown
    return obj


def _timestamp(seconds: float, *, vtt: bool) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    sep = "." if vtt else ","
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"


def _subtitles(decoded: Decoded, *, vtt: bool) -> str:
    lines = ["WEBVTT", ""] if vtt else []
    for i, (start, end, freq) in enumerate(decoded.regions, start=1):
        if not vtt:
            lines.append(str(i))
        lines.append(f"{_timestamp(start, vtt=vtt)} --> {_timestamp(end, vtt=vtt)}")
        lines.extend([f"tone{freq}", ""])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the fake as its own process (scripted through /_fake/...)."""
    parser = argparse.ArgumentParser(description="Fake OpenAI transcription API for voxq tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--api-key", action="append", help="accept only these keys (repeatable)")
    args = parser.parse_args(argv)
    fake = FakeOpenAI(
        host=args.host, port=args.port, seed=args.seed, api_keys=set(args.api_key) if args.api_key else None
    )
    uvicorn.Server(fake._config()).run()


if __name__ == "__main__":
    main()
