"""voxq against a real third-party OpenAI-compatible server: faster-whisper-server 0.0.3 (issue #17, item 5).

The server is installed from PyPI into its own venv and started on the bundled Whisper base weights
(tests/third_party.py); it fails the test, never skips it, when it cannot start. Configured through a
providers file as a zero-cost self-hosted provider, it is what `voxq providers check` reports and what a
batch goes through: API, prepare, transcribe (verbose_json segments), SRT download, $0 cost records.
"""

from __future__ import annotations

import json
import re
import shutil
from decimal import Decimal
from itertools import pairwise
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.models import Attempt, CostRecord, Job, Tenant
from tests.api_helpers import make_key, start_api_server, stop_api_server
from tests.support import REPO_ROOT, Stack, celery_worker, run_voxq
from tests.third_party import faster_whisper_server

pytestmark = pytest.mark.e2e

SAMPLES = REPO_ROOT / "samples"
TENANT = "e2e-self-hosted"
SRT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)$")


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 5}


def _cues(srt: str) -> list[tuple[float, float, str]]:
    cues = []
    for block in srt.strip().split("\n\n"):
        lines = block.strip().splitlines()
        match = SRT_TIME.match(lines[1]) if len(lines) >= 3 else None
        assert match is not None, block
        h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(g) for g in match.groups())
        cues.append(
            (
                h1 * 3600 + m1 * 60 + s1 + ms1 / 1000,
                h2 * 3600 + m2 * 60 + s2 + ms2 / 1000,
                " ".join(lines[2:]),
            )
        )
    return cues


def providers_file(path: Path, base_url: str) -> Path:
    path.write_text(
        "[providers.gpu]\n"
        f'base_url = "{base_url}"\n'
        "[providers.gpu.models.whisper-base]\n"
        'price = "zero"\n'
        'capabilities = { timestamps = "segment", response_formats = ["json", "verbose_json"] }\n'
    )
    return path


def test_faster_whisper_server_as_a_zero_cost_self_hosted_provider(stack: Stack, tmp_path: Path) -> None:
    manifest = {item["file"]: item for item in json.loads((SAMPLES / "manifest.json").read_text())}
    with faster_whisper_server(tmp_path / "fws") as base_url:
        env = {
            "VOXQ_PROVIDERS_FILE": str(providers_file(tmp_path / "providers.toml", base_url)),
            "VOXQ_PRIMARY_MODEL": "gpu:whisper-base",
            "VOXQ_FALLBACK_MODELS": "",  # no local fallback: every transcript comes from the server
            "OPENAI_API_KEY": "",
        }

        check = run_voxq(["providers", "check"], stack.child_env(**env), timeout=600)
        assert check.returncode == 0, check.stdout + check.stderr
        (row,) = [line for line in check.stdout.splitlines() if line.startswith("gpu ")]
        assert "yes (no /models)" in row and " segment " in row and " no " in row and "$0.00" in row
        assert {"rachel", "evans"} <= _words(row), row

        inbox = tmp_path / "inbox"
        inbox.mkdir()
        for name in ("voicemail-dentist.flac", "voicemail-school.mp3"):
            shutil.copy(SAMPLES / name, inbox / name)
        key = make_key(TENANT)
        api = start_api_server(stack, **env)
        try:
            with celery_worker(stack, env=env, concurrency=1):
                out = tmp_path / "out"
                submitted = run_voxq(
                    [
                        "submit",
                        str(inbox),
                        "--language",
                        "en",
                        "--out",
                        str(out),
                        "--format",
                        "srt",
                        "--timeout",
                        "500",
                    ],
                    stack.child_env(VOXQ_API_URL=api.url, VOXQ_API_KEY=key, **env),
                    timeout=600,
                )
        finally:
            stop_api_server(api)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    for sample in ("voicemail-dentist.flac", "voicemail-school.mp3"):
        name = sample.rsplit(".", 1)[0]
        cues = _cues((out / f"{name}.srt").read_text())
        # several cues from the server's segments, in order, inside the audio
        assert len(cues) >= 2, cues
        assert all(start < end for start, end, _ in cues)
        assert all(a[1] <= b[0] + 0.01 for a, b in pairwise(cues))
        assert cues[-1][1] <= manifest[sample]["seconds"] + 1.0
        reference = _words(manifest[sample]["text"])
        heard = _words(" ".join(text for _, _, text in cues))
        assert len(reference & heard) / len(reference) >= 0.6, (name, heard)

    with session_scope() as session:
        tenant = session.scalars(select(Tenant).where(Tenant.name == TENANT)).one()
        jobs = session.scalars(select(Job).where(Job.tenant_id == tenant.id)).all()
        attempts = session.scalars(select(Attempt).where(Attempt.tenant_id == tenant.id)).all()
        costs = session.scalars(select(CostRecord).where(CostRecord.tenant_id == tenant.id)).all()
    assert len(jobs) == 2 and all(j.status == "succeeded" for j in jobs)
    assert attempts and all(a.model == "whisper-base" and a.outcome == "success" for a in attempts)
    assert all(a.provider == "gpu" for a in attempts)
    # exactly one cost record per billed attempt, each $0, not an estimate
    assert sorted(c.attempt_id for c in costs) == sorted(a.id for a in attempts)
    assert all(c.usd == Decimal(0) and not c.estimated and c.model == "whisper-base" for c in costs)
    assert all(j.cost_usd == Decimal(0) for j in jobs)
