"""Probing by content with PyAV, on audio built in memory (no I/O)."""

from __future__ import annotations

import io
import os
from typing import Any

import av
import pytest

from core.errors import EmptyAudio, UnsupportedMedia
from core.probe import S3RangeReader, probe
from tests.api_helpers import sine_wav


def _encode(fmt: str, codec: str, wav: bytes) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container, av.open(io.BytesIO(wav)) as source:
        stream = container.add_stream(codec, rate=16000)
        for frame in source.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "codec", "expected_codec"),
    [("mp3", "mp3", "mp3"), ("flac", "flac", "flac"), ("ogg", "libopus", "opus")],
)
def test_probe_finds_codec_and_duration_whatever_the_name(fmt: str, codec: str, expected_codec: str) -> None:
    result = probe(io.BytesIO(_encode(fmt, codec, sine_wav(2.0))))
    assert result.codec.startswith(expected_codec)
    assert result.duration_seconds == pytest.approx(2.0, abs=0.05)
    assert result.sample_rate > 0 and result.channels >= 1


def test_probe_wav() -> None:
    result = probe(io.BytesIO(sine_wav(1.5, rate=8000)))
    assert (
        result.format_name,
        result.codec,
        result.duration_seconds,
        result.sample_rate,
        result.channels,
    ) == (
        "wav",
        "pcm_s16le",
        1.5,
        8000,
        1,
    )


@pytest.mark.parametrize(
    "payload",
    [
        os.urandom(200_000),
        b"%PDF-1.7\n" + os.urandom(50_000),
        b"plain text, not audio\n" * 500,
        b"ID3\x04\x00\x00\x00\x00\x00\x00" + os.urandom(100_000),  # an mp3 tag in front of noise
    ],
)
def test_probe_refuses_what_is_not_audio(payload: bytes) -> None:
    with pytest.raises(UnsupportedMedia):
        probe(io.BytesIO(payload))


def test_probe_header_only_wav_is_empty_audio() -> None:
    with pytest.raises(EmptyAudio):
        probe(io.BytesIO(sine_wav(0.0)))


class _RangedObjects:
    """Answers `get_object(Range=...)` from bytes, recording each range (stands in for S3)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ranges: list[tuple[int, int]] = []

    def get_object(self, Bucket: str, Key: str, Range: str) -> dict[str, Any]:
        start, end = (int(x) for x in Range.removeprefix("bytes=").split("-"))
        self.ranges.append((start, end))
        return {"Body": io.BytesIO(self.data[start : end + 1])}


def test_range_reader_probes_a_big_object_by_reading_only_a_little() -> None:
    wav = sine_wav(600.0)  # ~19 MB
    objects = _RangedObjects(wav)
    result = probe(S3RangeReader(objects, "bucket", "key", len(wav), block=256 * 1024))  # type: ignore[arg-type]
    assert result.duration_seconds == 600.0
    fetched = sum(end - start + 1 for start, end in objects.ranges)
    assert fetched < 2 * 1024 * 1024 < len(wav)
