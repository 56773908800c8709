"""Probing by content with PyAV, on audio built in memory (no I/O)."""

from __future__ import annotations

import io
import os
from typing import Any

import av
import pytest

from api.probe import S3RangeReader, probe
from core.errors import EmptyAudio, UnsupportedMedia
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


def _pcm_container(fmt: str, codec: str, rate: int, layout: str, seconds: float = 3.0) -> bytes:
    """`seconds` of a tone as `codec` in `fmt`, at `rate` Hz with `layout` channels."""
    import numpy as np

    out = io.BytesIO()
    channels = 2 if layout == "stereo" else 1
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        t = np.arange(int(rate * seconds)) / rate
        samples = (np.sin(2 * np.pi * 440 * t) * 0.3 * 32767).astype(np.int16)
        block = np.tile(samples, (channels, 1)).reshape(1, -1) if channels == 2 else samples.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(block, format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def _with_list_chunk(wav: bytes, size: int) -> bytes:
    """The WAV with a `size`-byte LIST chunk between `fmt ` and `data` (tags written by editors)."""
    import struct

    pos = wav.index(b"data")
    chunk = b"LIST" + struct.pack("<I", size) + b"INFO" + b"\0" * (size - 4)
    body = wav[12:pos] + chunk + wav[pos:]
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def _default_probe(data: bytes) -> Any:
    """What the probe finds with FFmpeg's default probe size."""
    from api.probe import _probe_container

    with av.open(io.BytesIO(data), mode="r") as container:
        return _probe_container(container)


SELF_DESCRIBING_CASES = {
    "wav s16 16k mono": lambda: _pcm_container("wav", "pcm_s16le", 16000, "mono"),
    "wav s16 44.1k stereo": lambda: _pcm_container("wav", "pcm_s16le", 44100, "stereo"),
    "wav s24 48k stereo": lambda: _pcm_container("wav", "pcm_s24le", 48000, "stereo"),
    "wav f32 22.05k": lambda: _pcm_container("wav", "pcm_f32le", 22050, "mono"),
    "wav mu-law 8k": lambda: _pcm_container("wav", "pcm_mulaw", 8000, "mono"),
    "wav a-law 8k": lambda: _pcm_container("wav", "pcm_alaw", 8000, "mono"),
    "wav u8 11k": lambda: _pcm_container("wav", "pcm_u8", 11025, "mono"),
    "wav with 64 KB LIST": lambda: _with_list_chunk(_pcm_container("wav", "pcm_s16le", 16000, "mono"), 65536),
    "flac 16k mono": lambda: _pcm_container("flac", "flac", 16000, "mono"),
    "flac 44.1k stereo": lambda: _pcm_container("flac", "flac", 44100, "stereo"),
    "flac 96k stereo": lambda: _pcm_container("flac", "flac", 96000, "stereo"),
}


@pytest.mark.parametrize("case", sorted(SELF_DESCRIBING_CASES))
def test_small_probe_of_a_self_describing_header_finds_what_the_default_finds(case: str) -> None:
    # WAV and FLAC are probed with a small FFmpeg probe size (P4: ~3 ms of CPU less per 5 MB upload);
    # the answer must be the one the default probe size gives.
    from api.probe import _self_describing

    data = SELF_DESCRIBING_CASES[case]()
    reader = io.BytesIO(data)
    assert _self_describing(reader) and reader.tell() == 0
    assert probe(io.BytesIO(data)) == _default_probe(data)


def test_other_containers_keep_the_default_probe_size() -> None:
    from api.probe import _self_describing

    wav = sine_wav(1.0)
    flac = _encode("flac", "flac", wav)
    assert _self_describing(io.BytesIO(wav)) and _self_describing(io.BytesIO(flac))
    for data in (_encode("mp3", "mp3", wav), b"ID3\x04\0\0\0\0\0\0" + flac, b"RIFF\0\0\0\0AVI LIST", b"fLa"):
        assert not _self_describing(io.BytesIO(data))


def test_probe_asks_ffmpeg_for_a_small_probe_only_for_self_describing_headers(monkeypatch: Any) -> None:
    import api.probe

    wav = sine_wav(1.0)
    mp3 = _encode("mp3", "mp3", wav)
    seen: list[Any] = []
    real_open = av.open

    def recording_open(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("options"))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(api.probe.av, "open", recording_open)
    api.probe.probe_here(io.BytesIO(wav))  # (an MP3 is probed in the media sandbox: in-process here)
    api.probe.probe_here(io.BytesIO(mp3))
    assert seen == [api.probe.SMALL_PROBE_OPTIONS, None]
