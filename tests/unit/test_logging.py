"""Structured logs: JSON shape, context ids, human format, and redaction of anything secret-shaped."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from core.logs import (
    REDACTED,
    VoxqHandler,
    bind_log_context,
    configure_logging,
    current_log_context,
    log_context,
    redact,
    reset_log_context,
)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    root = logging.getLogger()
    saved_level = root.level
    # Whatever a test binds and leaves bound is undone: an empty bind's token restores the context as it
    # was before the test.
    token = bind_log_context()
    yield buf
    for handler in [h for h in root.handlers if isinstance(h, VoxqHandler)]:
        root.removeHandler(handler)
    root.setLevel(saved_level)
    reset_log_context(token)


def _lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_line_shape_and_context(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream=stream, redacted_values=[])
    log = logging.getLogger("voxq.test")
    with log_context(batch_id="b1", job_id="j1"):
        with log_context(attempt=2, model="gpt-4o-mini-transcribe"):
            log.info("transcribed %d chunks", 3)
        log.warning("after inner")
    log.info("outside")
    first, second, third = _lines(stream)
    assert first["level"] == "info"
    assert first["logger"] == "voxq.test"
    assert first["event"] == "transcribed 3 chunks"
    assert str(first["ts"]).endswith("Z") and "T" in str(first["ts"])
    assert (first["batch_id"], first["job_id"], first["attempt"], first["model"]) == (
        "b1",
        "j1",
        2,
        "gpt-4o-mini-transcribe",
    )
    assert second["job_id"] == "j1" and "attempt" not in second and second["level"] == "warning"
    assert "job_id" not in third and "batch_id" not in third


def test_one_line_per_event_even_with_newlines_and_tracebacks(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream=stream, redacted_values=[])
    log = logging.getLogger("voxq.test")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("failed\nbadly")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "failed\nbadly"
    assert "RuntimeError: boom" in str(record["exc"])


def test_extras_are_fields_but_dicts_are_not(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream=stream, redacted_values=[])
    logging.getLogger("voxq.test").info("done", extra={"latency_ms": 12.5, "data": {"args": ["x"]}})
    (record,) = _lines(stream)
    assert record["latency_ms"] == 12.5
    assert "data" not in record


def test_level_filters_and_second_configure_replaces_handler(stream: io.StringIO) -> None:
    configure_logging("json", "WARNING", stream=stream, redacted_values=[])
    configure_logging("json", "WARNING", stream=stream, redacted_values=[])
    assert sum(isinstance(h, VoxqHandler) for h in logging.getLogger().handlers) == 1
    log = logging.getLogger("voxq.test")
    log.info("hidden")
    log.warning("shown")
    assert [r["event"] for r in _lines(stream)] == ["shown"]


def test_human_format(stream: io.StringIO) -> None:
    configure_logging("human", "INFO", stream=stream, redacted_values=[])
    with log_context(job_id="j9"):
        logging.getLogger("voxq.dev").info("hello")
    line = stream.getvalue().strip()
    assert "INFO" in line and "voxq.dev: hello" in line and "job_id=j9" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_bind_and_reset(stream: io.StringIO) -> None:
    token = bind_log_context(job_id="a", model=None)
    assert current_log_context() == {"job_id": "a"}
    reset_log_context(token)
    assert current_log_context() == {}


OPENAI_KEY = "sk-proj-" + "A1b2C3d4" * 6
VOXQ_KEY = "vq_" + "Zx9_-Qw8" * 5


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        (f"calling with key {OPENAI_KEY}", OPENAI_KEY),
        (f"client key={VOXQ_KEY} rejected", VOXQ_KEY),
        ("headers {'Authorization': 'Bearer abc.DEF-123_xyz'}", "abc.DEF-123_xyz"),
        ("Authorization: Basic dm94cTpodW50ZXIy", "dm94cTpodW50ZXIy"),
        ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI"),
        ("using AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("GET /b/k?X-Amz-Credential=AKIDX%2F2026&X-Amz-Signature=deadbeef01&x=1", "deadbeef01"),
        ("broker redis://:hunter2hunter@127.0.0.1:6379/0", "hunter2hunter"),
        ("db postgresql+psycopg://voxq:pgpass99@db/voxq", "pgpass99"),
        ('{"password": "flower-pw-123"}', "flower-pw-123"),
    ],
)
def test_redact_patterns(text: str, leak: str) -> None:
    out = redact(text)
    assert leak not in out
    assert REDACTED in out


def test_redact_leaves_ordinary_text() -> None:
    text = "job j1 finished: 12 input_tokens, model gpt-4o-mini-transcribe, skipped silence"
    assert redact(text) == text


def test_records_are_redacted_everywhere(stream: io.StringIO) -> None:
    planted = "s3-secret-value-9f8e7d"
    configure_logging("json", "INFO", stream=stream, redacted_values=[planted, "abc"])
    log = logging.getLogger("voxq.test")
    log.info("uploading with %s and %s", planted, OPENAI_KEY)
    log.info("extra field", extra={"header": f"Bearer {VOXQ_KEY}"})
    try:
        raise ValueError(f"provider said no to {OPENAI_KEY}")
    except ValueError:
        log.exception("call failed")
    logging.getLogger("voxq.test").info("short literals are not redacted: abc")
    out = stream.getvalue()
    assert planted not in out and OPENAI_KEY not in out and VOXQ_KEY not in out
    assert out.count(REDACTED) >= 4
    assert "short literals are not redacted: abc" in out


def test_configure_from_settings_redacts_configured_secrets(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import reset_settings_cache

    monkeypatch.setenv("OPENAI_API_KEY", "custom-provider-key-0042")
    monkeypatch.setenv("VOXQ_WEBHOOK_SECRET", "whsec-planted-77")
    monkeypatch.setenv("VOXQ_LOG_FORMAT", "json")
    reset_settings_cache()
    try:
        configure_logging(stream=stream)
        logging.getLogger("voxq.test").warning("key custom-provider-key-0042 and whsec-planted-77")
    finally:
        reset_settings_cache()
    (record,) = _lines(stream)
    assert record["event"] == f"key {REDACTED} and {REDACTED}"


def test_takes_over_library_loggers(stream: io.StringIO) -> None:
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.addHandler(logging.StreamHandler(io.StringIO()))
    uvicorn_access.propagate = False
    configure_logging("json", "INFO", stream=stream, redacted_values=[])
    uvicorn_access.info('127.0.0.1 - "GET /v1/batches?token=tok-secret-1 HTTP/1.1" 200')
    (record,) = _lines(stream)
    assert record["logger"] == "uvicorn.access"
    assert "tok-secret-1" not in str(record["event"])


@pytest.fixture
def uvicorn_loggers() -> Iterator[None]:
    """Put uvicorn's loggers back as they were (uvicorn's Config reconfigures them globally)."""
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names}
    saved_levels = {n: logging.getLogger(n).level for n in names}
    yield
    for name, (handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(saved_levels[name])


@pytest.mark.parametrize("access_log", [True, False])
def test_uvicorn_access_log_follows_its_switch(
    stream: io.StringIO, uvicorn_loggers: None, access_log: bool
) -> None:
    import uvicorn

    # What `uvicorn api.main:app [--no-access-log]` does: configure its loggers, then import the app
    # (whose create_app calls configure_logging); its protocols log access only if hasHandlers().
    uvicorn.Config("api.main:app", access_log=access_log)
    configure_logging("json", "INFO", stream=stream, redacted_values=[])
    configure_logging("json", "INFO", stream=stream, redacted_values=[])  # a second call changes nothing
    access = logging.getLogger("uvicorn.access")
    assert access.hasHandlers() is access_log
    if access.hasHandlers():
        access.info('127.0.0.1:1 - "GET /v1/jobs/x HTTP/1.1" 200')
    logging.getLogger("uvicorn.error").info("Application startup complete.")
    assert [r["logger"] for r in _lines(stream)] == ["uvicorn.access"] * access_log + ["uvicorn.error"]


def test_long_events_are_cut(stream: io.StringIO) -> None:
    from core.logs import MAX_EVENT_CHARS

    configure_logging("json", "INFO", stream=stream, redacted_values=[])
    logging.getLogger("voxq.test").info("body %r", b"fLaC" + bytes(20_000))
    (record,) = _lines(stream)
    assert len(str(record["event"])) < MAX_EVENT_CHARS + 100
    assert str(record["event"]).endswith("more chars cut]")


def test_chatty_libraries_stay_quiet_at_debug(stream: io.StringIO) -> None:
    configure_logging("json", "DEBUG", stream=stream, redacted_values=[])
    logging.getLogger("botocore.endpoint").debug("Making request with params: {'body': b'audio'}")
    logging.getLogger("httpx").info("HTTP Request: POST https://api.openai.com/v1/audio/transcriptions")
    logging.getLogger("voxq.test").debug("ours")
    logging.getLogger("botocore.endpoint").warning("retrying")
    assert [r["event"] for r in _lines(stream)] == ["ours", "retrying"]


def test_database_errors_are_logged_as_a_summary_only(stream: io.StringIO) -> None:
    from sqlalchemy.exc import IntegrityError

    configure_logging("json", "DEBUG", stream=stream, redacted_values=[])
    log = logging.getLogger("voxq.test")
    words = "the caller said hello darkness my old friend"

    class DriverError(Exception):
        sqlstate = "23514"

    driver = DriverError(
        'new row for relation "transcripts" violates check constraint "ck_text"\n'
        f"DETAIL:  Failing row contains (01a2, {words}, whisper-1)."
    )
    error = IntegrityError("INSERT INTO transcripts (text) VALUES (%(text)s)", {"text": words}, driver)
    try:
        try:
            raise error
        except IntegrityError as exc:
            raise RuntimeError("completion write failed") from exc
    except RuntimeError:
        log.exception("group write failed")
    log.error("one row failed (%s)", error)  # an exception as an argument
    log.error("task raised: %s", repr(error), exc_info=error)  # its repr made by someone else (Celery)
    text = stream.getvalue()
    assert "hello darkness" not in text and "Failing row" not in text and "[parameters:" not in text
    lines = _lines(stream)
    assert len(lines) == 3
    assert "IntegrityError" in str(lines[0]["exc"]) and "SQLSTATE 23514" in str(lines[0]["exc"])
    assert "RuntimeError: completion write failed" in str(lines[0]["exc"])  # other exceptions as usual
    assert lines[1]["event"].startswith("one row failed (IntegrityError")  # type: ignore[union-attr]
    assert "test_logging.py" in str(lines[0]["exc"])  # the traceback's frames are kept
