"""Audio codecs: decode any upload to 16 kHz mono s16 (bounded, fingerprinted), and FLAC in and out.

`decode_to_pcm` decodes the first audio stream to 16 kHz mono s16 and streams the samples into a
temporary file (so a 6-hour podcast never sits in memory whole), hashing them as they go: the fingerprint
is the SHA-256 of the normalised PCM, so the same audio in another container or bitrate of the same
source decodes to the same hash only when the samples are identical (exact dedupe, no false positives).
Decoding stops with `AudioTooLong` as soon as `max_seconds` is passed, so a hostile file cannot make the
worker decode for hours.

FLAC that is already 16 kHz mono 16-bit and held in memory (a voicemail, and everything voxq writes) is
decoded by dr_flac (`miniaudio`'s public decoder) and every FLAC voxq writes is encoded by libFLAC through
libsndfile (`soundfile`, about half the CPU of FFmpeg's encoder): the same samples either way (lossless).
Everything else (other formats, rates, channel counts, long or damaged files) is decoded by FFmpeg through
PyAV. `encode_flac` writes 16 kHz mono FLAC (≈ 0.3-0.5 MB per minute of speech).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av
import av.error
import miniaudio
import numpy as np
import numpy.typing as npt
import soundfile

from core.errors import AudioTooLong, EmptyAudio, MediaLimitExceeded, UnsupportedMedia
from core.sandbox import shared_sandbox
from core.settings import get_settings

SAMPLE_RATE = 16_000
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
    dr_flac (`miniaudio`'s decoder, asked for that same format, so nothing is converted) into memory in
    one call: several times cheaper in CPU than FFmpeg through PyAV (whose cost is mostly a Python object
    per FLAC frame), for the same samples (FLAC is lossless: every conforming decoder returns the same
    ones).

    None — decode with PyAV as for anything else — unless the header states exactly that format and a
    length of at most `max_samples`, and dr_flac decodes exactly that many samples (asked for one more: a
    stream longer than its header is PyAV's; a damaged frame is skipped by dr_flac and a cut-off file ends
    early: both go to PyAV, which keeps what decodes). So the length bound, damaged files and every other
    format keep PyAV's handling."""
    info = flac_streaminfo(data)
    if info is None:
        return None
    rate, channels, bits, total = info
    if (rate, channels, bits) != (SAMPLE_RATE, 1, 16) or not 0 < total <= max_samples:
        return None
    try:
        stream = miniaudio.stream_memory(
            data,
            miniaudio.SampleFormat.SIGNED16,
            nchannels=1,
            sample_rate=SAMPLE_RATE,
            frames_to_read=total + 1,
        )
    except miniaudio.DecodeError:
        return None
    try:
        pcm = next(stream, None)
    except miniaudio.DecodeError:
        return None
    finally:
        stream.close()
    if pcm is None or len(pcm) != total:
        return None
    array: Int16Array = np.frombuffer(pcm, dtype=np.int16)
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

    FFmpeg runs in the media sandbox (core/sandbox.py: memory and CPU-time caps, `VOXQ_MEDIA_MEMORY_MB`,
    `VOXQ_DECODE_CPU_SECONDS`; past them MediaLimitExceeded, and the job fails `media_limit_exceeded`).
    Only 16 kHz mono FLAC in memory is decoded here, by dr_flac: its header bounds the samples, hence the
    memory, before anything is decoded (`_decode_normalised_flac`), and it is the voicemail path P1 times.
    """
    max_samples = int(max_seconds * SAMPLE_RATE)
    if isinstance(source, bytes):
        fast = _decode_normalised_flac(source, min(int(memory_seconds * SAMPLE_RATE), max_samples))
        if fast is not None:
            return fast
    return _decode_in_sandbox(source, max_seconds=max_seconds, tmp_dir=tmp_dir, memory_seconds=memory_seconds)


def _decode_in_sandbox(
    source: str | Path | bytes, *, max_seconds: float, tmp_dir: str | None, memory_seconds: float
) -> DecodedAudio:
    """`decode_here` in a capped child, which spills long audio into a directory of its own: kept (its
    file moved out to `tmp_dir`) when the decode succeeds, removed whole when the child fails or dies."""
    settings = get_settings()
    sandbox = shared_sandbox(
        "decode",
        processes=settings.media_processes,
        memory_bytes=settings.media_memory_mb * 1024 * 1024,
        warm=("worker.audio.codecs",),
    )
    private = tempfile.mkdtemp(prefix="voxq-decode-", dir=tmp_dir)
    try:
        decoded = sandbox.run(
            _decode_child,
            source if isinstance(source, bytes) else str(source),
            max_seconds=max_seconds,
            tmp_dir=private,
            memory_seconds=memory_seconds,
            cpu_seconds=settings.decode_cpu_seconds,
            timeout=3 * settings.decode_cpu_seconds + 60,
        )
        if decoded.path is not None:
            kept = Path(tmp_dir or tempfile.gettempdir()) / decoded.path.name
            os.replace(decoded.path, kept)
            decoded.path = kept
        return decoded
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _decode_child(
    source: str | bytes, *, max_seconds: float, tmp_dir: str, memory_seconds: float
) -> DecodedAudio:
    """In the sandbox: `decode_here`, FFmpeg's out-of-memory reported as the limit it is."""
    try:
        return decode_here(source, max_seconds=max_seconds, tmp_dir=tmp_dir, memory_seconds=memory_seconds)
    except UnsupportedMedia as exc:
        if isinstance(exc.__cause__, MemoryError):
            raise MediaLimitExceeded("the file needs more memory to decode than allowed") from None
        raise


def decode_here(
    source: str | Path | bytes,
    *,
    max_seconds: float,
    tmp_dir: str | None = None,
    memory_seconds: float = 0.0,
) -> DecodedAudio:
    """`decode_to_pcm` in this process, FFmpeg included (the sandbox's child runs this)."""
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
