"""Logs of a full run (API process + worker process, DEBUG level) hold neither the OpenAI key nor any
transcript text, and are one JSON object per line carrying the job context."""

from __future__ import annotations

import json
import secrets

from core.statuses import JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.observability_support import FALLBACK, PRIMARY, full_run, tone_audio
from tests.support import Stack

# Frequencies the fake "hears" as words: the transcript is "tone1230 tone770 tone1510".
PHRASE_FREQS = [1230, 770, 1510]
PHRASE_WORDS = [f"tone{f}" for f in PHRASE_FREQS]


def test_full_run_logs_leak_neither_the_api_key_nor_transcript_text(
    stack: Stack, fake_openai: FakeOpenAI
) -> None:
    # Not shaped like an OpenAI key, so only voxq's own care (or its settings-based redaction) hides it.
    planted_key = "plantedkey" + secrets.token_hex(12)
    # A retried 500 and a fallback make the worker log errors, where leaks usually hide.
    fake_openai.script(PRIMARY, ["server_error", "quota"])
    run = full_run(
        stack,
        fake_openai,
        [("phrase.flac", tone_audio(PHRASE_FREQS))],
        models=[PRIMARY, FALLBACK],
        env={"OPENAI_API_KEY": planted_key, "VOXQ_LOG_LEVEL": "DEBUG", "VOXQ_LOG_FORMAT": "json"},
    )
    assert run.batch["status"] == "completed", run.batch
    (job,) = run.jobs
    assert job["status"] == JobStatus.SUCCEEDED.value

    # The phrase really went through the system, and the key really reached the provider.
    from core.db import session_scope
    from core.models import Transcript

    with session_scope() as session:
        (transcript,) = session.query(Transcript).all()
    assert transcript.text.split() == PHRASE_WORDS
    requests = fake_openai.request_log()
    assert len(requests) >= 3

    texts = {path.name: path.read_text(errors="replace") for path in run.logs}
    assert all(texts.values()), "every process wrote a log"
    for name, text in texts.items():
        assert planted_key not in text, f"the OpenAI key is in {name}"
        assert planted_key[:16] not in text, f"part of the OpenAI key is in {name}"
        for word in PHRASE_WORDS:
            assert word not in text, f"transcript text {word!r} is in {name}"
        # No audio bytes: FLAC and WAV magic never appear (botocore logs bodies at DEBUG; it is kept quiet).
        assert "fLaC" not in text and "RIFF" not in text, f"audio bytes are in {name}"

    # Structured: every log line of the worker is one JSON object with the standard fields.
    worker_lines = [json.loads(line) for line in texts["worker.log"].splitlines() if line.startswith("{")]
    assert len(worker_lines) >= 5
    for line in worker_lines:
        assert {"ts", "level", "logger", "event"} <= set(line)
    # VOXQ_LOG_LEVEL=DEBUG reached the worker over Celery's `-l INFO`.
    assert any(line["level"] == "debug" for line in worker_lines)
    # Lines logged inside a task carry the task's context; the batch's end names its batch.
    assert any(line.get("task_id") and line.get("task") for line in worker_lines)
    assert any(line.get("group_id") and line.get("task") == "voxq.transcribe.group" for line in worker_lines)
    assert any(line.get("batch_id") == run.batch["id"] for line in worker_lines)
    api_lines = [json.loads(line) for line in texts[run.logs[0].name].splitlines() if line.startswith("{")]
    assert api_lines and all({"ts", "level", "logger", "event"} <= set(line) for line in api_lines)
