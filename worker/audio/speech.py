"""Speech detection: an energy VAD over 30 ms frames, and the runs of audio it keeps.

A frame is speech when its level is above an adaptive threshold (`max(-50 dBFS, min(noise floor + 12 dB,
loud level - 15 dB))`). Speech runs are padded by `PAD_SECONDS` on each side and merged when they touch,
so every inner pause longer than 2 x pad collapses to 2 x pad; before the first speech `LEAD_PAD_SECONDS`
of the recording's own lead-in is kept and after the last `TAIL_PAD_SECONDS` of its tail, the rest of
both is cut. Why a lead-in: with 0.3 s the local engine (Whisper base) got the first word wrong in ~1
voicemail in 8 ("Hello Carlos" -> "The low Carlos"): its own VAD keeps 0.4 s before speech, and less
than that hurts the first word; bench/c1_silence.py measures it (docs/benchmarks.md, C1).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from worker.audio.codecs import SAMPLE_RATE, FloatArray, Samples

FRAME_SAMPLES = 480  # 30 ms at 16 kHz
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
PAD_SECONDS = 0.3  # kept around speech inside the file: a pause longer than 2 x this collapses to 2 x this
LEAD_PAD_SECONDS = 1.0  # kept before the first speech (the recording's lead-in)
TAIL_PAD_SECONDS = 0.3  # kept after the last speech (the recording's tail; more made no difference)
ABS_FLOOR_DB = -50.0
MIN_SPEECH_FRAMES = 2

_LEVEL_PIECE_FRAMES = 256  # frames squared and summed per step (a 1 MB float64 scratch per thread)
_scratch = threading.local()


def frame_levels_db(pcm: Samples, block_frames: int = 2000) -> FloatArray:
    """Level of each 30 ms frame in dBFS (the last partial frame counts as a frame, zero-padded).

    A frame's power is its sum of squares over `FRAME_SAMPLES`: every square and partial sum of s16 samples
    is an integer below 2^53, so float64 holds it exactly in any summation order and the levels equal the
    plain `mean(x ** 2)` bit for bit. The samples are converted piece by piece into one float64 scratch
    array per thread, kept for the thread's life: fresh temporaries of that size came from new mappings
    and page-faulted on every call, and small pieces cost a Python step per 32 frames.
    """
    n_frames = math.ceil(len(pcm) / FRAME_SAMPLES)
    power = np.empty(n_frames, dtype=np.float64)
    scratch: FloatArray | None = getattr(_scratch, "levels", None)
    if scratch is None:
        scratch = _scratch.levels = np.empty((_LEVEL_PIECE_FRAMES, FRAME_SAMPLES), dtype=np.float64)
    flat = scratch.reshape(-1)
    block = block_frames * FRAME_SAMPLES
    piece = _LEVEL_PIECE_FRAMES * FRAME_SAMPLES
    for start in range(0, len(pcm), block):
        seg = np.asarray(pcm[start : start + block])
        for offset in range(0, len(seg), piece):
            part = seg[offset : offset + piece]
            count = math.ceil(len(part) / FRAME_SAMPLES)
            flat[: len(part)] = part  # int16 -> float64, into the scratch
            flat[len(part) : count * FRAME_SAMPLES] = 0.0  # the last frame's zero padding
            frames = scratch[:count]
            first = (start + offset) // FRAME_SAMPLES
            np.einsum("ij,ij->i", frames, frames, out=power[first : first + count])
    rms = np.sqrt(power / FRAME_SAMPLES)
    levels: FloatArray = 20 * np.log10(np.maximum(rms, 1e-9) / 32768.0)
    return levels


def speech_threshold_db(levels: FloatArray) -> float:
    """The adaptive speech threshold for these frame levels."""
    if len(levels) == 0:
        return ABS_FLOOR_DB
    floor, loud = percentiles(levels, (10, 95))
    return max(ABS_FLOOR_DB, min(floor + 12.0, loud - 15.0))


def percentiles(values: FloatArray, pcts: tuple[float, ...]) -> list[float]:
    """`np.percentile(values, pct)` (its default 'linear' method) for each pct, bit for bit, from one
    `np.partition`: np.percentile's own Python steps cost ~25 µs per call, several times the partition of
    a voicemail's 500 frame levels. Same formulas as numpy's: index (n-1)*q, neighbours floor and floor+1
    (the last value at or past the end), then `_lerp` (from the upper neighbour when the weight is ≥ 0.5)."""
    n = len(values)
    picks: list[tuple[int, int, float]] = []
    for pct in pcts:
        virtual = (n - 1) * (pct / 100)
        if virtual >= n - 1:
            picks.append((n - 1, n - 1, 0.0))
        else:
            low = math.floor(virtual)
            picks.append((low, low + 1, virtual - low))
    part = np.partition(values, sorted({i for low, high, _ in picks for i in (low, high)}))
    out: list[float] = []
    for low, high, t in picks:
        a, b = float(part[low]), float(part[high])
        diff = b - a
        out.append(b - diff * (1 - t) if t >= 0.5 else a + diff * t)
    return out


def find_speech(
    levels: FloatArray, *, trim: bool = True, pad_seconds: float = PAD_SECONDS
) -> list[tuple[int, int]]:
    """Frame ranges `[start, end)` to keep: padded speech runs, merged where they touch.

    Each run gets `pad_seconds` (`PAD_SECONDS`) either side, so a pause inside speech longer than twice
    that collapses to twice that (a podcast keeps more: worker/profiles.py); the first run keeps at least
    `LEAD_PAD_SECONDS` before it and the last one `TAIL_PAD_SECONDS` after it (the lead-in and tail a
    recording starts and ends with).
    """
    n = len(levels)
    if n == 0:
        return []
    if not trim:
        return [(0, n)]
    voiced = levels > speech_threshold_db(levels)
    pad = round(pad_seconds / FRAME_SECONDS)
    lead = round(LEAD_PAD_SECONDS / FRAME_SECONDS)
    tail = round(TAIL_PAD_SECONDS / FRAME_SECONDS)
    # Voiced runs [i, j) from the edges of the voiced mask (numpy, not a Python step per frame).
    edges = np.diff(voiced.astype(np.int8), prepend=0, append=0)
    runs: list[tuple[int, int]] = []
    for i, j in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True):
        if j - i >= MIN_SPEECH_FRAMES:
            start, end = max(i - pad, 0), min(j + pad, n)
            if runs and start <= runs[-1][1]:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((start, end))
    if runs:
        runs[0] = (max(runs[0][0] - max(lead - pad, 0), 0), runs[0][1])
        runs[-1] = (runs[-1][0], min(runs[-1][1] + max(tail - pad, 0), n))
    return runs
