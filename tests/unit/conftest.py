"""Unit tests do no I/O: their settings are read afresh for each test, from the session's environment, whose
server URLs point nowhere (tests/conftest.py NOWHERE)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.settings import reset_settings_cache


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """No settings cached by an earlier test (a test may set its own environment)."""
    reset_settings_cache()
    yield
    reset_settings_cache()
