"""Audio normalisation: decode, bound, fingerprint, trim silence, chunk at silences, encode FLAC.

Everything here is CPU work on a local file; no network, no database.

Pipeline (PyAV, no ffmpeg subprocess):
1. `decode_to_pcm` decodes the first audio stream to 16 kHz mono s16 and streams the samples into a
   temporary file (so a 6-hour podcast never sits in memory whole), hashing them as they go: the
   fingerprint is the SHA-256 of the normalised PCM, so the same audio in another container or bitrate of
   the same source decodes to the same hash only when the samples are identical (exact dedupe, no false
   positives). Decoding stops with `AudioTooLong` as soon as `max_seconds` is passed, so a hostile file
   cannot make the worker decode for hours.
2. `find_speech` is an energy VAD over 30 ms frames: a frame is speech when its level is above an adaptive
   threshold (`max(-50 dBFS, min(noise floor + 12 dB, loud level - 15 dB))`). Speech runs are padded by
   `PAD_SECONDS` on each side and merged when they touch, so every inner pause longer than 2 x pad
   collapses to 2 x pad; before the first speech `LEAD_PAD_SECONDS` of the recording's own lead-in is
   kept and after the last `TAIL_PAD_SECONDS` of its tail, the rest of both is cut. Why a lead-in: with
   0.3 s the local engine (Whisper base) got the first word wrong in ~1 voicemail in 8 ("Hello Carlos" ->
   "The low Carlos"): its own VAD keeps 0.4 s before speech, and less than that hurts the first word;
   bench/c1_silence.py measures it (docs/benchmarks.md, C1). What is kept is a list of original-time
   intervals; `TimeMap` maps a time in the trimmed audio back to the original file.
3. `plan_chunks` splits the trimmed audio into chunks ≤ `max_chunk_seconds`, cutting at a collapsed pause
   (an interval join) in the last half of each window when there is one, else at the quietest 0.3 s.
4. `encode_flac` writes 16 kHz mono FLAC (≈ 0.3-0.5 MB per minute of speech), far under the 25 MB limit
   for 600 s chunks; `PreparedAudio.iter_chunks` halves a chunk that still encodes above the limit.

Codecs: FLAC that is already 16 kHz mono 16-bit and held in memory (a voicemail, and everything voxq writes)
is decoded by dr_flac (`miniaudio`, ~0.4 ms for 15 s instead of ~2.7 ms through PyAV) and every FLAC voxq
writes is encoded by libFLAC through libsndfile (`soundfile`, about half the CPU of FFmpeg's encoder): the
same samples either way (lossless). Everything else (other formats, rates, channel counts, long or damaged
files) is decoded by FFmpeg through PyAV.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import av.error
import numpy as np
import numpy.typing as npt
import soundfile
from _miniaudio import ffi as _ffi  # miniaudio's cffi module: dr_flac
from _miniaudio import lib as _drflac

from core.errors import AudioTooLong, EmptyAudio, UnsupportedMedia

SAMPLE_RATE = 16_000
FRAME_SAMPLES = 480  # 30 ms at 16 kHz
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
PAD_SECONDS = 0.3  # kept around speech inside the file: a pause longer than 2 x this collapses to 2 x this
LEAD_PAD_SECONDS = 1.0  # kept before the first speech (the recording's lead-in)
TAIL_PAD_SECONDS = 0.3  # kept after the last speech (the recording's tail; more made no difference)
ABS_FLOOR_DB = -50.0
MIN_SPEECH_FRAMES = 2
MAX_UPLOAD_BYTES = 24 * 1024 * 1024  # below the provider's 25 MB (26,214,400 bytes) with headroom
FLAC_FILENAME = "audio.flac"
FLAC_CONTENT_TYPE = "audio/flac"

Int16Array = npt.NDArray[np.int16]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ProbeInfo:
    """What the container says about the source audio."""

    codec: str | None
    sample_rate: int | None
    channels: int | None


@dataclass
class TimeMap:
    """Maps seconds in the trimmed audio to seconds in the original file.

    `intervals` holds `(trimmed_start, original_start, length)` triples in order; `chunks` holds the
    `(trimmed_start, trimmed_end)` bounds of each chunk.
    """

    intervals: list[tuple[float, float, float]]
    chunks: list[tuple[float, float]] = field(default_factory=list)

    @property
    def trimmed_seconds(self) -> float:
        """Length of the trimmed audio."""
        if not self.intervals:
            return 0.0
        start, _, length = self.intervals[-1]
        return start + length

    def to_original(self, t: float, *, end: bool = False) -> float:
        """The original-file time of trimmed time `t` (clamped into the kept audio).

        At a join between two kept intervals, `end=True` picks the end of the earlier one (for the end of
        a span), else the start of the later one.
        """
        if not self.intervals:
            return 0.0
        starts = [iv[0] for iv in self.intervals]
        i = max((bisect.bisect_left if end else bisect.bisect_right)(starts, t) - 1, 0)
        trim_start, orig_start, length = self.intervals[i]
        return round(orig_start + min(max(t - trim_start, 0.0), length), 3)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form for `jobs.time_map`."""
        return {
            "intervals": [[round(a, 4), round(b, 4), round(c, 4)] for a, b, c in self.intervals],
            "chunks": [[round(a, 4), round(b, 4)] for a, b in self.chunks],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> TimeMap:
        """Read back what `to_json` wrote."""
        if not data:
            return cls(intervals=[])
        return cls(
            intervals=[(float(a), float(b), float(c)) for a, b, c in data.get("intervals", [])],
            chunks=[(float(a), float(b)) for a, b in data.get("chunks", [])],
        )


class PcmFile:
    """s16 samples in a file, sliceable like an array; each slice is one read.

    Reads instead of a memory map so that scanning a 6-hour file does not leave hundreds of MB of mapped
    pages counted in the worker's RSS.
    """

    def __init__(self, path: Path, samples: int) -> None:
        self.path = path
        self.samples = samples

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: slice) -> Int16Array:
        start, stop, step = index.indices(self.samples)
        if step != 1:
            raise ValueError("PcmFile supports contiguous slices only")
        count = max(stop - start, 0)
        if count == 0:
            return np.zeros(0, dtype=np.int16)
        with open(self.path, "rb") as fh:
            fh.seek(start * 2)
            return np.frombuffer(fh.read(count * 2), dtype="<i2").astype(np.int16)


Samples = Int16Array | PcmFile


@dataclass
class DecodedAudio:
    """Normalised PCM, in memory (a short file) or in a temporary file, plus what decoding learned.

    Close it to delete the file.
    """

    path: Path | None
    samples: int
    fingerprint: str
    probe: ProbeInfo
    array: Int16Array | None = None

    @property
    def duration(self) -> float:
        """Decoded duration in seconds."""
        return self.samples / SAMPLE_RATE

    @property
    def in_memory(self) -> bool:
        """Whether the samples are held in memory (no temporary file)."""
        return self.array is not None

    def pcm(self) -> Samples:
        """The samples: the array, or read from the file slice by slice (never mapped)."""
        if self.array is not None:
            return self.array
        assert self.path is not None
        return PcmFile(self.path, self.samples)

    def close(self) -> None:
        """Delete the temporary PCM file (or drop the array)."""
        self.array = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _demuxed_seconds(source: str | bytes, stop_after: float) -> float | None:
    """The first audio stream's length from its packets' durations (no decoding); None when unknown.

    Stops counting once past `stop_after`: that is all the caller needs to know.
    """
    try:
        with av.open(_av_input(source), mode="r") as container:
            stream = container.streams.audio[0]
            if stream.time_base is None:
                return None
            total = 0
            limit = stop_after / float(stream.time_base)
            for packet in container.demux(stream):
                if packet.duration is None:
                    if packet.size:
                        return None  # a packet of unknown length: only decoding can tell
                    continue
                total += packet.duration
                if total > limit:
                    break
            return float(total * stream.time_base)
    except (av.error.FFmpegError, IndexError, ValueError):
        return None


def _av_input(source: str | bytes) -> str | io.BytesIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source


class _PcmSink:
    """Collects decoded s16 samples in memory up to `memory_samples`, then spills them to a temp file."""

    def __init__(
        self, memory_samples: int, max_samples: int, max_seconds: float, tmp_dir: str | None
    ) -> None:
        self.memory_samples = memory_samples
        self.max_samples = max_samples
        self.max_seconds = max_seconds
        self.tmp_dir = tmp_dir
        self.parts: list[Int16Array] = []
        self.total = 0
        self.path: Path | None = None
        self.out: io.BufferedWriter | None = None
        self.sha = hashlib.sha256()

    def add(self, samples: Int16Array) -> None:
        self.total += len(samples)
        if self.total > self.max_samples:
            raise AudioTooLong(f"audio is longer than the limit of {self.max_seconds:.0f} s")
        if self.out is None and self.total > self.memory_samples:
            fd, name = tempfile.mkstemp(prefix="voxq-pcm-", suffix=".s16", dir=self.tmp_dir)
            self.path = Path(name)
            self.out = os.fdopen(fd, "wb")
            for part in self.parts:
                self._write(part)
            self.parts = []
        if self.out is None:
            self.parts.append(samples)
        else:
            self._write(samples)

    def _write(self, samples: Int16Array) -> None:
        assert self.out is not None
        data = samples.tobytes()
        self.sha.update(data)
        self.out.write(data)

    def finish(self, probe: ProbeInfo) -> DecodedAudio:
        if self.out is not None:
            self.out.close()
            self.out = None
            digest = self.sha.hexdigest()
            return DecodedAudio(path=self.path, samples=self.total, fingerprint=digest, probe=probe)
        array = (
            (self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts))
            if self.parts
            else np.zeros(0, dtype=np.int16)
        )
        self.parts = []
        # The same digest as the file path's: SHA-256 of the native-order s16 bytes, in order.
        fingerprint = hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()
        return DecodedAudio(path=None, samples=self.total, fingerprint=fingerprint, probe=probe, array=array)

    def discard(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self.parts = []


def _is_normalised(frame: av.AudioFrame) -> bool:
    return frame.sample_rate == SAMPLE_RATE and frame.format.name == "s16" and frame.layout.name == "mono"


def flac_streaminfo(data: bytes) -> tuple[int, int, int, int] | None:
    """(sample rate, channels, bits per sample, total samples) from the STREAMINFO block that must open a
    FLAC file (`fLaC` + the block); None when `data` does not start that way. Total 0 means unknown."""
    if len(data) < 42 or data[:4] != b"fLaC" or data[4] & 0x7F != 0 or data[5:8] != b"\x00\x00\x22":
        return None
    info = data[8:42]
    rate = (info[10] << 12) | (info[11] << 4) | (info[12] >> 4)
    channels = ((info[12] >> 1) & 0x7) + 1
    bits = (((info[12] & 0x1) << 4) | (info[13] >> 4)) + 1
    total = ((info[13] & 0xF) << 32) | int.from_bytes(info[14:18], "big")
    return rate, channels, bits, total


def _decode_normalised_flac(data: bytes, max_samples: int) -> DecodedAudio | None:
    """Decode FLAC that is already 16 kHz mono 16-bit (what voxq writes, and most voicemail exports) with
    dr_flac (`miniaudio`) into memory in one C call: ~6x cheaper in CPU than FFmpeg through PyAV (whose
    cost is mostly a Python object per FLAC frame) and ~3x cheaper than libsndfile, for the same samples
    (FLAC is lossless: every conforming decoder returns the same ones).

    None — decode with PyAV as for anything else — unless the header states exactly that format and a
    length of at most `max_samples`, and dr_flac decodes exactly that many samples (a damaged frame is
    skipped by dr_flac and a cut-off file ends early: both go to PyAV, which keeps what decodes). So the
    length bound, damaged files and every other format keep PyAV's handling."""
    info = flac_streaminfo(data)
    if info is None:
        return None
    rate, channels, bits, total = info
    if (rate, channels, bits) != (SAMPLE_RATE, 1, 16) or not 0 < total <= max_samples:
        return None
    array: Int16Array = np.empty(total + 1, dtype=np.int16)  # one more: a stream longer than its header
    flac = _drflac.ma_dr_flac_open_memory(data, len(data), _ffi.NULL)
    if flac == _ffi.NULL:
        return None
    try:
        if (flac.sampleRate, flac.channels, flac.bitsPerSample) != (SAMPLE_RATE, 1, 16):
            return None
        read = _drflac.ma_dr_flac_read_pcm_frames_s16(flac, total + 1, _ffi.from_buffer("short[]", array))
    finally:
        _drflac.ma_dr_flac_close(flac)
    if read != total:
        return None
    array = array[:total]
    fingerprint = hashlib.sha256(array.data).hexdigest()  # as `_PcmSink.finish`: the s16 bytes in order
    probe = ProbeInfo(codec="flac", sample_rate=SAMPLE_RATE, channels=1)
    return DecodedAudio(path=None, samples=total, fingerprint=fingerprint, probe=probe, array=array)


def decode_to_pcm(
    source: str | Path | bytes,
    *,
    max_seconds: float,
    tmp_dir: str | None = None,
    memory_seconds: float = 0.0,
) -> DecodedAudio:
    """Decode the first audio stream of `source` (a path, or the file's bytes) to 16 kHz mono s16.

    Up to `memory_seconds` of samples stay in memory; longer audio is streamed to a temp file (so a
    6-hour podcast never sits in memory whole). Bounded in length by `max_seconds`.
    """
    max_samples = int(max_seconds * SAMPLE_RATE)
    if isinstance(source, bytes):
        fast = _decode_normalised_flac(source, min(int(memory_seconds * SAMPLE_RATE), max_samples))
        if fast is not None:
            return fast
    sink = _PcmSink(int(memory_seconds * SAMPLE_RATE), max_samples, max_seconds, tmp_dir)
    src: str | bytes = source if isinstance(source, bytes) else str(source)
    try:
        if (len(src) if isinstance(src, bytes) else os.path.getsize(src)) == 0:
            raise EmptyAudio("the file is empty (0 bytes)")
        try:
            container = av.open(_av_input(src), mode="r")
        except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
            raise UnsupportedMedia(f"not a readable audio file: {type(exc).__name__}") from exc
        try:
            if not container.streams.audio:
                raise UnsupportedMedia("the file has no audio stream")
            stream = container.streams.audio[0]
            ctx = stream.codec_context
            probe = ProbeInfo(codec=ctx.name, sample_rate=ctx.sample_rate or None, channels=ctx.channels)
            declared = container.duration / 1_000_000 if container.duration else None
            if declared is None:
                # No length in the header (e.g. a few KB of FLAC that decode to hours of silence):
                # add up the packets' durations first, which reads the file but decodes nothing.
                declared = _demuxed_seconds(src, max_seconds * 1.05 + 1)
            if declared is not None and declared > max_seconds * 1.05 + 1:
                raise AudioTooLong(f"audio is {declared:.0f} s long; the limit is {max_seconds:.0f} s")
            resampler: av.AudioResampler | None = None
            try:
                for frame in container.decode(stream):
                    if resampler is None and _is_normalised(frame):
                        # Already 16 kHz mono s16 (what voxq itself writes): the samples as they are, read
                        # from the frame's buffer (to_ndarray's vstack was ~20% of decoding a voicemail).
                        sink.add(
                            np.frombuffer(memoryview(frame.planes[0]), dtype=np.int16, count=frame.samples)
                        )
                        continue
                    if resampler is None:
                        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
                    for out in resampler.resample(frame):
                        sink.add(out.to_ndarray().reshape(-1).astype(np.int16, copy=False))
                if resampler is not None:
                    for out in resampler.resample(None):
                        sink.add(out.to_ndarray().reshape(-1).astype(np.int16, copy=False))
            except av.error.FFmpegError as exc:
                if sink.total == 0:
                    raise UnsupportedMedia(f"the audio stream cannot be decoded: {exc}") from exc
                # A damaged tail: keep what decoded cleanly (players do the same).
        finally:
            container.close()
        if sink.total == 0:
            raise EmptyAudio("the file decodes to no audio samples")
        return sink.finish(probe)
    except BaseException:
        sink.discard()
        raise


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


def find_speech(levels: FloatArray, *, trim: bool = True) -> list[tuple[int, int]]:
    """Frame ranges `[start, end)` to keep: padded speech runs, merged where they touch.

    Each run gets `PAD_SECONDS` either side; the first run keeps `LEAD_PAD_SECONDS` before it instead and
    the last one `TAIL_PAD_SECONDS` after it (the lead-in and tail a recording starts and ends with).
    """
    n = len(levels)
    if n == 0:
        return []
    if not trim:
        return [(0, n)]
    voiced = levels > speech_threshold_db(levels)
    pad = round(PAD_SECONDS / FRAME_SECONDS)
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


def build_time_map(runs: list[tuple[int, int]], total_samples: int) -> TimeMap:
    """The trimmed→original map for these kept frame ranges."""
    intervals: list[tuple[float, float, float]] = []
    t = 0.0
    for start, end in runs:
        s0 = start * FRAME_SAMPLES
        s1 = min(end * FRAME_SAMPLES, total_samples)
        length = (s1 - s0) / SAMPLE_RATE
        intervals.append((t, s0 / SAMPLE_RATE, length))
        t += length
    return TimeMap(intervals=intervals)


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


def encode_flac(pcm: Int16Array) -> bytes:
    """16 kHz mono 16-bit FLAC of these samples (libFLAC through libsndfile, its default level 5: ~2x
    cheaper in CPU than FFmpeg's encoder at its default level and ~12% smaller; lossless either way)."""
    if len(pcm) == 0:
        return _encode_empty_flac()  # libsndfile writes nothing at all for no samples
    buf = io.BytesIO()
    with soundfile.SoundFile(
        buf, mode="w", samplerate=SAMPLE_RATE, channels=1, format="FLAC", subtype="PCM_16"
    ) as out:
        out.write(np.ascontiguousarray(pcm, dtype=np.int16))
    return buf.getvalue()


def _encode_empty_flac() -> bytes:
    """A valid 16 kHz mono FLAC stream with no samples (FFmpeg's encoder, as before)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac") as out:
        stream = out.add_stream("flac", rate=SAMPLE_RATE)
        stream.layout = "mono"
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def decode_flac(data: bytes) -> Int16Array:
    """The samples of FLAC written by `encode_flac` (used only to re-chunk after a 413)."""
    parts: list[Int16Array] = []
    with av.open(io.BytesIO(data), mode="r") as container:
        for frame in container.decode(audio=0):
            parts.append(frame.to_ndarray().reshape(-1).astype(np.int16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


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
    tmp_dir: str | None = None,
    memory_seconds: float = 0.0,
) -> PreparedAudio:
    """Decode, fingerprint, trim and plan chunks for one file. Raises AudioError subclasses."""
    decoded = decode_to_pcm(source, max_seconds=max_seconds, tmp_dir=tmp_dir, memory_seconds=memory_seconds)
    try:
        pcm = decoded.pcm()
        levels = frame_levels_db(pcm)
        runs = find_speech(levels, trim=trim)
        tmap = build_time_map(runs, decoded.samples)
        trimmed_levels = (
            np.concatenate([levels[a:b] for a, b in runs]) if runs else np.zeros(0, dtype=np.float64)
        )
        tmap.chunks = plan_chunks(tmap, trimmed_levels, max_chunk_seconds)
        return PreparedAudio(decoded=decoded, time_map=tmap, speech_seconds=tmap.trimmed_seconds)
    except BaseException:
        decoded.close()
        raise


def map_segments(
    segments: list[dict[str, Any]] | None,
    *,
    text: str,
    offset: float,
    duration: float,
    tmap: TimeMap,
) -> list[dict[str, Any]]:
    """Segments (times relative to a piece starting at trimmed `offset`) in original-file time.

    A provider that returns no segments (gpt-4o-*) gets one segment spanning the piece.
    """
    if not segments:
        if not text.strip():
            return []
        return [
            {
                "start": tmap.to_original(offset),
                "end": tmap.to_original(offset + duration, end=True),
                "text": text.strip(),
            }
        ]
    out: list[dict[str, Any]] = []
    for seg in segments:
        mapped: dict[str, Any] = {
            "start": tmap.to_original(offset + float(seg.get("start", 0.0))),
            "end": tmap.to_original(offset + float(seg.get("end", 0.0)), end=True),
            "text": str(seg.get("text", "")).strip(),
        }
        words = seg.get("words")
        if words:
            mapped["words"] = [
                {
                    "start": tmap.to_original(offset + float(w.get("start", 0.0))),
                    "end": tmap.to_original(offset + float(w.get("end", 0.0)), end=True),
                    "word": str(w.get("word", "")),
                }
                for w in words
            ]
        out.append(mapped)
    return out
