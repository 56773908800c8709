"""Runtime.attempts: calls starting together share one INSERT of their pending attempt rows; a bad row
fails only its own call."""

from __future__ import annotations

import asyncio

import pytest

from worker.runtime import AttemptOpener
from worker.store import attempts


def test_calls_starting_together_share_one_insert_and_wait_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[list[str]] = []
    monkeypatch.setattr(attempts, "open_attempts", lambda rows: writes.append(list(rows)))

    async def main() -> list[str]:
        opener = AttemptOpener()
        done: list[str] = []

        async def call(name: str) -> None:
            await opener.open(name)
            assert any(name in w for w in writes)  # the row is written before the call goes on
            done.append(name)

        await asyncio.gather(*(call(f"a{i}") for i in range(50)))
        return done

    done = asyncio.run(main())
    assert sorted(done) == sorted(f"a{i}" for i in range(50))
    assert len(writes) == 1 and sorted(writes[0]) == sorted(done)


def test_a_row_that_cannot_be_written_fails_only_its_own_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def write(rows: list[str]) -> None:
        if "bad" in rows:
            raise ValueError("foreign key")

    monkeypatch.setattr(attempts, "open_attempts", write)

    async def main() -> list[object]:
        opener = AttemptOpener()
        return await asyncio.gather(
            *(opener.open(name) for name in ("a", "bad", "b")), return_exceptions=True
        )

    results = asyncio.run(main())
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], ValueError)
