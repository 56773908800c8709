"""Probe audio by its content with PyAV (no ffmpeg subprocess): what it is, how long, and that it decodes.

The extension and the declared content type are ignored: a file is audio when FFmpeg finds an audio
stream in it AND decodes real samples from it. Random bytes and PDFs are refused even when FFmpeg's
format sniffing guesses "mp3" for them, because nothing decodes cleanly.

Where it runs: FFmpeg parses what a tenant uploaded, so `probe` runs it in the media sandbox (capped
child processes, core/sandbox.py: a crafted file costs a child, not the API; over the caps it is refused
with 422 `media_limit_exceeded`) — except WAV and FLAC whose header this module has checked first
(`bounded_header`): a RIFF `fmt ` chunk or FLAC STREAMINFO with plausible values and every chunk or
metadata block before the audio inside the first 64 KB. FFmpeg's work on those is bounded (the probe
reads at most `PROBE_MAX_PACKETS` PCM or FLAC packets of bounded size), and they are the uploads whose
probing the benchmarks optimised (P1 voicemails, P4 WAVs): a sandbox round trip would cost a copy of the
file through a pipe on every upload (docs/benchmarks.md, "media sandbox").
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import av

from core.errors import EmptyAudio, MediaLimitExceeded, UnsupportedMedia
from core.sandbox import shared_sandbox
from core.settings import Settings, get_settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# How much audio we decode to prove a file is real audio (seconds), and how many packets we look at.
PROBE_DECODE_SECONDS = 2.0
PROBE_MAX_PACKETS = 400
# Random bytes sniffed as MPEG audio decode into a few frames between errors: a real file decodes
# cleanly, so more errors than this in the probed span mean "not audio".
PROBE_MAX_DECODE_ERRORS = 2
# Real audio tops out at 768 kHz (professional DXD is 352.8/384 kHz); a header claiming more is forged.
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64
# Containers whose header states every stream parameter (RIFF/WAVE `fmt `, FLAC STREAMINFO): FFmpeg's
# stream-info search need not read further to learn them. With its default probe size (5 MB) it reads
# and parses packets of a 5 MB WAV for ~3.2 ms of CPU (P4: ~13% of the API's CPU per uploaded file);
# with a small one, ~0.3 ms. The decode check below still proves real samples either way. Anything else
# (MP3, AAC, Ogg, MP4, an ID3 tag before FLAC, ...) keeps FFmpeg's default, where the search matters.
_SELF_DESCRIBING = ((0, b"RIFF", 8, b"WAVE"), (0, b"fLaC", 0, b"fLaC"))
SMALL_PROBE_OPTIONS = {"probesize": "4096"}


@dataclass(frozen=True)
class ProbeResult:
    """What probing found about one audio file."""

    format_name: str
    codec: str
    duration_seconds: float
    sample_rate: int
    channels: int


Source = IO[bytes] | io.RawIOBase | str | Path
# How much of a file's start `bounded_header` looks at; chunks and metadata past it go to the sandbox.
HEADER_BYTES = 64 * 1024
_WAV_FORMATS = frozenset({1, 3, 0xFFFE})  # PCM, IEEE float, extensible
_WAV_BITS = frozenset({8, 16, 24, 32, 64})


def probe(source: Source) -> ProbeResult:
    """Probe a file or file-like by content; raise UnsupportedMedia or EmptyAudio when it is not audio,
    MediaLimitExceeded when reading it needs more than the sandbox allows (see the module docstring)."""
    if bounded_header(_head(source)):
        return probe_here(source)
    return _probe_in_sandbox(source)


def _head(source: Source) -> bytes:
    """The first HEADER_BYTES of `source` (a file-like is rewound to where it was)."""
    try:
        if isinstance(source, str | Path):
            with open(source, "rb") as fh:
                return fh.read(HEADER_BYTES)
        if not source.seekable():
            return b""
        start = source.tell()
        head = source.read(HEADER_BYTES) or b""
        source.seek(start)
        return bytes(head)
    except OSError:
        return b""


def bounded_header(head: bytes) -> bool:
    """Whether `head` starts a WAV or FLAC file whose header is plausible and complete within it."""
    return _bounded_wav(head) or _bounded_flac(head)


def _bounded_wav(head: bytes) -> bool:
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return False
    pos, fmt_ok = 12, False
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk == b"data":
            return fmt_ok
        if chunk == b"fmt ":
            if not 16 <= size <= 40 or pos + 8 + 16 > len(head):
                return False
            tag, channels, rate, _, align, bits = struct.unpack("<HHIIHH", head[pos + 8 : pos + 24])
            fmt_ok = (
                tag in _WAV_FORMATS
                and 1 <= channels <= MAX_CHANNELS
                and 1 <= rate <= MAX_SAMPLE_RATE
                and bits in _WAV_BITS
                and align == channels * bits // 8
            )
            if not fmt_ok:
                return False
        pos += 8 + size + (size & 1)
    return False  # no `data` chunk within the first HEADER_BYTES


def _bounded_flac(head: bytes) -> bool:
    if len(head) < 42 or head[:4] != b"fLaC" or head[4] & 0x7F != 0 or head[5:8] != b"\x00\x00\x22":
        return False
    info = head[8:42]
    min_block, max_block = struct.unpack(">HH", info[:4])
    rate = (info[10] << 12) | (info[11] << 4) | (info[12] >> 4)
    bits = (((info[12] & 0x1) << 4) | (info[13] >> 4)) + 1
    if not (16 <= min_block <= max_block and 1 <= rate <= MAX_SAMPLE_RATE and 4 <= bits <= 32):
        return False
    pos = 4
    while pos + 4 <= len(head):  # every metadata block must end inside the head
        last, size = head[pos] & 0x80, int.from_bytes(head[pos + 1 : pos + 4], "big")
        pos += 4 + size
        if last:
            return pos <= len(head)
    return False


def _probe_in_sandbox(source: Source) -> ProbeResult:
    """`probe_here` in a capped child: an S3 object is read there, anything else is sent to it."""
    settings = get_settings()
    sandbox = shared_sandbox(
        "probe",
        processes=settings.media_processes,
        memory_bytes=settings.media_memory_mb * 1024 * 1024,
        warm=("api.probe",),
    )
    limits: dict[str, Any] = {
        "cpu_seconds": settings.probe_cpu_seconds,
        "timeout": 3 * settings.probe_cpu_seconds + 30,  # S3 reads wait without CPU
    }
    if isinstance(source, S3RangeReader):
        return sandbox.run(_probe_s3_child, settings, *source.location, **limits)
    if isinstance(source, str | Path):
        return sandbox.run(_probe_path_child, str(source), **limits)
    return sandbox.run(_probe_bytes_child, bytes(source.read() or b""), **limits)


def _child_call(data: Source) -> ProbeResult:
    try:
        return probe_here(data)
    except UnsupportedMedia as exc:
        if isinstance(exc.__cause__, MemoryError):  # FFmpeg's ENOMEM under the sandbox's memory cap
            raise MediaLimitExceeded("the file needs more memory to read than allowed") from None
        raise


def _probe_bytes_child(data: bytes) -> ProbeResult:
    """In the sandbox: probe a file sent as bytes."""
    return _child_call(io.BytesIO(data))


def _probe_path_child(path: str) -> ProbeResult:
    """In the sandbox: probe a local file."""
    return _child_call(Path(path))


_child_clients: dict[tuple[str | None, str, str, str], S3Client] = {}


def _child_client(settings: Settings) -> S3Client:
    """The sandbox child's S3 client for these settings (made once per child)."""
    from core.storage import make_s3_client

    key = (
        settings.s3_endpoint_url,
        settings.s3_region,
        settings.s3_access_key_id,
        settings.s3_secret_access_key.get_secret_value(),
    )
    if key not in _child_clients:
        _child_clients[key] = make_s3_client(settings)
    return _child_clients[key]


def _probe_s3_child(settings: Settings, bucket: str, key: str, size: int) -> ProbeResult:
    """In the sandbox: probe an S3 object by ranged reads (the child's own client)."""
    return _child_call(S3RangeReader(_child_client(settings), bucket, key, size))


def probe_here(source: Source) -> ProbeResult:
    """Probe in this process (trusted callers: bounded headers, or inside the sandbox)."""
    options = SMALL_PROBE_OPTIONS if _self_describing(source) else None
    try:
        container = av.open(
            str(source) if isinstance(source, Path) else source, mode="r", timeout=30.0, options=options
        )
    except av.FFmpegError as exc:
        raise UnsupportedMedia("the file is not a recognised audio format") from exc
    except (OSError, EOFError) as exc:
        raise UnsupportedMedia("the file could not be read as media") from exc
    try:
        return _probe_container(container)
    finally:
        container.close()


def _self_describing(source: IO[bytes] | io.RawIOBase | str | Path) -> bool:
    """Whether `source` starts like a WAV or a FLAC file (read 12 bytes; a file-like is rewound)."""
    try:
        if isinstance(source, str | Path):
            with open(source, "rb") as fh:
                head = fh.read(12)
        else:
            if not source.seekable():
                return False
            start = source.tell()
            head = source.read(12) or b""
            source.seek(start)
    except OSError:
        return False
    return any(head[a : a + 4] == m1 and head[b : b + 4] == m2 for a, m1, b, m2 in _SELF_DESCRIBING)


def _probe_container(container: Any) -> ProbeResult:
    if not container.streams.audio:
        raise UnsupportedMedia("the file has no audio stream")
    stream = container.streams.audio[0]
    codec_ctx = stream.codec_context
    sample_rate = int(codec_ctx.sample_rate or 0)
    channels = int(getattr(codec_ctx, "channels", 0) or 0)
    decoded_samples = 0
    errors = 0
    packets = 0
    target = PROBE_DECODE_SECONDS * sample_rate if sample_rate else 0
    try:
        for packet in container.demux(stream):
            packets += 1
            try:
                for frame in packet.decode():
                    decoded_samples += int(frame.samples)
                    sample_rate = sample_rate or int(frame.sample_rate or 0)
                    channels = channels or len(frame.layout.channels)
            except av.FFmpegError:
                errors += 1
                if errors > PROBE_MAX_DECODE_ERRORS:
                    raise UnsupportedMedia("the audio stream does not decode") from None
            if (target and decoded_samples >= target) or packets >= PROBE_MAX_PACKETS:
                break
    except av.FFmpegError as exc:
        raise UnsupportedMedia("the file is damaged or not audio") from exc
    if decoded_samples == 0:
        if errors:
            raise UnsupportedMedia("the audio stream does not decode")
        raise EmptyAudio("the file contains no audio samples")
    if sample_rate <= 0 or channels <= 0:
        raise UnsupportedMedia("the audio stream has no sample rate or channels")
    if sample_rate > MAX_SAMPLE_RATE or channels > MAX_CHANNELS:
        raise UnsupportedMedia(f"implausible audio header: {sample_rate} Hz, {channels} channels")
    duration = _duration(container, stream)
    if duration is None or duration <= 0:
        duration = decoded_samples / sample_rate
    return ProbeResult(
        format_name=str(container.format.name),
        codec=str(codec_ctx.name),
        duration_seconds=round(float(duration), 3),
        sample_rate=sample_rate,
        channels=channels,
    )


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000
    return None


class SeekableReader(io.RawIOBase):
    """A read-only view of `size` bytes with its own offset; a subclass reads from wherever they are."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        """Always readable."""
        return True

    def seekable(self) -> bool:
        """Always seekable."""
        return True

    def tell(self) -> int:
        """Current offset."""
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the read offset (no I/O until the next read)."""
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        elif whence == io.SEEK_END:
            self._pos = self._size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        self._pos = max(0, self._pos)
        return self._pos


class S3RangeReader(SeekableReader):
    """A seekable, read-only view of one S3 object fetched in ranged GETs (holds one block at a time).

    PyAV reads headers and may seek to the end (ID3v1, MP4 `moov`), so probing a 1 GiB object costs a
    few ranged requests, not a download.
    """

    def __init__(self, client: S3Client, bucket: str, key: str, size: int, block: int = 1024 * 1024) -> None:
        super().__init__(size)
        self._client = client
        self._bucket = bucket
        self._key = key
        self._block = block
        self._cache_start = -1
        self._cache = b""

    @property
    def location(self) -> tuple[str, str, int]:
        """(bucket, key, size) of the object."""
        return self._bucket, self._key, self._size

    def _fill(self, start: int) -> None:
        end = min(self._size, start + self._block) - 1
        body = self._client.get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={start}-{end}")[
            "Body"
        ]
        try:
            self._cache = body.read()
        finally:
            body.close()
        self._cache_start = start

    def read(self, size: int = -1) -> bytes:
        """Read up to `size` bytes (at most one block per call)."""
        if self._pos >= self._size:
            return b""
        if size is None or size < 0:
            size = self._block
        if not (self._cache_start <= self._pos < self._cache_start + len(self._cache)):
            self._fill(self._pos - self._pos % self._block)
        offset = self._pos - self._cache_start
        data = self._cache[offset : offset + size]
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        """Read into a buffer (for io wrappers)."""
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def probe_s3_object(client: S3Client, bucket: str, key: str, size: int) -> ProbeResult:
    """Probe an object in S3 by reading only what the demuxer needs."""
    if size <= 0:
        raise EmptyAudio("the file is empty")
    return probe(S3RangeReader(client, bucket, key, size))
