"""whisper-1 names the language ("english") where the API promises ISO-639-1 codes: voxq stores and
serves the code (issue #16, item 22b). Stages run in this process against the real servers and the fake,
whose verbose_json names the language as whisper-1 does."""

from __future__ import annotations

import pytest

from core.statuses import JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import SECOND, Pipeline, tones

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process


def test_whisper_language_names_are_stored_and_served_as_iso_codes(
    pipeline: Pipeline, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.transcripts import render
    from core.settings import reset_settings_cache
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    monkeypatch.setenv("VOXQ_PRIMARY_MODEL", SECOND)  # whisper-1: verbose_json with a language name
    monkeypatch.setenv("VOXQ_FALLBACK_MODELS", "")
    reset_settings_cache()
    tenant = pipeline.tenant()
    detected = pipeline.job(tenant, pipeline.batch(tenant), tones(440))
    german = pipeline.job(tenant, pipeline.batch(tenant, language="de"), tones(450))
    rt = get_runtime()
    for job in (detected, german):
        for group in prepare_jobs([job], owner="test:1").groups:
            rt.run(transcribe_group(rt, group))

    languages = {}
    for job, code in ((detected, "en"), (german, "de")):
        row = pipeline.jobs([job])[job]
        assert row.status == JobStatus.SUCCEEDED.value
        transcript = pipeline.transcript(job)
        assert transcript is not None and transcript.model == SECOND
        assert transcript.language == code
        assert pipeline.answers(job)["whole"].language == code
        body, _ = render(row, transcript, "json")
        languages[code] = body["language"]
    assert languages == {"en": "en", "de": "de"}
    names = [b["model"] for b in fake_openai.billing_log()]
    assert names == [SECOND, SECOND]


def test_a_transcript_kept_with_a_language_name_is_served_with_its_code(pipeline: Pipeline) -> None:
    """Rows written before codes were enforced."""
    from api.transcripts import render
    from core.models import Job, Transcript

    job = Job(id=None, duration_seconds=1.0)
    body, _ = render(job, Transcript(text="hi", language="english", model=SECOND, segments=[]), "json")
    assert body["language"] == "en"
