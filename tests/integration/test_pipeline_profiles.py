"""The batch profile changes what the worker does (issue #16 item 22d), through the real prepare stage
(Postgres, S3, the plain function behind the Celery task): trimming and the chunk plan."""

from __future__ import annotations

import pytest

from tests.audio_fixtures import sequence, wav_bytes
from tests.pipeline_support import Pipeline

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process


def test_the_profile_decides_trimming_and_the_chunk_plan(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import reset_settings_cache
    from worker.prepare import prepare_jobs
    from worker.profiles import PODCAST_MAX_CHUNK_SECONDS

    # The operator turned trimming off: a voicemail is trimmed anyway, a podcast and `auto` are not.
    monkeypatch.setenv("VOXQ_TRIM_SILENCE", "false")
    monkeypatch.setenv("VOXQ_MAX_CHUNK_SECONDS", "600")
    reset_settings_cache()
    short = wav_bytes(sequence([(440.0, 1.0), (660.0, 1.0), (550.0, 1.0)], gap=1.5, lead=2.0))  # 10 s
    long = wav_bytes(sequence([(300.0 + 10 * (i % 20), 20.0) for i in range(36)], gap=2.5, lead=0.5))
    jobs = {}
    for profile in ("voicemail", "podcast", "auto"):
        tenant = pipeline.tenant()  # one tenant each: identical audio would be deduplicated
        batch = pipeline.batch(tenant, profile=profile)
        jobs[profile] = (pipeline.job(tenant, batch, short), pipeline.job(tenant, batch, long))
    report = prepare_jobs([j for pair in jobs.values() for j in pair], owner="test:profiles")
    assert report.errors == 0 and report.failed == 0
    rows = pipeline.jobs([j for pair in jobs.values() for j in pair])
    speech = {p: rows[jobs[p][0]].speech_seconds for p in jobs}
    assert speech["voicemail"] == pytest.approx(5.5, abs=0.15)  # trimmed: lead-in 1 s, pauses 0.6 s
    assert speech["podcast"] == pytest.approx(10.0, abs=0.05)  # untouched, as the setting says
    assert speech["auto"] == pytest.approx(10.0, abs=0.05)
    chunks = {p: pipeline.chunks(jobs[p][1]) for p in jobs}
    assert len(chunks["auto"]) == 2  # 808.5 s in chunks of up to 600 s
    assert len(chunks["podcast"]) >= 3  # chunks of up to 300 s
    tones = [(0.5 + i * 22.5, 0.5 + i * 22.5 + 20.0) for i in range(36)]
    for chunk in chunks["podcast"]:
        assert chunk.end_seconds - chunk.start_seconds <= PODCAST_MAX_CHUNK_SECONDS + 0.01
        # cut at a pause, never inside a tone
        assert not any(a + 0.1 < chunk.start_seconds < b - 0.1 for a, b in tones), chunk.start_seconds
