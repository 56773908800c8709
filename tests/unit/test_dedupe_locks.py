"""Every writer that takes dedupe advisory locks takes them the same way, in the same order (issue #16,
item 3): the decision (worker.store.dedupe) ordered its keys by lock id while a leader's completion
(worker.completion) ordered them by key text, so two transactions could each hold one key the other
wanted and deadlock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core import dedupe

ROOT = Path(__file__).resolve().parents[2]


class _Recorder:
    """Stands in for a SQLAlchemy session: records what is executed."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def execute(self, statement: Any, params: dict[str, Any]) -> None:
        self.calls.append((statement, params))


def test_advisory_locks_are_taken_in_one_place_only() -> None:
    takers = sorted(
        str(path.relative_to(ROOT))
        for folder in ("api", "core", "worker")
        for path in (ROOT / folder).rglob("*.py")
        if "pg_advisory" in path.read_text()
    )
    assert takers == ["core/dedupe.py"]


def test_every_dedupe_writer_uses_the_shared_lock_function() -> None:
    from api import service
    from worker import completion
    from worker.store import dedupe as store_dedupe

    for module in (service, completion, store_dedupe):
        assert module.lock_dedupe_keys is dedupe.lock_dedupe_keys, module.__name__


def test_keys_are_locked_in_one_statement_in_lock_id_order() -> None:
    session = _Recorder()
    dedupe.lock_dedupe_keys(session, ["t:b", "t:a", "t:b"])
    dedupe.lock_dedupe_keys(session, [])  # nothing to lock: no statement
    assert len(session.calls) == 1
    statement, params = session.calls[0]
    assert statement is dedupe.LOCK_DEDUPE_KEYS
    assert params == {"keys": ["t:a", "t:b"]}
    sql = " ".join(str(statement).split())
    # The lock ids (hashes of the keys), not the key texts, are what the locks are taken in order of.
    assert "SELECT DISTINCT hashtextextended(k, 0) AS h" in sql and sql.endswith("ORDER BY 1) AS locks")
