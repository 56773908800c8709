"""The API moves what startup left alive out of the garbage collector's full scans (P4b's tail)."""

from __future__ import annotations

import gc

import pytest

from api.main import freeze_startup_objects

pytestmark = pytest.mark.unit


def _scanned() -> set[int]:
    """Ids of the objects the collector's generations hold (frozen objects are in none of them)."""
    return {id(o) for o in gc.get_objects()}


def test_startup_objects_are_frozen_once() -> None:
    already = gc.get_freeze_count()
    gc.unfreeze()  # as at startup, whatever an earlier test's app lifespan froze
    try:
        startup = [[i] for i in range(1000)]  # alive when the app starts: lists are tracked by the collector
        assert id(startup[0]) in _scanned()
        frozen = freeze_startup_objects()
        assert frozen >= len(startup)
        assert id(startup[0]) not in _scanned()  # out of the full scans
        # A later call (another lifespan in the same process) freezes nothing more: objects created since
        # stay in the generations, collected as usual, and the count can only shrink (frozen objects are
        # still freed by reference counting).
        later = [[i] for i in range(5000)]
        assert freeze_startup_objects() <= frozen
        assert id(later[0]) in _scanned()
    finally:
        gc.unfreeze()
        if already:
            gc.freeze()
