"""Speech with known sentence starts for alignment tests: the committed espeak-ng clips joined at run time.

The clips of tests/fixtures/speech (espeak-ng utterances, 2-3 sentences each, en-us and en-gb voices, two
noisy) are joined in order, again and again, with silences of known length between them, until the file
is as long as asked (like bench/align_corpus.py, without needing espeak-ng installed). Each clip's speech
start and end are known; the text is the clips' texts joined: what a text-only provider returns for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tests.audio_fixtures import encode
from tests.speech import load_fixtures

RATE = 16_000
GAPS = [0.9, 1.3, 0.6, 1.0, 1.6, 0.7, 1.2, 0.8, 1.1, 1.4, 0.75]  # silence before each clip, seconds
ESPEAK_LEAD = 0.012  # espeak-ng's own silence before its first sample


@dataclass(frozen=True)
class Speech:
    """Joined clips: samples, the hosted text, each clip's speech span, and the speech's total length."""

    samples: npt.NDArray[np.float32]
    texts: list[str]  # each clip's text, in order
    spans: list[tuple[float, float]]  # each clip's speech, in seconds

    @property
    def text(self) -> str:
        """The hosted text: the clips' texts joined."""
        return " ".join(self.texts)

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return len(self.samples) / RATE

    @property
    def speech_seconds(self) -> float:
        """Seconds of speech (the clips without their lead-in and tail silences)."""
        return sum(end - start for start, end in self.spans)

    def flac(self) -> bytes:
        """The audio as a FLAC file."""
        return encode(self.samples, rate=RATE, fmt="flac")


def joined_speech(min_seconds: float) -> Speech:
    """The speech fixtures joined with known silences until at least `min_seconds` long."""
    from worker.local_engine import decode_audio

    fixtures = load_fixtures()
    decoded = [decode_audio(f.path.read_bytes()) for f in fixtures]
    parts: list[npt.NDArray[np.float32]] = []
    spans: list[tuple[float, float]] = []
    texts: list[str] = []
    at = 0.0
    i = 0
    while at < min_seconds:
        fixture, samples = fixtures[i % len(fixtures)], decoded[i % len(fixtures)]
        gap = np.zeros(int(GAPS[i % len(GAPS)] * RATE), dtype=np.float32)
        parts.append(gap)
        at += len(gap) / RATE
        start = at + fixture.leading_silence_s + ESPEAK_LEAD
        at += len(samples) / RATE
        spans.append((start, at - fixture.trailing_silence_s))
        parts.append(samples)
        texts.append(fixture.text)
        i += 1
    parts.append(np.zeros(RATE // 2, dtype=np.float32))
    return Speech(np.concatenate(parts), texts, spans)
