"""The align stage through the real pipeline: API, Celery workers on the `align` queue, Postgres, S3, and the
fake OpenAI server answering as a text-only model (gpt-4o-mini-transcribe) with the speech's true text."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import httpx
import pytest

from core.db import session_scope
from core.models import Transcript
from core.storage import Storage
from tests.align_support import Speech, joined_speech
from tests.api_helpers import ApiServer, make_key
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.pipeline_support import PRIMARY, SECOND, Pipeline, WorkerFactory, tones
from tests.support import Stack, wait_until

pytestmark = pytest.mark.slow

# Every queue but `local`: the align stage runs here on the bundled model, loaded by its first task.
QUEUES = "ingest.high,transcribe.high,ingest,transcribe,transcribe.low,align,maintenance,webhooks"
START_ERROR_SECONDS = 0.6  # the benchmark's p95 target for a sentence start


def _submit(c: httpx.Client, data: bytes, filename: str, **options: Any) -> str:
    batch = c.post("/v1/batches", json={"name": "align", **options})
    assert batch.status_code == 201, batch.text
    jobs = c.post(
        f"/v1/batches/{batch.json()['id']}/files", files=[("file", (filename, data, "audio/flac"))]
    ).json()["jobs"]
    assert c.post(f"/v1/batches/{batch.json()['id']}/submit").status_code == 202
    return str(jobs[0]["id"])


def _alignment(job_id: str, timeout: float = 240) -> dict[str, Any]:
    """The job's alignment document once it is no longer pending."""

    def done() -> dict[str, Any] | None:
        with session_scope() as session:
            doc = session.query(Transcript.alignment).filter(Transcript.job_id == uuid.UUID(job_id)).scalar()
        return doc if isinstance(doc, dict) and doc.get("status") != "pending" else None

    return wait_until(done, timeout=timeout, interval=0.5, what="the alignment")


def _check_cues(segments: list[dict[str, Any]], duration: float) -> None:
    assert segments
    for seg in segments:
        assert 0.0 <= seg["start"] <= seg["end"] <= duration + 0.01
    for prev, cur in itertools.pairwise(segments):
        assert cur["start"] >= prev["end"]  # in order, no overlaps


def _check_starts(words: list[dict[str, Any]], speech: Speech) -> None:
    """Each clip's first word starts within the target of its true start."""
    texts = speech.text.split()
    assert [w["word"] for w in words] == texts  # the hosted words, exactly
    index = 0
    for (start, _), clip_text in zip(speech.spans, speech.texts, strict=True):
        assert abs(words[index]["start"] - start) <= START_ERROR_SECONDS, (index, words[index], start)
        index += len(clip_text.split())


def test_text_only_transcript_is_aligned_on_the_align_queue_and_realigned_on_request(
    api: ApiServer, stack: Stack, fake_openai: FakeOpenAI, worker: WorkerFactory
) -> None:
    speech = joined_speech(40.0)
    fake_openai.script(PRIMARY, [Fault("ok", text=speech.text)])
    with (
        api.client(make_key("align-a")) as c,
        api.client(make_key("align-b")) as other,
        worker(concurrency=1, queues=QUEUES),
    ):
        if True:
            job_id = _submit(c, speech.flac(), "talk.flac", profile="podcast", language="en")
            assert c.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "processing", "succeeded")
            doc = _alignment(job_id)
            assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
            assert doc["status"] == "aligned" and doc["timestamps"] == "segment", doc.get("reason")
            assert doc["source"] == "aligned" and doc["method"] == "whisper_align" and doc["words"] == []

            srt = c.get(f"/v1/jobs/{job_id}/transcript", params={"format": "srt"})
            assert srt.status_code == 200 and srt.headers["x-voxq-cues"] == "aligned"
            body = c.get(f"/v1/jobs/{job_id}/transcript", params={"format": "json"}).json()
            assert body["text"] == speech.text and body["alignment"]["status"] == "aligned"
            _check_cues(body["segments"], speech.duration)
            assert len(body["segments"]) >= speech.speech_seconds / 7
            assert srt.text.count(" --> ") == len(body["segments"])

            # Re-aligning asks for words this time; another tenant's request is a 404.
            assert other.post(f"/v1/jobs/{job_id}/align").status_code == 404
            again = c.post(f"/v1/jobs/{job_id}/align", json={"timestamps": "word"})
            assert again.status_code == 202 and again.json()["status"] == "pending"
            doc = _alignment(job_id)
            assert doc["status"] == "aligned" and doc["timestamps"] == "word"
            body = c.get(f"/v1/jobs/{job_id}/transcript", params={"format": "json"}).json()
            _check_starts(body["words"], speech)
            assert "token" not in body["alignment"]

            # The upload gone, a new alignment fails: the text stays, srt falls back to the chunk cue.
            job = c.get(f"/v1/jobs/{job_id}").json()
            storage = Storage()
            for key in storage.client.list_objects_v2(Bucket=storage.bucket).get("Contents", []):
                if "/derived/" not in key["Key"]:
                    storage.client.delete_object(Bucket=storage.bucket, Key=key["Key"])
            assert c.post(f"/v1/jobs/{job_id}/align").status_code == 202
            doc = _alignment(job_id)
            assert doc["status"] == "failed" and doc["reason"] == "audio_unavailable"
            srt = c.get(f"/v1/jobs/{job_id}/transcript", params={"format": "srt"})
            assert srt.status_code == 200 and srt.headers["x-voxq-cues"] == "transcript"
            assert srt.headers["x-voxq-alignment"] == "failed; reason=audio_unavailable"
            assert srt.text.count(" --> ") == 1 and speech.text.split()[0] in srt.text
            vtt = c.get(f"/v1/jobs/{job_id}/transcript", params={"format": "vtt"}).text
            assert "NOTE voxq: cues are the transcript's own segments" in vtt
            assert c.get(f"/v1/jobs/{job_id}/transcript").text == speech.text
            assert job["status"] == "succeeded"


def test_align_endpoint_refuses_a_job_that_has_not_succeeded(api: ApiServer, stack: Stack) -> None:
    with api.client(make_key("align-c")) as c:
        batch = c.post("/v1/batches", json={"timestamps": "word"}).json()
        assert batch["timestamps"] == "word"
        job = c.post(
            f"/v1/batches/{batch['id']}/files", files=[("file", ("a.flac", tones(440), "audio/wav"))]
        ).json()["jobs"][0]
        refused = c.post(f"/v1/jobs/{job['id']}/align")
        assert refused.status_code == 409 and refused.json()["code"] == "job_not_succeeded"
        bad = c.post("/v1/batches", json={"timestamps": "words"})
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_timestamps"
        assert c.post("/v1/batches", json={"profile": "podcast"}).json()["timestamps"] == "segment"
        assert c.post("/v1/batches", json={"profile": "voicemail"}).json()["timestamps"] == "none"
        assert c.post("/v1/batches", json={}).json()["timestamps"] == "none"


def test_a_model_with_word_times_needs_no_alignment(
    api: ApiServer, stack: Stack, fake_openai: FakeOpenAI, worker: WorkerFactory
) -> None:
    data = tones(440, 880, 660, seconds=0.8, gap=1.0)
    # The chain falls back to whisper-1 (verbose_json, word times): model_not_found closes only the
    # primary (quota would close the whole provider, issue #17).
    fake_openai.script(PRIMARY, ["model_not_found"])
    with api.client(make_key("align-d")) as c, worker(concurrency=1, queues=QUEUES):
        job_id = _submit(c, data, "tones.wav", timestamps="word")
        doc = _alignment(job_id, timeout=60)
        duration = c.get(f"/v1/jobs/{job_id}").json()["duration_seconds"]
    with session_scope() as session:
        model = session.query(Transcript.model).filter(Transcript.job_id == uuid.UUID(job_id)).scalar()
    assert model == SECOND
    assert doc["status"] == "aligned" and doc["source"] == "model" and doc["method"] is None
    assert [w["word"] for w in doc["words"]] == ["tone440", "tone880", "tone660"]
    assert doc["cpu_seconds"] == 0.0  # no audio fetched, no model loaded
    _check_cues(doc["segments"], duration)


def test_the_sweeper_resends_an_alignment_pending_for_too_long(stack: Stack) -> None:
    from core.models import Transcript as TranscriptRow
    from tests.pipeline_support import processing_job_rows
    from worker.store.transcripts import STALE_ALIGNMENT_SECONDS, stale_alignments

    rows = processing_job_rows()
    fresh = processing_job_rows()
    old = "2026-01-01T00:00:00.000000+00:00"
    with session_scope() as session:
        for tenant_id, job_id, requested_at, token in (
            (rows.tenant_id, rows.job_id, old, "t-old"),
            (fresh.tenant_id, fresh.job_id, None, "t-new"),
        ):
            doc: dict[str, Any] = {"status": "pending", "token": token, "timestamps": "segment"}
            doc["requested_at"] = requested_at or "9999-01-01T00:00:00.000000+00:00"
            session.add(
                TranscriptRow(
                    tenant_id=tenant_id, job_id=job_id, text="x", model="m", provenance={}, alignment=doc
                )
            )
    assert stale_alignments() == [(rows.job_id, "t-old")]
    assert stale_alignments() == []  # marked sent again: not re-sent at every sweep
    assert stale_alignments(older_than=-STALE_ALIGNMENT_SECONDS) != []  # its requested_at moved to now


def test_identical_audio_gets_timings_whether_it_waited_for_its_twin_or_came_later(
    api: ApiServer, stack: Stack, fake_openai: FakeOpenAI, worker: WorkerFactory
) -> None:
    speech = joined_speech(12.0)
    fake_openai.script(PRIMARY, [Fault("ok", text=speech.text)])  # one call: the twins share it
    data = speech.flac()
    with api.client(make_key("align-e")) as c, worker(concurrency=1, queues=QUEUES):
        batch = c.post("/v1/batches", json={"profile": "podcast", "language": "en"}).json()
        files = [("file", (name, data, "audio/flac")) for name in ("a.flac", "b.flac")]
        jobs = c.post(f"/v1/batches/{batch['id']}/files", files=files).json()["jobs"]
        assert c.post(f"/v1/batches/{batch['id']}/submit").status_code == 202
        first = [_alignment(str(j["id"])) for j in jobs]
        later = _submit(c, data, "c.flac", profile="podcast", language="en")
        copied = _alignment(later)
    assert len(fake_openai.billing_log()) == 1
    for doc in [*first, copied]:
        assert doc["status"] == "aligned" and doc["source"] == "aligned", doc
        _check_cues(doc["segments"], speech.duration)
    assert copied["segments"] == first[0]["segments"]  # the finished twin's timings, copied


def test_a_chunked_file_is_aligned_chunk_by_chunk_into_original_time(
    stack: Stack, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: prepare plans chunks with trimmed pauses; the text-only model's one segment per chunk
    (its clips' texts) is aligned chunk by chunk and every clip's first word lands on its true start."""
    from sqlalchemy.orm import Session

    from core.models import Job
    from core.settings import reset_settings_cache
    from core.statuses import Timestamps
    from worker.align_stage import align_job
    from worker.audio import TimeMap
    from worker.prepare import prepare_jobs
    from worker.store.transcripts import new_token, pending_alignment

    monkeypatch.setenv("VOXQ_MAX_CHUNK_SECONDS", "20")
    reset_settings_cache()
    speech = joined_speech(45.0)
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant, language="en", profile="voicemail")  # pauses collapsed: a real time map
    job_id = pipeline.job(tenant, batch, speech.flac(), filename="talk.flac")
    assert prepare_jobs([job_id], owner="test:1").grouped == 1
    tmap = TimeMap.from_json(pipeline.jobs([job_id])[job_id].time_map)
    assert len(tmap.chunks) >= 2 and tmap.trimmed_seconds < speech.duration - 3
    segments, whole = [], []
    for t0, t1 in tmap.chunks:
        start, end = tmap.to_original(t0), tmap.to_original(t1, end=True)
        inside = [i for i, (a, b) in enumerate(speech.spans) if start <= (a + b) / 2 < end]
        # (the VAD's kept speech may end a little before a clip's nominal tail silence)
        whole += [i for i in inside if start - 0.3 <= speech.spans[i][0] and speech.spans[i][1] <= end + 0.3]
        segments.append({"start": start, "end": end, "text": " ".join(speech.texts[i] for i in inside)})
    token = new_token()
    with Session(pipeline.engine) as s, s.begin():
        job = s.get(Job, job_id)
        assert job is not None
        job.status = "succeeded"
        s.add(
            Transcript(
                tenant_id=tenant,
                job_id=job_id,
                text=" ".join(seg["text"] for seg in segments),
                segments=segments,
                model=PRIMARY,
                provenance={},
                alignment=pending_alignment(token, Timestamps.WORD),
            )
        )
    assert align_job(job_id, token) == "aligned"
    assert align_job(job_id, token) == "superseded"  # a redelivered task writes nothing
    doc = _alignment(str(job_id))
    assert [c["source"] for c in doc["chunks"]] == ["aligned"] * len(tmap.chunks)
    words = doc["words"]
    assert [w["word"] for w in words] == " ".join(seg["text"] for seg in segments).split()
    _check_cues(doc["segments"], speech.duration)
    first = 0
    for i, text in enumerate(speech.texts):  # clips a cut did not split start where they really start
        if i in whole:
            assert abs(words[first]["start"] - speech.spans[i][0]) <= START_ERROR_SECONDS, (i, words[first])
        first += len(text.split())
    assert len(whole) >= len(speech.texts) - len(tmap.chunks) + 1
