"""Fixtures shared by the pipeline's integration tests (a module may override them with its own)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

# One API server process for the whole session, defined here once: a module that imports the fixture
# defines its own session-scoped copy, and each copy kept a server (and its warm DB pool) to the end.
from tests.api_helpers import api_fixture, api_server_fixture  # noqa: F401
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import Pipeline, WorkerFactory, hosted_env
from tests.support import Stack, celery_worker


@pytest.fixture
def pipeline(stack: Stack, fake_openai: FakeOpenAI) -> Iterator[Pipeline]:
    """Rows, audio and polling helpers over the stack, with the fake OpenAI server running."""
    p = Pipeline(stack)
    yield p
    p.close()


@pytest.fixture
def hosted_settings(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's settings are a hosted-chain worker's (`hosted_env`): for worker stages run in process
    (the stack resets the runtime they build)."""
    from core.settings import reset_settings_cache

    for key, value in hosted_env().items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()


@pytest.fixture
def worker(stack: Stack, fake_openai: FakeOpenAI) -> WorkerFactory:
    """Starts real Celery workers pointed at the fake OpenAI server."""

    def start(concurrency: int = 2, queues: str | None = None, **env: str) -> AbstractContextManager[Any]:
        kwargs: dict[str, Any] = {"concurrency": concurrency, "env": hosted_env(**env)}
        if queues:
            kwargs["queues"] = queues
        return celery_worker(stack, **kwargs)

    return start
