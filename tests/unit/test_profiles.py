"""The batch profile changes what the worker does: trimming, pauses, chunk plan and chunk context."""

from __future__ import annotations

import pytest

from core.settings import Settings
from tests.audio_fixtures import sequence
from worker.audio import prepare_audio
from worker.profiles import PODCAST_MAX_CHUNK_SECONDS, profile_plan
from worker.waves import plan_waves


def _pcm(parts: list[tuple[float, float]], gap: float, lead: float = 2.0) -> bytes:
    from tests.audio_fixtures import wav_bytes

    return wav_bytes(sequence(parts, gap=gap, lead=lead))


def test_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXQ_TRIM_SILENCE", "false")
    monkeypatch.setenv("VOXQ_CHUNK_CONTEXT", "none")
    settings = Settings()
    voicemail = profile_plan("voicemail", settings)
    podcast = profile_plan("podcast", settings)
    auto = profile_plan("auto", settings)
    assert voicemail.trim and not podcast.trim and not auto.trim  # voicemail trims whatever the setting
    assert (voicemail.chunk_context, podcast.chunk_context, auto.chunk_context) == (
        "none",
        "alternate",
        "none",
    )
    assert podcast.max_chunk_seconds == PODCAST_MAX_CHUNK_SECONDS < auto.max_chunk_seconds
    assert podcast.pause_pad_seconds > voicemail.pause_pad_seconds == auto.pause_pad_seconds
    monkeypatch.setenv("VOXQ_CHUNK_CONTEXT", "sequential")
    assert profile_plan("podcast", Settings()).chunk_context == "sequential"
    assert profile_plan("something-else", Settings()) == profile_plan("auto", Settings())


def test_a_podcast_keeps_its_pauses_and_a_voicemail_loses_them() -> None:
    settings = Settings()
    audio = _pcm([(440.0, 1.0), (660.0, 1.0), (550.0, 1.0)], gap=1.5)  # 1.5 s pauses inside speech
    trimmed = {}
    for profile in ("voicemail", "podcast"):
        plan = profile_plan(profile, settings)
        prepared = prepare_audio(
            audio,
            max_seconds=3600,
            max_chunk_seconds=plan.max_chunk_seconds,
            trim=plan.trim,
            pause_pad_seconds=plan.pause_pad_seconds,
            memory_seconds=120,
        )
        trimmed[profile] = prepared.speech_seconds
        prepared.close()
    # three 1 s tones: a voicemail keeps ~0.6 s of each pause, a podcast all 1.5 s of them
    assert trimmed["voicemail"] == pytest.approx(3 + 2 * 0.6 + 1.0 + 0.3, abs=0.15)
    assert trimmed["podcast"] == pytest.approx(3 + 2 * 1.5 + 1.0 + 1.0, abs=0.15)


def test_a_long_podcast_is_cut_into_shorter_chunks_at_its_pauses() -> None:
    settings = Settings()
    # 13 minutes of tones with 2.5 s pauses (speech-like: a tone of 20 s, a pause, again)
    parts = [(300.0 + 10 * (i % 20), 20.0) for i in range(36)]
    audio = _pcm(parts, gap=2.5, lead=0.5)
    plans = {}
    for profile in ("auto", "podcast"):
        plan = profile_plan(profile, settings)
        prepared = prepare_audio(
            audio,
            max_seconds=3600,
            max_chunk_seconds=plan.max_chunk_seconds,
            trim=plan.trim,
            pause_pad_seconds=plan.pause_pad_seconds,
            memory_seconds=1,
        )
        plans[profile] = list(prepared.time_map.chunks)
        prepared.close()
    assert len(plans["auto"]) == 2 and len(plans["podcast"]) == 3
    for start, end in plans["podcast"]:
        assert end - start <= PODCAST_MAX_CHUNK_SECONDS


def test_a_podcast_always_sends_its_chunks_with_context() -> None:
    settings = Settings(chunk_context="none")
    waves_voicemail = plan_waves(4, set(), profile_plan("voicemail", settings).chunk_context)
    waves_podcast = plan_waves(4, set(), profile_plan("podcast", settings).chunk_context)
    assert [[s.context for s in wave] for wave in waves_voicemail] == [[None, None, None, None]]
    assert [[s.context for s in wave] for wave in waves_podcast] == [[None, None], [0, 2]]
