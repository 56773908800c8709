"""The `voxq` client commands end to end against `voxq dev` (API + real workers + the local model)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from core.settings import get_settings
from tests.api_helpers import sine_wav
from tests.support import REPO_ROOT, Stack, run_voxq, voxq_dev_process, wait_until

SAMPLES = REPO_ROOT / "samples"
START_TIMEOUT = 120.0


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 5}


@contextmanager
def voxq_dev(stack: Stack, data_dir: Path) -> Iterator[str]:
    """`voxq dev` on the test stack's servers (it starts only API, workers, beat, Flower); yields its URL."""
    output = data_dir.parent / "voxq-dev.out"
    env = stack.child_env()
    env.pop("OPENAI_API_KEY", None)  # the chain is the offline model only
    with voxq_dev_process(data_dir, env, output) as (proc, api_port, _):

        def up() -> bool:
            assert proc.poll() is None, f"voxq dev exited:\n{output.read_text(errors='replace')[-3000:]}"
            return "Ctrl-C stops everything" in output.read_text(errors="replace")

        wait_until(up, timeout=START_TIMEOUT, interval=0.3, what="voxq dev to start")
        yield f"http://127.0.0.1:{api_port}"


def voxq(
    stack: Stack, *args: str, api_url: str = "", key: str = "", timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the `voxq` CLI as a user would."""
    return run_voxq(args, stack.child_env(VOXQ_API_URL=api_url, VOXQ_API_KEY=key), timeout=timeout)


def test_cli_keys_submit_wait_status_download_usage(stack: Stack, tmp_path: Path) -> None:
    manifest = {item["file"]: item for item in json.loads((SAMPLES / "manifest.json").read_text())}
    inputs = tmp_path / "inbox"
    (inputs / "calls").mkdir(parents=True)
    shutil.copy(SAMPLES / "voicemail-school.mp3", inputs / "calls" / "voicemail-school.mp3")
    shutil.copy(SAMPLES / "voicemail-dentist.flac", inputs / "voicemail-dentist.flac")
    (inputs / "tone.wav").write_bytes(sine_wav(1.0))
    (inputs / ".hidden.wav").write_bytes(b"not sent")
    (inputs / "broken.mp3").write_bytes(os.urandom(50_000))  # skipped, the rest goes on

    created = voxq(stack, "keys", "create", "--tenant", "e2e-cli", "--name", "laptop")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("vq_") and "not shown again" in created.stderr

    with voxq_dev(stack, tmp_path / "dev") as api_url:
        assert httpx.get(api_url + "/healthz", timeout=10).json()["checks"] == {
            "database": "ok",
            "redis": "ok",
            "s3": "ok",
        }
        out_dir = tmp_path / "out"
        submitted = voxq(
            stack,
            "submit",
            str(inputs),
            "--profile",
            "voicemail",
            "--language",
            "en",
            "--out",
            str(out_dir),
            "--format",
            "txt",
            "--presign-above",
            "60000",  # the mp3/flac samples go through presigned PUTs, the tone as multipart
            "--timeout",
            "400",
            api_url=api_url,
            key=key,
        )
        assert submitted.returncode == 1, submitted.stderr  # one input was refused
        assert "skipped broken.mp3: unsupported_media" in submitted.stderr
        batch_id = submitted.stdout.strip().splitlines()[0]
        uuid.UUID(batch_id)
        assert "uploading" in submitted.stderr or "uploaded" in submitted.stderr  # the progress bar
        assert re.search(r"jobs \d+/3 done, cost so far \$", submitted.stderr), submitted.stderr
        assert "3 of 4 files queued" in submitted.stderr

        # one transcript per speech input, at its relative path, with the words that were spoken
        for rel, sample in (
            ("calls/voicemail-school.txt", "voicemail-school.mp3"),
            ("voicemail-dentist.txt", "voicemail-dentist.flac"),
        ):
            written = (out_dir / rel).read_text()
            reference = _words(manifest[sample]["text"])
            assert len(reference & _words(written)) / len(reference) >= 0.6, (rel, written)
        assert not (out_dir / ".hidden.txt").exists() and not (out_dir / "broken.txt").exists()

        status = voxq(stack, "status", batch_id, "--json", api_url=api_url, key=key)
        assert status.returncode == 0, status.stderr
        batch = json.loads(status.stdout)
        assert batch["total_jobs"] == 3 and batch["progress"] == 1.0
        assert batch["counts"]["succeeded"] >= 2
        human = voxq(stack, "status", batch_id, api_url=api_url, key=key)
        assert f"batch {batch_id}" in human.stdout and "of 3 jobs" in human.stdout

        with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}) as c:
            jobs = c.get(f"/v1/batches/{batch_id}/jobs").json()["items"]
        school = next(j for j in jobs if j["filename"] == "voicemail-school.mp3")
        assert school["status"] == "succeeded" and school["model"].startswith("local")
        job_status = voxq(stack, "status", school["id"], api_url=api_url, key=key)
        assert f"job {school['id']} succeeded" in job_status.stdout
        downloaded = voxq(stack, "download", school["id"], "--format", "json", api_url=api_url, key=key)
        assert downloaded.returncode == 0, downloaded.stderr
        assert json.loads(downloaded.stdout)["job_id"] == school["id"]
        batch_dl = voxq(stack, "download", batch_id, "--out", str(tmp_path / "dl"), api_url=api_url, key=key)
        assert batch_dl.returncode == 0, batch_dl.stderr
        assert (tmp_path / "dl" / "voicemail-school.txt").read_text() == (
            out_dir / "calls/voicemail-school.txt"
        ).read_text()

        usage = voxq(stack, "usage", "--group-by", "model", "--json", api_url=api_url, key=key)
        assert usage.returncode == 0, usage.stderr
        assert json.loads(usage.stdout)["group_by"] == "model"

        listed = voxq(stack, "keys", "list", "--tenant", "e2e-cli")
        assert key[:10] in listed.stdout and "active" in listed.stdout and key not in listed.stdout
        revoked = voxq(stack, "keys", "revoke", key[:10])
        assert revoked.returncode == 0, revoked.stderr
        # The API remembers a valid key for VOXQ_AUTH_CACHE_SECONDS: revocation is effective after that.
        time.sleep(get_settings().auth_cache_seconds + 0.2)
        refused = voxq(stack, "status", batch_id, api_url=api_url, key=key)
        assert refused.returncode == 1 and "unauthorized" in refused.stderr
        assert "revoked" in voxq(stack, "keys", "list").stdout
