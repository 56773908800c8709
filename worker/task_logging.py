"""Worker logging: Celery hands its logging setup to `core.logs`, and each task runs in a log context.

Connecting `setup_logging` makes Celery skip its own handlers (and its stdout redirection), so every line
a worker or beat prints goes through voxq's redacting JSON (or human) handler.
"""

from __future__ import annotations

import contextlib
import logging
import os
from contextvars import Token
from typing import Any

from celery.signals import setup_logging, task_postrun, task_prerun

from core.logs import bind_log_context, configure_logging, reset_log_context

_tokens: dict[str, Token[Any]] = {}


@setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    from core.settings import get_settings

    settings = get_settings()
    # Celery always passes a level (its `-l`, default WARNING); VOXQ_LOG_LEVEL, when set, wins over it.
    explicit = "VOXQ_LOG_LEVEL" in os.environ
    level = settings.log_level if explicit or loglevel in (None, 0, "") else loglevel
    configure_logging(settings.log_format, level)
    logging.captureWarnings(True)  # Python warnings become log lines (JSON too), not bare stderr text
    logging.getLogger(__name__).debug("logging configured")


# Task arguments that are ids (see tests/unit/test_task_arguments.py) and go on every line of the task.
CONTEXT_KWARGS = ("batch_id", "job_id", "group_id", "attempt")


@task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, kwargs: Any = None, **_: Any) -> None:
    if task_id is None:
        return
    ids = {k: v for k, v in (kwargs or {}).items() if k in CONTEXT_KWARGS}
    _tokens[task_id] = bind_log_context(task=getattr(task, "name", None), task_id=task_id, **ids)


@task_postrun.connect
def _unbind_task(task_id: str | None = None, **_: Any) -> None:
    token = _tokens.pop(task_id or "", None)
    if token is None:
        return
    # Bound in another context (a thread pool) there is nothing of ours to undo here.
    with contextlib.suppress(ValueError):
        reset_log_context(token)
