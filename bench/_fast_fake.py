"""The fake OpenAI server with a cheap ear, for throughput benchmarks: `python -m bench._fast_fake --port N`.

The test fake decodes every upload and finds its tones with an FFT (~10 ms of CPU per voicemail), which on
a 2-core host competes with the pipeline it is supposed to stand in for. Here the duration comes from the
container's header (no decoding) and the fake "hears" one word, so billing (seconds, audio tokens) stays
right and the provider costs next to nothing. Files without a duration in the header are decoded as usual.
"""

from __future__ import annotations

import io

from tests.fakes import openai_server as fake

_full_decode = fake.decode_audio


def _flac_seconds(data: bytes) -> float:
    """A FLAC file's length from its STREAMINFO block (the 42 bytes that open it); 0 when unknown."""
    if len(data) < 42 or data[:4] != b"fLaC" or data[4] & 0x7F != 0:
        return 0.0
    info = data[8:42]
    rate = (info[10] << 12) | (info[11] << 4) | (info[12] >> 4)
    total = ((info[13] & 0xF) << 32) | int.from_bytes(info[14:18], "big")
    return total / rate if rate else 0.0


def header_decode(data: bytes) -> fake.Decoded:
    """Duration from the container header; one tone heard over the whole file."""
    import av

    seconds = _flac_seconds(data)  # what voxq sends: no FFmpeg open per request (~0.2 ms of CPU)
    if seconds > 0:
        return fake.Decoded(duration=seconds, regions=[(0.0, seconds, 440)])
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.audio[0]
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                seconds = container.duration / 1_000_000
            else:
                seconds = 0.0
    except Exception:  # anything odd goes the test fake's own way
        return _full_decode(data)
    if seconds <= 0:
        return _full_decode(data)
    return fake.Decoded(duration=seconds, regions=[(0.0, seconds, 440)])


fake.decode_audio = header_decode

if __name__ == "__main__":
    fake.main()
