"""The API moves what startup left alive out of the garbage collector's full scans (P4b's tail)."""

from __future__ import annotations

import gc

import pytest

from api.main import freeze_startup_objects

pytestmark = pytest.mark.unit


def test_startup_objects_are_frozen_once() -> None:
    already = gc.get_freeze_count()
    try:
        frozen = freeze_startup_objects()
        assert frozen > 0 and gc.get_freeze_count() == frozen
        # A later call (another lifespan in the same process) freezes nothing more.
        _later = [object() for _ in range(1000)]
        assert freeze_startup_objects() == frozen
    finally:
        if already == 0:
            gc.unfreeze()
