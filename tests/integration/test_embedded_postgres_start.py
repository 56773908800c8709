"""The embedded Postgres starts again after a kill left a lock file whose PID another process now has."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from voxq.embedded import EmbeddedPostgres

pytestmark = pytest.mark.integration


def test_start_after_sigkill_with_the_pid_reused(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "postgres")
    server.start()
    try:
        pid_file = server.data_dir / "postmaster.pid"
        postmaster = int(pid_file.read_text().split("\n", 1)[0])
        os.kill(postmaster, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(postmaster, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        # A live process that is not Postgres now holds the PID written in the lock file: Postgres alone
        # would refuse to start ("lock file ... already exists").
        # It runs as the server's own user, so Postgres' liveness probe (kill 0) succeeds on it.
        squatter = subprocess.Popen(["sleep", "60"], user=server.system_user if os.geteuid() == 0 else None)
        try:
            lines = pid_file.read_text().split("\n")
            lines[0] = str(squatter.pid)
            pid_file.write_text("\n".join(lines))
            server.start()  # same port: the one clients know
            with psycopg.connect(f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres") as conn:
                assert conn.execute("select 1").fetchone() == (1,)
            assert squatter.poll() is None  # the other process was left alone
        finally:
            squatter.kill()
            squatter.wait()
    finally:
        server.stop()
