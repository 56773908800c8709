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
    # A retried 500 and a fallback make the worker log errors, where leaks usually hide (model_not_found:
    # the model's trouble, so the fallback of the same provider serves; quota would skip it, issue #17).
    fake_openai.script(PRIMARY, ["server_error", "model_not_found"])
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


# A trigger that refuses every transcript with an error whose message and DETAIL carry the row's text:
# the worst case for a database error that reaches the logs (Postgres' own "Failing row contains (...)"
# DETAIL of a constraint violation does the same), on top of the INSERT's parameters.
REFUSE_TRANSCRIPTS = """
CREATE OR REPLACE FUNCTION voxq_test_refuse_transcript() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION 'transcript refused: %', NEW.text USING DETAIL = 'the row held: ' || NEW.text;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER voxq_test_refuse_transcript BEFORE INSERT ON transcripts
  FOR EACH ROW EXECUTE FUNCTION voxq_test_refuse_transcript();
"""
ALLOW_TRANSCRIPTS = """
DROP TRIGGER IF EXISTS voxq_test_refuse_transcript ON transcripts;
DROP FUNCTION IF EXISTS voxq_test_refuse_transcript();
"""


def test_a_database_error_during_the_transcript_write_leaks_no_text_or_parameters(
    stack: Stack, fake_openai: FakeOpenAI
) -> None:
    import time

    from sqlalchemy import create_engine, text

    from tests.api_helpers import make_key, start_api_server, stop_api_server
    from tests.support import celery_worker, wait_until

    words = [f"tone{f}" for f in (1330, 870, 1610)]
    engine = create_engine(stack.database_url)
    with engine.begin() as conn:
        conn.execute(text(REFUSE_TRANSCRIPTS))
    env = {"OPENAI_BASE_URL": fake_openai.base_url, "VOXQ_LOG_LEVEL": "DEBUG", "VOXQ_LOG_FORMAT": "json"}
    server = start_api_server(stack, **env)
    worker_log = stack.work_dir / f"refused-{time.time_ns()}.log"
    try:
        with celery_worker(stack, env=env, log_path=worker_log), server.client(make_key("dberr")) as c:
            batch = c.post("/v1/batches", json={"models": [PRIMARY], "auto_submit": True}).json()
            files = [("file", ("phrase.flac", tone_audio([1330, 870, 1610]), "audio/flac"))]
            assert c.post(f"/v1/batches/{batch['id']}/files", files=files).status_code == 201
            # The provider answered (the text exists) and the write of the transcript failed.
            wait_until(lambda: fake_openai.request_log(), timeout=120, what="the provider was called")
            wait_until(
                lambda: "RaiseException" in worker_log.read_text(errors="replace"),
                timeout=120,
                what="the refused transcript write logged",
            )
            time.sleep(1.0)  # whatever the worker logs right after the failure
        with engine.connect() as conn:  # the trigger refused every transcript write
            assert conn.execute(text("SELECT count(*) FROM transcripts")).scalar_one() == 0
    finally:
        stop_api_server(server)
        with engine.begin() as conn:
            conn.execute(text(ALLOW_TRANSCRIPTS))
        engine.dispose()
    logs = {
        "worker": worker_log.read_text(errors="replace"),
        "api": server.log_path.read_text(errors="replace"),
    }
    assert "P0001" in logs["worker"] or "RaiseException" in logs["worker"]  # the error itself is logged
    for name, content in logs.items():
        for word in words:
            assert word not in content, f"transcript text {word!r} reached the {name} log"
        assert "the row held" not in content and "transcript refused:" not in content, name
        assert "[parameters:" not in content, f"SQL parameters reached the {name} log"
