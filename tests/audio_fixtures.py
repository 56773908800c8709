"""Generated test audio: pure tones separated by silence (the fake provider "transcribes" tones)."""

from __future__ import annotations

import io
import wave

import numpy as np

RATE = 16_000


def tone(freq: float, seconds: float, *, rate: int = RATE, amplitude: float = 0.4) -> np.ndarray:
    """A sine tone as float samples in [-1, 1]."""
    t = np.arange(int(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def silence(seconds: float, *, rate: int = RATE) -> np.ndarray:
    """Digital silence."""
    return np.zeros(int(seconds * rate))


def sequence(
    parts: list[tuple[float, float]], *, gap: float = 1.0, lead: float = 0.5, rate: int = RATE
) -> np.ndarray:
    """Tones `(freq, seconds)` separated by `gap` seconds of silence, with `lead` silence around them."""
    pieces = [silence(lead, rate=rate)]
    for i, (freq, seconds) in enumerate(parts):
        if i:
            pieces.append(silence(gap, rate=rate))
        pieces.append(tone(freq, seconds, rate=rate))
    pieces.append(silence(lead, rate=rate))
    return np.concatenate(pieces)


def wav_bytes(samples: np.ndarray, *, rate: int = RATE, channels: int = 1) -> bytes:
    """16-bit PCM WAV of float samples (duplicated across `channels`)."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    if channels > 1:
        pcm = np.repeat(pcm[:, None], channels, axis=1).reshape(-1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()
