"""Pytest fixtures for the fake OpenAI server: one server per test session, reset for every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.openai_server import FakeOpenAI

FAKE_OPENAI_API_KEY = "sk-voxq-test-fake-key-0123456789"


@pytest.fixture(scope="session")
def fake_openai_server() -> Iterator[FakeOpenAI]:
    """The session's fake OpenAI server, on a free 127.0.0.1 port."""
    fake = FakeOpenAI().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def fake_openai(fake_openai_server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    """The fake, reset for this test, with OPENAI_BASE_URL/OPENAI_API_KEY pointing this process at it.

    Child processes started through `Stack.child_env()` inherit these variables too.
    """
    from core.settings import reset_settings_cache

    fake_openai_server.reset()
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_API_KEY)
    reset_settings_cache()
    yield fake_openai_server
    fake_openai_server.reset()
    reset_settings_cache()
