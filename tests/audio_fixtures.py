"""Generated test audio, in one place: pure tones separated by silence (the fake provider "transcribes"
each tone as `tone<F>`), as float samples, 16-bit WAV, or encoded (flac, wav, ogg/opus, mp3)."""

from __future__ import annotations

import io
import wave
from collections.abc import Sequence

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


def tone_samples(
    freqs: Sequence[float],
    *,
    tone_seconds: float = 0.4,
    gap_seconds: float = 0.3,
    lead_seconds: float = 0.2,
    rate: int = RATE,
    amplitude: float = 0.5,
) -> np.ndarray:
    """Float32 mono samples: silence, then each tone followed by a gap of silence."""
    parts = [silence(lead_seconds, rate=rate)]
    for freq in freqs:
        parts.append(tone(freq, tone_seconds, rate=rate, amplitude=amplitude))
        parts.append(silence(gap_seconds, rate=rate))
    return np.concatenate(parts).astype(np.float32)


def wav_bytes(samples: np.ndarray, *, rate: int = RATE, channels: int = 1) -> bytes:
    """16-bit PCM WAV of float samples: mono duplicated across `channels`, or 2-D `(frames, channels)`."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    if pcm.ndim == 2:
        channels = pcm.shape[1]
    elif channels > 1:
        pcm = np.repeat(pcm[:, None], channels, axis=1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.reshape(-1).tobytes())
    return buf.getvalue()


def encode(samples: np.ndarray, *, rate: int = RATE, fmt: str = "flac") -> bytes:
    """Encode mono float samples as flac, wav, ogg (opus) or mp3 bytes with PyAV."""
    import av

    codec, container_fmt, sample_fmt, out_rate = {
        "flac": ("flac", "flac", "s16", rate),
        "wav": ("pcm_s16le", "wav", "s16", rate),
        "ogg": ("libopus", "ogg", "flt", 48_000),
        "mp3": ("libmp3lame", "mp3", "fltp", rate),
    }[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_fmt) as container:
        stream = container.add_stream(codec, rate=out_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            samples.reshape(1, -1).astype(np.float32), format="flt", layout="mono"
        )
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=sample_fmt, layout="mono", rate=out_rate)
        for out in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(out):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def tones(freqs: Sequence[float], *, fmt: str = "flac", **kwargs: float) -> bytes:
    """Encoded audio of these tones in order, e.g. tones([440, 880]) -> the fake says "tone440 tone880"."""
    return encode(tone_samples(freqs, **kwargs), fmt=fmt)
