"""Trimming silence must not cost the local engine words (C1: WER as sent ≤ WER untrimmed + 1 point).

A fixed small corpus built from the committed espeak-ng fixtures (tests/fixtures/speech): five voicemails,
each two fixtures joined by a pause, with a lead-in before and a recorder tail after, and seeded room tone
over everything (so the corpus is the same on every run and nothing new is committed). Each voicemail is
transcribed by the local engine (language `en`: Whisper's language detection on synthetic voices is a coin
flip that would drown the trim's effect) untrimmed and as voxq sends it (worker.audio.prepare_audio's FLAC
chunks); the edits as sent may exceed the untrimmed ones by at most 1% of the words. On these ten
fixtures the old 0.3 s lead-in still passed (16 vs 16 edits of 210): the corpus is too small to show a
1-point effect, which bench/c1_silence.py measures on ~1,200 words.

What hurt was too short a lead-in: the engine's own VAD (Silero, in faster-whisper) keeps 0.4 s before
speech, and with 0.3 s kept by the trim Whisper saw speech start earlier than in the untrimmed file and
got the first word wrong in 9 of 80 generated voicemails (2 of 80 untrimmed; "Hello Carlos" -> "The low
Carlos"). Whether one given clip flips is chaotic (thread count alone can flip it), so the deterministic
check is on the cause: on this corpus the engine's VAD must start what Whisper sees at the same original
time in the trimmed audio as in the untrimmed file. With a 0.3 s lead-in it does not and that test fails.

The corpus test also checks that what is sent is still at most 70% of what was submitted (the billing
half of C1) and that timestamps of the trimmed transcription map back into the original file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from core.providers.base import TranscriptionRequest
from core.settings import Settings
from tests.speech import load_fixtures, normalise
from tests.support import REPO_ROOT
from worker import audio
from worker.local_engine import LocalProvider, decode_audio

CACHE_DIR = REPO_ROOT / ".voxq" / "models"
RATE = 16_000
ROOM_TONE = 0.002
# (first fixture, second fixture, lead-in s, pause between them s, tail s)
LAYOUT = [
    (0, 1, 1.5, 1.2, 6.0),
    (2, 3, 0.6, 2.0, 6.0),
    (4, 5, 2.5, 0.8, 8.0),
    (6, 7, 1.0, 1.5, 7.0),
    (8, 9, 1.8, 1.0, 6.0),
]


def _speech(path: Path) -> np.ndarray:
    samples = decode_audio(path.read_bytes()).astype(np.float64)
    voiced = np.flatnonzero(np.abs(samples) > 0.01)
    return samples[max(voiced[0] - 800, 0) : voiced[-1] + 800]


def _corpus() -> list[tuple[str, bytes]]:
    """(reference text, FLAC) of each voicemail of the fixed corpus."""
    fixtures = load_fixtures()
    out = []
    for i, (a, b, lead, pause, tail) in enumerate(LAYOUT):
        rng = np.random.default_rng(100 + i)
        speech = np.concatenate(
            [
                np.zeros(int(lead * RATE)),
                _speech(fixtures[a].path),
                np.zeros(int(pause * RATE)),
                _speech(fixtures[b].path),
                np.zeros(int(tail * RATE)),
            ]
        )
        samples = np.clip(0.8 * speech + rng.normal(0, ROOM_TONE, len(speech)), -1, 1)
        out.append(
            (f"{fixtures[a].text} {fixtures[b].text}", audio.encode_flac((samples * 32767).astype(np.int16)))
        )
    return out


def _edits(reference: str, hypothesis: str) -> int:
    import jiwer

    ref, hyp = normalise(reference), normalise(hypothesis)
    if not hyp:
        return len(ref.split())
    result = jiwer.process_words(ref, hyp)
    return int(result.substitutions + result.deletions + result.insertions)


def _transcribe(provider: LocalProvider, data: bytes) -> tuple[str, list[dict[str, object]]]:
    result = provider.transcribe_sync(
        TranscriptionRequest(
            audio=data,
            filename="v.flac",
            content_type="audio/flac",
            model="local",
            audio_seconds=0.0,
            language="en",
        )
    )
    return result.text, result.segments or []


@pytest.fixture(scope="module")
def provider() -> LocalProvider:
    engine = LocalProvider(Settings(local_model_cache_dir=str(CACHE_DIR), local_concurrency=1))
    engine.load()
    return engine


def test_trimmed_audio_costs_no_more_than_one_wer_point(provider: LocalProvider, tmp_path: Path) -> None:
    words = edits_full = edits_sent = 0
    submitted = sent = 0.0
    report = []
    for i, (reference, flac) in enumerate(_corpus()):
        path = tmp_path / f"vm{i}.flac"
        path.write_bytes(flac)
        prepared = audio.prepare_audio(path, max_seconds=600, max_chunk_seconds=600)
        try:
            chunks = list(prepared.iter_chunks())
            tmap = prepared.time_map
            submitted += prepared.decoded.duration
        finally:
            prepared.close()
        assert len(chunks) == 1
        sent += chunks[0].seconds
        full_text, _ = _transcribe(provider, flac)
        sent_text, segments = _transcribe(provider, chunks[0].flac)
        n = len(normalise(reference).split())
        e_full, e_sent = _edits(reference, full_text), _edits(reference, sent_text)
        words, edits_full, edits_sent = words + n, edits_full + e_full, edits_sent + e_sent
        report.append(f"vm{i}: {e_full} -> {e_sent} edits of {n}: {full_text!r} -> {sent_text!r}")
        # What users see refers to the original file: the first word starts after the lead-in, the last
        # segment ends inside the file.
        mapped = audio.map_segments(
            segments, text=sent_text, offset=0.0, duration=chunks[0].seconds, tmap=tmap
        )
        lead = LAYOUT[i][2]
        assert mapped[0]["start"] >= lead - 1.0, report[-1]
        assert mapped[-1]["end"] <= prepared.decoded.duration + 0.01
    allowed = edits_full + math.floor(words / 100)  # + 1 WER point
    print(
        f"{words} words, edits untrimmed {edits_full}, as sent {edits_sent}; "
        f"sent/submitted {sent / submitted:.3f}"
    )
    assert edits_sent <= allowed, "\n".join(report)
    assert sent / submitted <= 0.7


def test_engine_sees_the_untrimmed_start(tmp_path: Path) -> None:
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    for i, (_, flac) in enumerate(_corpus()):
        path = tmp_path / f"vm{i}.flac"
        path.write_bytes(flac)
        prepared = audio.prepare_audio(path, max_seconds=600, max_chunk_seconds=600)
        try:
            (chunk,) = list(prepared.iter_chunks())
            tmap = prepared.time_map
        finally:
            prepared.close()
        untrimmed = get_speech_timestamps(decode_audio(flac), VadOptions())[0]["start"] / RATE
        trimmed = get_speech_timestamps(decode_audio(chunk.flac), VadOptions())[0]["start"] / RATE
        # The engine's VAD keeps its whole 0.4 s pad before speech inside what is sent (not cut short at
        # the start of the file: with a 0.3 s lead-in it starts at 0.0 every time) ...
        assert trimmed >= 0.1, (i, untrimmed, trimmed)
        # ... so Whisper's audio starts where it starts in the untrimmed file (Silero's 32 ms windows
        # are aligned to the start of the audio, hence two windows of tolerance).
        assert tmap.to_original(trimmed) == pytest.approx(untrimmed, abs=0.07), (i, untrimmed, trimmed)
