"""Chunk planning: cut the trimmed audio into chunks a provider takes, and encode them one at a time.

`plan_chunks` splits the trimmed audio into chunks ≤ `max_chunk_seconds`, cutting at a collapsed pause
(an interval join) in the last half of each window when there is one, else at the quietest 0.3 s. FLAC of
speech is far under the 25 MB limit for 600 s chunks; `PreparedAudio.iter_chunks` halves a chunk that
still encodes above the limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.audio.codecs import SAMPLE_RATE, DecodedAudio, FloatArray, Int16Array, decode_to_pcm, encode_flac
from worker.audio.speech import FRAME_SAMPLES, FRAME_SECONDS, PAD_SECONDS, find_speech, frame_levels_db
from worker.audio.timemap import TimeMap, build_time_map

MAX_UPLOAD_BYTES = 24 * 1024 * 1024  # below the provider's 25 MB (26,214,400 bytes) with headroom


def plan_chunks(
    tmap: TimeMap, trimmed_levels: FloatArray, max_chunk_seconds: float
) -> list[tuple[float, float]]:
    """Chunk bounds in trimmed time, each ≤ max_chunk_seconds, cut at pauses where possible."""
    total = tmap.trimmed_seconds
    if total <= 0:
        return []
    if total <= max_chunk_seconds:
        return [(0.0, total)]
    joins = [iv[0] for iv in tmap.intervals[1:]]
    bounds: list[tuple[float, float]] = []
    start = 0.0
    smooth = max(round(0.3 / FRAME_SECONDS), 1)
    while total - start > max_chunk_seconds:
        lo, hi = start + max_chunk_seconds * 0.5, start + max_chunk_seconds
        inside = [j for j in joins if lo <= j <= hi]
        if inside:
            cut = inside[-1]
        else:
            f0, f1 = int(lo / FRAME_SECONDS), int(hi / FRAME_SECONDS)
            window = trimmed_levels[f0:f1]
            if len(window) >= smooth:
                avg = np.convolve(window, np.ones(smooth) / smooth, mode="valid")
                cut = (f0 + int(np.argmin(avg)) + smooth // 2) * FRAME_SECONDS
            else:
                cut = hi
            cut = min(max(cut, lo), hi)
        bounds.append((start, cut))
        start = cut
    bounds.append((start, total))
    return bounds


def split_quietest(pcm: Int16Array) -> tuple[Int16Array, Int16Array, float]:
    """Split samples in two at the quietest 0.3 s near the middle; returns (left, right, cut seconds)."""
    levels = frame_levels_db(pcm)
    n = len(levels)
    lo, hi = int(n * 0.3), max(int(n * 0.7), int(n * 0.3) + 1)
    cut_frame = lo + int(np.argmin(levels[lo:hi])) if n > 2 else n // 2
    cut = max(min(cut_frame * FRAME_SAMPLES, len(pcm) - 1), 1)
    return pcm[:cut], pcm[cut:], cut / SAMPLE_RATE


@dataclass(frozen=True)
class EncodedChunk:
    """One chunk ready to upload: bounds in trimmed and original time and its FLAC bytes."""

    index: int
    trimmed_start: float
    trimmed_end: float
    original_start: float
    original_end: float
    flac: bytes

    @property
    def seconds(self) -> float:
        """Length of audio in this chunk."""
        return self.trimmed_end - self.trimmed_start


@dataclass
class PreparedAudio:
    """Decoded, fingerprinted and trimmed audio, ready to be encoded chunk by chunk."""

    decoded: DecodedAudio
    time_map: TimeMap
    speech_seconds: float

    @property
    def has_speech(self) -> bool:
        """Whether the VAD found anything worth transcribing."""
        return self.speech_seconds > 0

    def trimmed_pcm(self, t0: float, t1: float) -> Int16Array:
        """Samples of trimmed time `[t0, t1)`, gathered from the original PCM."""
        pcm = self.decoded.pcm()
        parts: list[Int16Array] = []
        for trim_start, orig_start, length in self.time_map.intervals:
            a, b = max(t0, trim_start), min(t1, trim_start + length)
            if b <= a:
                continue
            s0 = round((orig_start + (a - trim_start)) * SAMPLE_RATE)
            s1 = round((orig_start + (b - trim_start)) * SAMPLE_RATE)
            parts.append(np.asarray(pcm[s0:s1], dtype=np.int16))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    def iter_chunks(self, max_bytes: int | None = None) -> Iterator[EncodedChunk]:
        """Encode each planned chunk (halving any that encodes above `max_bytes`), one at a time."""
        max_bytes = MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
        pending = list(self.time_map.chunks)
        final: list[tuple[float, float]] = []
        index = 0
        while pending:
            t0, t1 = pending.pop(0)
            data = encode_flac(self.trimmed_pcm(t0, t1))
            if len(data) > max_bytes and t1 - t0 > 2:
                mid = (t0 + t1) / 2
                pending[:0] = [(t0, mid), (mid, t1)]
                continue
            final.append((t0, t1))
            yield EncodedChunk(
                index=index,
                trimmed_start=t0,
                trimmed_end=t1,
                original_start=self.time_map.to_original(t0),
                original_end=self.time_map.to_original(t1, end=True),
                flac=data,
            )
            index += 1
        self.time_map.chunks = final

    def close(self) -> None:
        """Delete the temporary PCM."""
        self.decoded.close()


def prepare_audio(
    source: str | Path | bytes,
    *,
    max_seconds: float,
    max_chunk_seconds: float,
    trim: bool = True,
    pause_pad_seconds: float = PAD_SECONDS,
    tmp_dir: str | None = None,
    memory_seconds: float = 0.0,
) -> PreparedAudio:
    """Decode, fingerprint, trim and plan chunks for one file. Raises AudioError subclasses."""
    decoded = decode_to_pcm(source, max_seconds=max_seconds, tmp_dir=tmp_dir, memory_seconds=memory_seconds)
    try:
        pcm = decoded.pcm()
        levels = frame_levels_db(pcm)
        runs = find_speech(levels, trim=trim, pad_seconds=pause_pad_seconds)
        tmap = build_time_map(runs, decoded.samples)
        trimmed_levels = (
            np.concatenate([levels[a:b] for a, b in runs]) if runs else np.zeros(0, dtype=np.float64)
        )
        tmap.chunks = plan_chunks(tmap, trimmed_levels, max_chunk_seconds)
        return PreparedAudio(decoded=decoded, time_map=tmap, speech_seconds=tmap.trimmed_seconds)
    except BaseException:
        decoded.close()
        raise
