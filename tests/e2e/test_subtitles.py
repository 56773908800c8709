"""Subtitles for a text-only model, end to end: a 3-minute talk over HTTP through the API, a provider-lane
worker and a local worker consuming `local,align` (as `voxq dev` and compose run them), the fake OpenAI
server answering as gpt-4o-mini-transcribe (text only, no timestamps) with the talk's true text."""

from __future__ import annotations

import itertools
import re
import time

import pytest

from tests.align_support import joined_speech
from tests.api_helpers import make_key, start_api_server, stop_api_server
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.pipeline_support import PRIMARY, hosted_env
from tests.support import Stack, celery_worker, wait_until
from voxq.devstack import LOCAL_WORKER_QUEUES, WORKER_QUEUES

pytestmark = pytest.mark.slow

MAX_CUE_SECONDS = 7.0
_CUE = re.compile(r"^(\d+)\n(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)\n", re.MULTILINE)


def _srt_cues(srt: str) -> list[tuple[float, float]]:
    """(start, end) of every cue, checking they are numbered 1, 2, ..."""
    cues = []
    for number, match in enumerate(_CUE.finditer(srt), start=1):
        assert int(match.group(1)) == number
        h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(g) for g in match.groups()[1:])
        cues.append((h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000))
    return cues


def test_a_three_minute_talk_gets_subtitles_from_a_text_only_model(
    stack: Stack, fake_openai: FakeOpenAI
) -> None:
    speech = joined_speech(180.0)
    assert speech.duration >= 180.0 and len(speech.spans) >= 15
    fake_openai.script(PRIMARY, [Fault("ok", text=speech.text)])
    env = hosted_env()
    api = start_api_server(stack)
    try:
        with (
            celery_worker(stack, name="lanes", queues=",".join(WORKER_QUEUES), env=env),
            celery_worker(stack, name="local", queues=LOCAL_WORKER_QUEUES, concurrency=1, env=env),
            api.client(make_key("subtitles")) as c,
        ):
            batch = c.post(
                "/v1/batches", json={"name": "talks", "profile": "podcast", "language": "en"}
            ).json()
            assert batch["timestamps"] == "segment"  # the podcast profile's default
            job = c.post(
                f"/v1/batches/{batch['id']}/files",
                files=[("file", ("talk.flac", speech.flac(), "audio/flac"))],
            ).json()["jobs"][0]
            assert c.post(f"/v1/batches/{batch['id']}/submit").status_code == 202
            started = time.monotonic()

            def aligned() -> bool:
                srt = c.get(f"/v1/jobs/{job['id']}/transcript", params={"format": "srt"})
                return srt.status_code == 200 and srt.headers["x-voxq-alignment"] != "pending"

            wait_until(aligned, timeout=300, interval=1.0, what="the transcript's alignment")
            srt = c.get(f"/v1/jobs/{job['id']}/transcript", params={"format": "srt"})
            row = c.get(f"/v1/jobs/{job['id']}").json()
    finally:
        stop_api_server(api)
    assert row["status"] == "succeeded" and row["model"] == PRIMARY
    assert srt.headers["x-voxq-cues"] == "aligned" and srt.headers["x-voxq-alignment"] == "aligned"
    cues = _srt_cues(srt.text)
    duration = row["duration_seconds"]
    assert abs(duration - speech.duration) < 0.05
    assert len(cues) >= speech.speech_seconds / MAX_CUE_SECONDS, (len(cues), speech.speech_seconds)
    assert all(0.0 <= start <= end <= duration for start, end in cues)  # inside the audio
    assert all(end - start <= MAX_CUE_SECONDS + 1e-3 for start, end in cues)
    for (_, prev_end), (start, _) in itertools.pairwise(cues):
        assert start >= prev_end  # in order, no overlaps
    # Every sentence's words, in the hosted spelling, are on screen once, in order.
    on_screen = " ".join(" ".join(block.splitlines()[2:]) for block in srt.text.strip().split("\n\n"))
    assert on_screen.split() == speech.text.split()
    # Each clip's first cue starts near its true start (the benchmark's p95 target, 0.6 s).
    starts = [start for start, _ in cues]
    for true_start, _ in speech.spans:
        assert min(abs(s - true_start) for s in starts) <= 0.6, true_start
    assert time.monotonic() - started < 300
