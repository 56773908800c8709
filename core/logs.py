"""Logging: one JSON line per event (or a human line in `voxq dev`), with job context and redaction.

Context ids (`batch_id`, `job_id`, `attempt`, `model`, ...) live in a context variable, so code deep in
the pipeline does not pass them around: wrap work in `log_context(job_id=...)` and every record logged
inside carries them. A redaction filter on the handler scrubs anything that looks like a credential from
every record, as a safety net; the rule stays "never log secrets or transcript text". Database errors
are logged as a summary only (types, SQLSTATE, table/constraint names: `db_error_summary`), in messages
and tracebacks alike: their text carries SQL parameters and what the server says about the row (a
transcript, in a failed transcript write).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import IO, Any, Literal

LogFormat = Literal["json", "human"]

REDACTED = "[REDACTED]"

# Ids that make a line findable; anything bound is printed, these are just the documented ones.
CONTEXT_FIELDS = ("batch_id", "job_id", "attempt", "model", "task", "task_id")

_context: ContextVar[Mapping[str, object]] = ContextVar("voxq_log_context", default={})  # noqa: B039

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)

# Credential shapes. Each pattern keeps its group 1 (a label) and replaces the rest.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), REDACTED),  # OpenAI keys (sk-..., sk-proj-...)
    (re.compile(r"\bvq_[A-Za-z0-9_\-]{16,}"), REDACTED),  # voxq API keys
    (re.compile(r"\bwhsec_[A-Za-z0-9_\-]{16,}"), REDACTED),  # tenants' webhook signing secrets
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/\-]{6,}=*"), r"\1 " + REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),  # AWS access key ids
    (
        re.compile(
            r"(?i)\b((?:aws_)?secret_access_key|x-amz-signature|x-amz-credential|x-amz-security-token"
            r"|api[_-]?key|password|passwd|secret|token)(\"?\s*[:=]\s*\"?)[^\s&\"',;}]+"
        ),
        r"\1\2" + REDACTED,
    ),
    (re.compile(r"(\w+://[^:/@\s]*:)[^@\s/]+@"), r"\1" + REDACTED + "@"),  # passwords in URLs
)

# Literal secret values from settings; shorter ones would redact ordinary words.
_MIN_LITERAL = 6
_literals: tuple[str, ...] = ()


def set_redacted_values(values: Iterable[str | None]) -> None:
    """Also scrub these exact strings (configured secrets) from every record."""
    global _literals
    _literals = tuple(sorted({v for v in values if v and len(v) >= _MIN_LITERAL}, key=len, reverse=True))


def secrets_from_settings(settings: Any) -> list[str]:
    """The secret values configured in `settings` (OpenAI key, S3 secret, secrets key, webhook secret, Flower
    password, metrics token)."""
    found: list[str] = []
    for name in (
        "openai_api_key",
        "s3_secret_access_key",
        "secrets_key",
        "webhook_secret",
        "flower_password",
        "metrics_token",
    ):
        value = getattr(settings, name, None)
        if value is not None and hasattr(value, "get_secret_value"):
            found.append(value.get_secret_value())
    return found


# Exceptions of these packages carry SQL, its parameters and what the server says about the row (a
# constraint's DETAIL lists the row's values; a trigger's message may quote them) in their text: only a
# summary of them is logged (`db_error_summary`), wherever they appear in a record.
_DB_ERROR_PACKAGES = frozenset({"sqlalchemy", "psycopg", "psycopg2", "psycopg_pool", "asyncpg"})
DB_TEXT_REDACTED = "[database error text redacted]"
# Safety net for DB error text that reached a message some other way (re-raised, formatted into a string).
_DB_TEXT_PATTERNS = (
    re.compile(r"\[parameters: .*?\](?=\n|$)", re.DOTALL),
    re.compile(r"(?m)^(?:DETAIL|CONTEXT|HINT):.*$"),
    re.compile(r"(?i)failing row contains \(.*?\)(?=\n|$|\.)", re.DOTALL),
)
_MIN_FRAGMENT = 8


def is_db_error(exc: BaseException) -> bool:
    """Whether `exc` comes from the database stack (SQLAlchemy or a Postgres driver)."""
    return type(exc).__module__.split(".", 1)[0] in _DB_ERROR_PACKAGES


def db_error_summary(exc: BaseException) -> str:
    """What may be logged of a database error: its types, SQLSTATE and the names it concerns, no text."""
    orig = getattr(exc, "orig", None)
    driver = orig if isinstance(orig, BaseException) else exc
    parts = [type(exc).__name__]
    if driver is not exc:
        parts.append(f"{type(driver).__module__}.{type(driver).__name__}")
    sqlstate = getattr(driver, "sqlstate", None)
    if sqlstate:
        parts.append(f"SQLSTATE {sqlstate}")
    diag = getattr(driver, "diag", None)
    for name in ("table_name", "constraint_name", "column_name"):
        value = getattr(diag, name, None) if diag is not None else None
        if isinstance(value, str) and value:
            parts.append(f"{name.removesuffix('_name')} {value}")
    return " ".join(parts) + " " + DB_TEXT_REDACTED


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc`, its cause and context, and theirs (each once), outermost first."""
    out: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        item = pending.pop(0)
        if item is None or any(item is seen for seen in out):
            continue
        out.append(item)
        pending += [item.__cause__, item.__context__]
    return out


def _db_fragments(exc: BaseException) -> set[str]:
    """The lines of text of every database error in `exc`'s chain (to cut them wherever they appear)."""
    fragments: set[str] = set()
    for item in _chain(exc):
        if not is_db_error(item):
            continue
        for source in (item, getattr(item, "orig", None)):
            if isinstance(source, BaseException):
                text = str(source)
                fragments |= {
                    line.strip() for line in text.splitlines() if len(line.strip()) >= _MIN_FRAGMENT
                }
                fragments |= {part for part in (text, repr(source)) if len(part) >= _MIN_FRAGMENT}
    return fragments


def scrub_db_text(text: str, fragments: Iterable[str] = ()) -> str:
    """`text` with the given database error fragments and anything shaped like DB error detail cut."""
    for fragment in sorted(fragments, key=len, reverse=True):
        if fragment in text:
            text = text.replace(fragment, DB_TEXT_REDACTED)
    for pattern in _DB_TEXT_PATTERNS:
        text = pattern.sub(DB_TEXT_REDACTED, text)
    return text


def format_exception_safely(exc: BaseException) -> str:
    """A traceback like Python's, each database error's message replaced by its summary."""
    blocks: list[str] = []
    chain = _chain(exc)
    for index, item in enumerate(reversed(chain)):
        if index:
            blocks.append("\nThe above exception led to the following exception:\n\n")
        message = db_error_summary(item) if is_db_error(item) else str(item)
        name = f"{type(item).__module__}.{type(item).__qualname__}".removeprefix("builtins.")
        frames = "".join(traceback.format_tb(item.__traceback__))
        blocks.append(
            "Traceback (most recent call last):\n" + frames + f"{name}: {message}".rstrip(": ") + "\n"
        )
    return "".join(blocks).rstrip("\n")


def _safe_arg(value: object) -> object:
    return db_error_summary(value) if isinstance(value, BaseException) and is_db_error(value) else value


def redact(text: str) -> str:
    """`text` with configured secrets and anything shaped like a credential replaced."""
    for literal in _literals:
        if literal in text:
            text = text.replace(literal, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def current_log_context() -> dict[str, object]:
    """The ids bound in this context."""
    return dict(_context.get())


def bind_log_context(**ids: object) -> Token[Mapping[str, object]]:
    """Add ids to this context (None values are dropped); pass the token to `reset_log_context`."""
    merged = {**_context.get(), **{k: v for k, v in ids.items() if v is not None}}
    return _context.set(merged)


def reset_log_context(token: Token[Mapping[str, object]]) -> None:
    """Undo the `bind_log_context` that returned `token`."""
    _context.reset(token)


@contextmanager
def log_context(**ids: object) -> Iterator[None]:
    """Records logged inside carry these ids (e.g. `with log_context(job_id=j, model=m):`)."""
    token = bind_log_context(**ids)
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the bound ids onto each record as `record.voxq_context`."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the context; never drops a record."""
        if not hasattr(record, "voxq_context"):
            record.voxq_context = current_log_context()
        return True


class RedactionFilter(logging.Filter):
    """Scrubs credentials from a record's message, arguments, traceback and extra fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        exc = record.exc_info[1] if record.exc_info else None
        fragments = _db_fragments(exc) if exc is not None else set()
        if isinstance(record.args, tuple):
            for arg in record.args:
                if isinstance(arg, BaseException):
                    fragments |= _db_fragments(arg)
            record.args = tuple(_safe_arg(arg) for arg in record.args)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg!s} {record.args!r}"
        message = scrub_db_text(message, fragments)
        if len(message) > MAX_EVENT_CHARS:
            message = message[:MAX_EVENT_CHARS] + f"...[{len(message) - MAX_EVENT_CHARS} more chars cut]"
        record.msg = redact(message)
        record.args = None
        if exc is not None:  # formatted here even when another handler cached its own (unsafe) text
            record.exc_text = format_exception_safely(exc)
        if record.exc_text:
            record.exc_text = redact(scrub_db_text(record.exc_text, fragments))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


def _extras(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in vars(record).items():
        if key in _RECORD_ATTRS or key == "voxq_context" or key.startswith("_"):
            continue
        # Only scalars: Celery attaches dicts of task arguments and results we do not want on a line.
        if value is None or isinstance(value, str | int | float | bool):
            out[key] = value
    return out


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, context ids, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, object] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "pid": record.process,
        }
        context: Mapping[str, object] = getattr(record, "voxq_context", None) or current_log_context()
        line.update(context)
        for key, value in _extras(record).items():
            line.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """`HH:MM:SS.mmm LEVEL logger: message key=value ...` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one readable line (plus traceback if any)."""
        clock = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        context: Mapping[str, object] = getattr(record, "voxq_context", None) or current_log_context()
        fields = {**context, **_extras(record)}
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        text = f"{clock} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if tail:
            text += "  " + tail
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            text += "\n" + record.exc_text
        return text


class VoxqHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` installs (marked so a second call replaces it).

    Without an explicit stream it writes to whatever `sys.stderr` is at each emit, so a swapped stderr
    (test capture, a daemon redirect) never leaves it writing to a closed file.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self._follow_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record to the stream (the current stderr unless one was given)."""
        if self._follow_stderr:
            self.stream = sys.stderr
        super().emit(record)


# Libraries whose DEBUG output includes request bodies (audio bytes) or signed headers, or one line per
# HTTP request: kept at WARNING even when voxq itself logs at DEBUG.
QUIET_LIBRARIES = (
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "httpcore",
    "httpx",
    "hpack",
    "python_multipart",
    "multipart",
)

# A line longer than this is cut: a safety net against a payload (bytes, a transcript) in a message.
MAX_EVENT_CHARS = 4000

# Loggers that install their own handlers and would bypass ours (and our redaction).
_ACCESS_LOGGER = "uvicorn.access"
_TAKEN_OVER = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.redirected")


def configure_logging(
    fmt: LogFormat | None = None,
    level: int | str | None = None,
    *,
    stream: IO[str] | None = None,
    redacted_values: Iterable[str | None] | None = None,
) -> logging.Handler:
    """Send every log record through one redacting handler on the root logger; returns it.

    Defaults come from settings (`VOXQ_LOG_FORMAT`, `VOXQ_LOG_LEVEL`, and the configured secrets).
    Calling it again replaces the handler instead of adding a second one.
    """
    if fmt is None or level is None or redacted_values is None:
        from core.settings import get_settings

        settings = get_settings()
        fmt = fmt or settings.log_format
        level = level if level is not None else settings.log_level
        if redacted_values is None:
            redacted_values = secrets_from_settings(settings)
    set_redacted_values(redacted_values)
    if isinstance(level, str):
        level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)

    handler = VoxqHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    # Context first (so the ids are those of the logging code), then redaction of the final text.
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactionFilter())

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, VoxqHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, level))
    for name in _TAKEN_OVER:
        taken = logging.getLogger(name)
        # `uvicorn --no-access-log` (Config(access_log=False)) leaves the access logger with no handler
        # and no propagation; uvicorn then skips access logging only while `hasHandlers()` is False, so
        # re-attaching it to our root handler would turn the access log back on (~2% of a request).
        switched_off = name == _ACCESS_LOGGER and not taken.handlers and not taken.propagate
        taken.handlers = []
        taken.propagate = not switched_off
        # Someone's dictConfig/fileConfig may have disabled it or raised its level; ours decides now.
        taken.disabled = False
        taken.setLevel(logging.NOTSET)
    return handler
