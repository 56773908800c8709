"""`voxq top`'s frame, Flower's credential rules, and the worker's metric-file directory."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr

from core import names
from core.errors import ConfigError
from core.fleet import FleetSnapshot
from core.names import MULTIPROC_ENV
from core.settings import Settings
from voxq.cli.ops import flower_basic_auth, render_frame
from worker.metrics_export import worker_multiproc_dir


def snapshot(**changes: object) -> FleetSnapshot:
    snap = FleetSnapshot(
        taken_at=datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC),
        queues={q: 0 for q in names.ALL_QUEUES} | {names.QUEUE_TRANSCRIBE: 40, names.QUEUE_INGEST: 10},
        jobs={"queued": 50, "processing": 12, "succeeded": 900, "failed": 3},
        finished_per_minute=[10, 20, 30, 40, 50],
        cost_per_hour_usd=Decimal("1.234567"),
        circuits={},
        workers=["worker@a", "local@a"],
    )
    for key, value in changes.items():
        setattr(snap, key, value)
    return snap


def test_frame_shows_every_section() -> None:
    frame = render_frame(snapshot())
    lines = frame.splitlines()
    assert lines[0].startswith("voxq top  2026-11-25 12:00:00 UTC   workers alive: 2 (worker@a, local@a)")
    queue_lines = [
        line.split()[0] for line in lines if line.startswith("  ") and line.split()[0] in names.ALL_QUEUES
    ]
    assert queue_lines == list(names.ALL_QUEUES)
    transcribe = next(line for line in lines if line.split()[:1] == [names.QUEUE_TRANSCRIBE])
    ingest = next(line for line in lines if line.split()[:1] == [names.QUEUE_INGEST])
    assert transcribe.count("#") == 20 and ingest.count("#") == 5  # bars relative to the deepest queue
    assert "queued 50  processing 12  succeeded 900  failed 3" in frame
    assert "in flight 12" in frame
    assert "oldest first: 10 20 30 40 50   avg 30.0" in frame
    assert "COST/HOUR  $1.2346" in frame
    assert "CIRCUITS  all closed" in frame
    assert "!!" not in frame


def test_frame_shows_open_circuits_and_unreadable_sources() -> None:
    frame = render_frame(
        snapshot(
            circuits={"whisper-1": "retired", "gpt-4o-transcribe": "open"},
            errors={"redis": "ConnectionError"},
        )
    )
    assert "CIRCUITS  gpt-4o-transcribe: open  whisper-1: retired" in frame
    assert "!! redis unreadable (ConnectionError)" in frame


def test_frame_with_an_empty_fleet() -> None:
    frame = render_frame(snapshot(queues={}, jobs={}, finished_per_minute=[], workers=[]))
    assert "workers alive: 0\n" in frame and "in flight 0" in frame and "FINISHED/MIN" not in frame


def _settings(environment: str, password: str, user: str = "voxq") -> Settings:
    return Settings.model_construct(
        environment=environment, flower_user=user, flower_password=SecretStr(password)
    )


@pytest.mark.parametrize("environment", ["test", "production"])
@pytest.mark.parametrize("password", ["", "changeme", "admin", "short1"])
def test_flower_refuses_weak_passwords_outside_dev(environment: str, password: str) -> None:
    with pytest.raises(ConfigError) as err:
        flower_basic_auth(_settings(environment, password))
    assert err.value.code == "flower_password_weak"


def test_flower_in_dev_takes_any_password_but_never_none() -> None:
    assert flower_basic_auth(_settings("dev", "admin")) == "voxq:admin"
    with pytest.raises(ConfigError) as err:
        flower_basic_auth(_settings("dev", ""))
    assert err.value.code == "flower_password_empty"


def test_flower_auth_string_and_separators() -> None:
    assert flower_basic_auth(_settings("production", "a-long-Real-pw9", user="ops")) == "ops:a-long-Real-pw9"
    with pytest.raises(ConfigError):
        flower_basic_auth(_settings("production", "a-long,Real-pw9"))  # Flower splits users on commas
    with pytest.raises(ConfigError):
        flower_basic_auth(_settings("production", "a-long-Real-pw9", user="o:ps"))


def test_operator_dir_keeps_only_this_process_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    for name in ("counter_1.db", "histogram_2.db", f"counter_{os.getpid()}.db", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert worker_multiproc_dir() == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"counter_{os.getpid()}.db", "notes.txt"]
