"""Pytest fixtures for the fake OpenAI server: one server per test session, reset for every test; and the
fake as a process of its own (`fake_openai_process`) for the e2e tier."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
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


class FakeProcess:
    """A fake provider running as its own process (`python -m tests.fakes.openai_server`), scripted and
    read over its admin endpoints, as the e2e tier and an operator's tooling see a provider."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.proc = proc
        self.root_url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.root_url}/v1"
        self._admin = httpx.Client(base_url=self.root_url, timeout=30)

    def _post(self, path: str, body: Any) -> Any:
        answer = self._admin.post(path, json=body)
        answer.raise_for_status()
        return answer.json()

    def set_specs(self, specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """ModelSpec fields per model (prices as strings); the models are listed from now on."""
        result: dict[str, Any] = self._post("/_fake/config", {"specs": specs})["specs"]
        return result

    def configure(self, model: str, **behaviour: Any) -> dict[str, Any]:
        """ModelBehaviour fields of one model (latency, faults, ...)."""
        result: dict[str, Any] = self._post(f"/_fake/models/{model}", behaviour)
        return result

    def account(self, **changes: Any) -> dict[str, Any]:
        """Account-wide faults (`exhaust_quota_after`, `revoke_key` + `revoke_after`, `restore_key`);
        without changes, the account's state."""
        if not changes:
            state: dict[str, Any] = self._admin.get("/_fake/account").json()
            return state
        result: dict[str, Any] = self._post("/_fake/account", changes)
        return result

    def billing_log(self) -> list[dict[str, Any]]:
        """What the provider invoiced, request by request."""
        log: list[dict[str, Any]] = self._admin.get("/_fake/billing").json()
        return log

    def request_log(self) -> list[dict[str, Any]]:
        """Every request the provider received."""
        log: list[dict[str, Any]] = self._admin.get("/_fake/requests").json()
        return log

    def close(self) -> None:
        self._admin.close()


@contextmanager
def fake_openai_process(log_path: Path, *api_keys: str, seed: int = 1234) -> Iterator[FakeProcess]:
    """A fake provider in its own process on a free port, accepting only `api_keys` (any when none)."""
    from tests.support import REPO_ROOT, stop_process
    from voxq.embedded import free_port, wait_for_port

    port = free_port()
    args = [sys.executable, "-m", "tests.fakes.openai_server", "--port", str(port), "--seed", str(seed)]
    for key in api_keys:
        args += ["--api-key", key]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    fake = FakeProcess(port, proc)
    try:
        wait_for_port(port, 30, proc=proc)
        yield fake
    finally:
        fake.close()
        stop_process(proc, grace=10)
