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
        assert frozen > 0
        # A later call (another lifespan in the same process) freezes nothing more: the count can only
        # shrink (frozen objects are still freed by reference counting), never take in these new ones.
        later = [[i] for i in range(5000)]
        assert freeze_startup_objects() <= frozen
        assert len(later) == 5000
    finally:
        if already == 0:
            gc.unfreeze()
