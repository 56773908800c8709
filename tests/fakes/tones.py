"""Test audio the fake OpenAI server can "hear": sequences of pure tones separated by silence."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def tone_samples(
    freqs: Sequence[float],
    *,
    tone_seconds: float = 0.4,
    gap_seconds: float = 0.3,
    lead_seconds: float = 0.2,
    rate: int = 16_000,
    amplitude: float = 0.5,
) -> np.ndarray:
    """Float32 mono samples: silence, then each tone followed by a gap of silence."""
    parts = [np.zeros(int(lead_seconds * rate), dtype=np.float32)]
    t = np.arange(int(tone_seconds * rate)) / rate
    for freq in freqs:
        parts.append((amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32))
        parts.append(np.zeros(int(gap_seconds * rate), dtype=np.float32))
    return np.concatenate(parts)


def encode(samples: np.ndarray, *, rate: int = 16_000, fmt: str = "flac") -> bytes:
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
