"""Unit tests do no I/O: their settings point at closed ports, never at a server that happens to run here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.settings import reset_settings_cache

# Port 9 (discard) is closed on these machines: a connection fails at once instead of reaching the
# machine's own Redis/Postgres (the defaults), as a Celery app built during a unit test used to.
NOWHERE = {
    "VOXQ_DATABASE_URL": "postgresql+psycopg://voxq@127.0.0.1:9/unit",
    "VOXQ_REDIS_URL": "redis://127.0.0.1:9/0",
    "VOXQ_S3_ENDPOINT_URL": "http://127.0.0.1:9",
}


@pytest.fixture(autouse=True)
def no_servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings of a unit test point at no server (a test may still set its own)."""
    for key, value in NOWHERE.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    yield
    reset_settings_cache()
