"""A real third-party OpenAI-compatible server for the e2e tier: faster-whisper-server, in its own venv.

`ensure_faster_whisper_server()` installs `faster-whisper-server==FWS_VERSION` from PyPI into `.venv-fws`
at the repository root (`VOXQ_TEST_FWS_VENV` moves it; `make fws-venv` does the same ahead of time) once,
under a file lock; `faster_whisper_server()` starts it on a free 127.0.0.1 port with the bundled Whisper
base weights as a local path and `HF_HUB_OFFLINE=1`, so no model hub is ever asked. A test that needs the
server FAILS when it cannot be installed or started: it is never skipped.

What it is (FACTS.md, Dec 2026): single-model mode serves any `model` name; `json` and `verbose_json`
(segments; `timestamp_granularities` ignored); no `usage`; no `/v1/models` (404); one request at a time.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, stop_process
from voxq.embedded import free_port, wait_for_port

FWS_VERSION = "0.0.3"
FWS_VENV = Path(os.environ.get("VOXQ_TEST_FWS_VENV") or REPO_ROOT / ".venv-fws")
START_TIMEOUT = 180.0


def ensure_faster_whisper_server(venv: Path = FWS_VENV) -> Path:
    """The server's executable, installed into its own venv on first use (pytest.fail when that fails)."""
    exe = venv / "bin" / "faster-whisper-server"
    stamp = venv / f".installed-faster-whisper-server-{FWS_VERSION}"
    if exe.exists() and stamp.exists():
        return exe
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (exe.exists() and stamp.exists()):
            steps = [
                [sys.executable, "-m", "venv", str(venv)],
                [
                    str(venv / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    f"faster-whisper-server=={FWS_VERSION}",
                ],
            ]
            for step in steps:
                done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
                if done.returncode != 0:
                    pytest.fail(
                        f"installing faster-whisper-server failed: {' '.join(step)}\n{done.stderr[-3000:]}"
                    )
            stamp.touch()
    return exe


def bundled_whisper_base() -> Path:
    """The bundled Whisper base weights, joined and verified (worker/local_engine.py), as a directory."""
    from worker.local_engine import prepare_bundled_model

    return prepare_bundled_model(REPO_ROOT / ".voxq" / "models")


@contextmanager
def faster_whisper_server(work_dir: Path) -> Iterator[str]:
    """A running faster-whisper-server on the bundled weights; yields its base URL (`http://…/v1`)."""
    exe = ensure_faster_whisper_server()
    model_dir = bundled_whisper_base()
    port = free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / f"faster-whisper-server-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXQ_", "OPENAI_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(work_dir / "hf-home"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(exe), str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
            cwd=work_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            wait_for_port(port, START_TIMEOUT, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(
                f"faster-whisper-server did not start: {exc}\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(proc, grace=10)
