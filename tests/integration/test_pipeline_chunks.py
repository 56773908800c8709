"""Long files through real Celery workers and the fake provider: how a job's chunks are sent
(`VOXQ_CHUNK_CONTEXT`), which prompt each carries, resume from kept chunk answers, and a chunk ending the
job."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Attempt
from core.statuses import AttemptOutcome, JobStatus
from tests.audio_fixtures import sequence, wav_bytes
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import PRIMARY, SECOND, Pipeline, WorkerFactory
from tests.support import wait_until
from worker.pieces import compose_prompt
from worker.store.answers import piece_key

FREQS = [300, 450, 600, 750, 900, 1050, 1200, 1350, 1500, 1650]
LEAD, TONE, GAP = 0.5, 1.0, 1.5
PROMPT = "Tones."
CHUNKED = {"VOXQ_MAX_CHUNK_SECONDS": "3", "VOXQ_SHORT_FILE_SECONDS": "2"}


def long_audio() -> bytes:
    return wav_bytes(sequence([(f, TONE) for f in FREQS], gap=GAP, lead=LEAD))


def chunk_texts(pipeline: Pipeline, job: uuid.UUID) -> dict[int, str]:
    """Each chunk's kept answer text (`job_answers`), by chunk index."""
    answers = pipeline.answers(job)
    return {
        c.index: answers[piece_key(c.index)].text
        for c in pipeline.chunks(job)
        if piece_key(c.index) in answers
    }


def requests_by_chunk(pipeline: Pipeline, fake: FakeOpenAI, job: uuid.UUID) -> dict[int, dict[str, Any]]:
    """The fake's log entry of each chunk's (single) request, by chunk index."""
    index = {str(a.id): a.chunk_index for a in pipeline.attempts(job)}
    out: dict[int, dict[str, Any]] = {}
    for entry in fake.request_log():
        if entry["request_id"] in index:
            chunk = index[entry["request_id"]]
            assert chunk is not None and chunk not in out, "one request per chunk"
            out[chunk] = entry
    return out


def prepare_only(pipeline: Pipeline, worker: WorkerFactory, jobs: list[uuid.UUID], **env: str) -> None:
    with worker(concurrency=1, queues="ingest", **env):
        pipeline.submit(jobs)
        wait_until(
            lambda: all(r.group_id for r in pipeline.jobs(jobs).values()), timeout=60, what="jobs grouped"
        )


def test_alternate_sends_even_chunks_at_once_then_odd_ones_with_their_predecessors_tail(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(SECOND, latency=1.0)
    tenant = pipeline.tenant()
    job = pipeline.job(tenant, pipeline.batch(tenant, models=[SECOND], prompt=PROMPT), long_audio())
    with worker(concurrency=1, **CHUNKED):  # default VOXQ_CHUNK_CONTEXT: alternate
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job])
    assert rows[job].status == JobStatus.SUCCEEDED.value
    chunks = pipeline.chunks(job)
    assert len(chunks) >= 4
    requests = requests_by_chunk(pipeline, fake_openai, job)
    assert sorted(requests) == [c.index for c in chunks]
    even = [requests[c.index] for c in chunks if c.index % 2 == 0]
    odd = [requests[c.index] for c in chunks if c.index % 2 == 1]
    # Wave 1 (even chunks) ran in parallel: every request arrived before any was answered (1 s latency).
    assert max(r["received"] for r in even) < min(r["ts"] for r in even)
    # Wave 2 (odd chunks) in parallel too, and only after wave 1 had answered (it needs their text).
    assert max(r["received"] for r in odd) < min(r["ts"] for r in odd)
    assert min(r["received"] for r in odd) >= max(r["ts"] for r in even)
    # Even chunks carry the batch prompt only; odd chunks the batch prompt + their predecessor's tail.
    assert all(r["prompt"] == PROMPT for r in even)
    texts = chunk_texts(pipeline, job)
    assert sorted(texts) == [c.index for c in chunks]  # every chunk's answer kept
    for chunk in chunks:
        if chunk.index % 2 == 1:
            previous = texts[chunk.index - 1]
            assert previous
            prompt = requests[chunk.index]["prompt"]
            assert prompt == compose_prompt(PROMPT, previous)
            assert prompt.startswith(PROMPT + "\n") and prompt.endswith(previous.strip())
    # Stitched in chunk order, with segment times in the original file's time.
    transcript = pipeline.transcript(job)
    assert transcript is not None
    assert transcript.text == " ".join(f"tone{f}" for f in FREQS)
    segments = transcript.segments or []
    assert [s["text"] for s in segments] == [f"tone{f}" for f in FREQS]
    for i, seg in enumerate(segments):
        start = LEAD + i * (TONE + GAP)
        assert seg["start"] == pytest.approx(start, abs=0.08)
        assert seg["end"] == pytest.approx(start + TONE, abs=0.08)
    # Provenance lists the attempts in chunk order.
    by_id = {str(a.id): a.chunk_index for a in pipeline.attempts(job)}
    assert [by_id[a] for a in transcript.provenance["attempt_ids"]] == [c.index for c in chunks]


def test_sequential_sends_one_chunk_after_another_each_prompted_with_the_previous_tail(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(PRIMARY, latency=0.2)
    tenant = pipeline.tenant()
    job = pipeline.job(tenant, pipeline.batch(tenant, models=[PRIMARY], prompt=PROMPT), long_audio())
    with worker(concurrency=1, VOXQ_CHUNK_CONTEXT="sequential", **CHUNKED):
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job])
    assert rows[job].status == JobStatus.SUCCEEDED.value
    chunks = pipeline.chunks(job)
    assert len(chunks) >= 4
    requests = requests_by_chunk(pipeline, fake_openai, job)
    texts = chunk_texts(pipeline, job)
    assert requests[0]["prompt"] == PROMPT
    for a, b in itertools.pairwise(chunks):
        assert requests[b.index]["received"] >= requests[a.index]["ts"]  # one after another
        assert requests[b.index]["prompt"] == compose_prompt(PROMPT, texts[a.index])
    transcript = pipeline.transcript(job)
    assert transcript is not None and transcript.text == " ".join(f"tone{f}" for f in FREQS)


def test_a_resumed_job_reuses_stored_chunks_and_prompts_their_successors_with_them(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    tenant = pipeline.tenant()
    job = pipeline.job(tenant, pipeline.batch(tenant, models=[PRIMARY], prompt=PROMPT), long_audio())
    prepare_only(pipeline, worker, [job], **CHUNKED)
    chunks = pipeline.chunks(job)
    assert len(chunks) >= 4
    # An earlier run paid for chunk 1 and was killed: its answer is kept in job_answers, for the same
    # bounds of the same plan (a text the fake would never produce, so reuse is visible).
    stored_text = "storedwords from an earlier run"
    pipeline.keep_chunk_answer(job, 1, stored_text)
    with worker(concurrency=1, queues="transcribe.high,transcribe,transcribe.low", **CHUNKED):
        rows = pipeline.wait_terminal([job])
    assert rows[job].status == JobStatus.SUCCEEDED.value
    requests = requests_by_chunk(pipeline, fake_openai, job)
    assert 1 not in requests  # never sent again
    assert sorted(requests) == [c.index for c in chunks if c.index != 1]
    # Chunk 2 (the first of the pending run after the stored chunk) is prompted with the stored text.
    assert requests[2]["prompt"] == compose_prompt(PROMPT, stored_text)
    assert requests[0]["prompt"] == PROMPT
    transcript = pipeline.transcript(job)
    assert transcript is not None
    words = transcript.text.split()
    first = chunk_texts(pipeline, job)[0]
    assert transcript.text.startswith(f"{first.strip()} {stored_text} ")
    assert words[-1] == f"tone{FREQS[-1]}"


def test_a_chunk_that_ends_the_job_halts_its_siblings_and_leaves_no_call_open(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(PRIMARY, latency=0.5, latency_jitter=1.5)
    fake_openai.script(PRIMARY, ["invalid_file"])  # the first request of wave 1
    tenant = pipeline.tenant()
    job = pipeline.job(tenant, pipeline.batch(tenant, models=[PRIMARY]), long_audio())
    prepare_only(pipeline, worker, [job], **CHUNKED)
    with worker(concurrency=1, queues="transcribe.high,transcribe,transcribe.low", **CHUNKED):
        rows = pipeline.wait_terminal([job])
        # The moment the job is terminal, every call its chunks started was already closed.
        with Session(pipeline.engine) as s:
            outcomes = list(s.execute(select(Attempt.outcome).where(Attempt.job_id == job)).scalars())
    assert (rows[job].status, rows[job].error_code) == (JobStatus.FAILED.value, "invalid_audio")
    assert AttemptOutcome.PENDING.value not in outcomes
    attempts = pipeline.attempts(job)
    # Wave 2 never started; the wave-1 siblings' answers were kept (paid for, reusable).
    assert all((a.chunk_index or 0) % 2 == 0 for a in attempts)
    assert [a.outcome for a in attempts].count(AttemptOutcome.FAILED.value) == 1
    saved = set(chunk_texts(pipeline, job))
    succeeded = {a.chunk_index for a in attempts if a.outcome == AttemptOutcome.SUCCESS.value}
    assert saved == succeeded and len(succeeded) == len(attempts) - 1
    assert len(fake_openai.billing_log()) == len(succeeded)
