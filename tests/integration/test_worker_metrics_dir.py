"""The worker's metric-file directory sweeps the directories of dead workers (a real, finished process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.names import MULTIPROC_ENV
from core.settings import Settings
from worker.metrics_export import worker_multiproc_dir


def test_worker_dir_is_fresh_per_worker_and_sweeps_dead_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    base = tmp_path / "prometheus"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_dir = base / f"worker-{int(dead.stdout)}"
    live_dir = base / f"worker-{os.getppid()}"
    for d in (dead_dir, live_dir):
        d.mkdir(parents=True)
        (d / "counter_1.db").write_bytes(b"x")
    own = base / f"worker-{os.getpid()}"
    own.mkdir()
    (own / "counter_99.db").write_bytes(b"stale")
    path = worker_multiproc_dir(Settings.model_construct(data_dir=str(tmp_path)))
    assert path == own.resolve() and list(path.iterdir()) == []
    assert not dead_dir.exists()
    assert (live_dir / "counter_1.db").exists()  # another live worker's files are left alone
