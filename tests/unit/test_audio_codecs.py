"""worker.audio's codecs: dr_flac (miniaudio's public decoder) decoding 16 kHz mono 16-bit FLAC
and libFLAC (soundfile) encoding give FFmpeg's samples, the same fingerprints and VAD levels as before,
and PyAV decodes everything the fast path does not take."""

from __future__ import annotations

import io
import math

import av
import numpy as np
import pytest
import soundfile

from core.errors import AudioTooLong
from tests.audio_fixtures import sequence, wav_bytes
from worker import audio
from worker.audio import codecs

RNG = np.random.default_rng(8)


def _pyav_flac(pcm: np.ndarray, rate: int = audio.SAMPLE_RATE, layout: str = "mono") -> bytes:
    """FLAC written by FFmpeg (what voxq wrote before, and what many uploads are)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate)
        stream.layout = layout
        channels = 2 if layout == "stereo" else 1
        data = np.ascontiguousarray(pcm.reshape(1, -1) if channels == 1 else pcm.T.reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _sndfile_flac(pcm: np.ndarray, subtype: str) -> bytes:
    """FLAC of another sample width (libsndfile scales int32 input to the subtype's width)."""
    buf = io.BytesIO()
    scaled = pcm.astype(np.int32) << (8 if subtype == "PCM_24" else 24)
    soundfile.write(buf, scaled, audio.SAMPLE_RATE, format="FLAC", subtype=subtype)
    return buf.getvalue()


def _pyav_samples(data: bytes) -> np.ndarray:
    """Every sample FFmpeg decodes from 16-bit mono FLAC."""
    parts = []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            parts.append(frame.to_ndarray().reshape(-1).astype(np.int16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def _signals() -> list[np.ndarray]:
    voice = (np.clip(sequence([(300, 1.0), (620, 0.7)], lead=0.4), -1, 1) * 32767).astype(np.int16)
    noise = RNG.integers(-32768, 32768, 16_000 * 3 + 7, dtype=np.int16)
    extremes = np.tile(np.array([-32768, 32767, 0, -1, 1], dtype=np.int16), 5000)
    return [voice, noise, extremes, np.array([1234], dtype=np.int16), voice[:4097]]


@pytest.mark.parametrize("index", range(5))
def test_the_fast_decode_gives_ffmpegs_samples_fingerprint_and_probe(tmp_path, index: int) -> None:
    pcm = _signals()[index]
    for data in (_pyav_flac(pcm), audio.encode_flac(pcm)):
        fast = codecs._decode_normalised_flac(data, max_samples=10**7)
        assert fast is not None  # 16 kHz mono 16-bit FLAC in memory: libFLAC
        path = tmp_path / "a.flac"
        path.write_bytes(data)
        slow = audio.decode_to_pcm(path, max_seconds=600)  # a path: FFmpeg through PyAV, as before
        try:
            assert np.array_equal(fast.array, pcm)
            assert np.array_equal(fast.pcm(), slow.pcm()[0 : slow.samples])
            assert fast.samples == slow.samples == len(pcm)
            assert fast.fingerprint == slow.fingerprint  # dedupe keys do not change
            assert fast.probe == slow.probe == audio.ProbeInfo(codec="flac", sample_rate=16_000, channels=1)
        finally:
            slow.close()
        via_entry = audio.decode_to_pcm(data, max_seconds=600, memory_seconds=600)
        assert via_entry.in_memory and via_entry.fingerprint == fast.fingerprint


def test_encode_flac_is_lossless_for_ffmpeg_too_and_states_its_length() -> None:
    for pcm in _signals():
        data = audio.encode_flac(pcm)
        assert audio.flac_streaminfo(data) == (16_000, 1, 16, len(pcm))
        assert np.array_equal(_pyav_samples(data), pcm)
        assert np.array_equal(audio.decode_flac(data), pcm)
        with av.open(io.BytesIO(data)) as container:  # what a provider (and bench/_fast_fake.py) reads
            stream = container.streams.audio[0]
            assert stream.codec_context.name == "flac" and stream.sample_rate == 16_000
            assert float(stream.duration * stream.time_base) == pytest.approx(len(pcm) / 16_000)
    empty = audio.encode_flac(np.zeros(0, dtype=np.int16))
    assert audio.flac_streaminfo(empty) == (16_000, 1, 16, 0)
    assert len(_pyav_samples(empty)) == 0


def test_encode_flac_stays_at_least_as_small_as_ffmpegs() -> None:
    voice = _signals()[0]
    assert len(audio.encode_flac(voice)) <= len(_pyav_flac(voice))


def test_other_flac_formats_go_through_pyav_as_before(tmp_path) -> None:
    voice = (np.clip(sequence([(300, 1.0)], lead=0.3), -1, 1) * 32767).astype(np.int16)
    stereo = np.stack([voice, voice // 2], axis=1)
    cases = {
        "44.1 kHz": _pyav_flac(voice, rate=44_100),
        "stereo": _pyav_flac(stereo, layout="stereo"),
        "24-bit": _sndfile_flac(voice.astype(np.int32) << 8, "PCM_24"),
        "8-bit": _sndfile_flac(voice // 256, "PCM_S8"),
    }
    for name, data in cases.items():
        assert codecs._decode_normalised_flac(data, max_samples=10**7) is None, name
        in_memory = audio.decode_to_pcm(data, max_seconds=600, memory_seconds=600)
        path = tmp_path / "x.flac"
        path.write_bytes(data)
        on_disk = audio.decode_to_pcm(path, max_seconds=600)
        try:
            assert in_memory.fingerprint == on_disk.fingerprint, name
            assert in_memory.probe == on_disk.probe, name
        finally:
            on_disk.close()
    # Not FLAC at all (a WAV of the same samples): PyAV, and the same fingerprint as the FLAC.
    assert codecs._decode_normalised_flac(wav_bytes(voice / 32767.0), max_samples=10**7) is None


def test_the_fast_decode_leaves_the_length_bound_unknown_lengths_and_damage_to_pyav(tmp_path) -> None:
    pcm = _signals()[0]
    data = audio.encode_flac(pcm)
    # Longer than the in-memory bound or than max_seconds: PyAV's path decides (spill, AudioTooLong).
    assert codecs._decode_normalised_flac(data, max_samples=len(pcm) - 1) is None
    with pytest.raises(AudioTooLong):
        audio.decode_to_pcm(data, max_seconds=1.0, memory_seconds=600)
    spilled = audio.decode_to_pcm(data, max_seconds=600, memory_seconds=1.0, tmp_dir=str(tmp_path))
    try:
        assert not spilled.in_memory and np.array_equal(spilled.pcm()[0 : spilled.samples], pcm)
    finally:
        spilled.close()
    # No length in STREAMINFO (total samples 0): PyAV.
    unknown = bytearray(data)
    unknown[8 + 13] &= 0xF0
    unknown[8 + 14 : 8 + 18] = b"\x00\x00\x00\x00"
    assert audio.flac_streaminfo(bytes(unknown))[3] == 0
    assert codecs._decode_normalised_flac(bytes(unknown), max_samples=10**7) is None
    assert audio.decode_to_pcm(bytes(unknown), max_seconds=600, memory_seconds=600).samples == len(pcm)
    # A cut-off file (a damaged tail): fewer samples than the header says, so PyAV keeps what decodes.
    cut = data[: len(data) * 2 // 3]
    assert codecs._decode_normalised_flac(cut, max_samples=10**7) is None
    path = tmp_path / "cut.flac"
    path.write_bytes(cut)
    kept = audio.decode_to_pcm(cut, max_seconds=600, memory_seconds=600)
    reference = audio.decode_to_pcm(path, max_seconds=600)
    try:
        assert 0 < kept.samples == reference.samples < len(pcm)
        assert kept.fingerprint == reference.fingerprint
    finally:
        reference.close()
    # More audio than the header states: PyAV (which decodes all of it, as before).
    longer = bytearray(data)
    short_total = len(pcm) - 4096
    longer[8 + 13] = (longer[8 + 13] & 0xF0) | (short_total >> 32)
    longer[8 + 14 : 8 + 18] = (short_total & 0xFFFFFFFF).to_bytes(4, "big")
    assert audio.flac_streaminfo(bytes(longer))[3] == short_total
    assert codecs._decode_normalised_flac(bytes(longer), max_samples=10**7) is None
    assert audio.decode_to_pcm(bytes(longer), max_seconds=600, memory_seconds=600).samples == len(pcm)
    # A damaged frame in the middle (its CRC no longer matches): dr_flac skips it, so PyAV decodes.
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x5A
    assert codecs._decode_normalised_flac(bytes(damaged), max_samples=10**7) is None
    path = tmp_path / "damaged.flac"
    path.write_bytes(bytes(damaged))
    from_memory = audio.decode_to_pcm(bytes(damaged), max_seconds=600, memory_seconds=600)
    from_path = audio.decode_to_pcm(path, max_seconds=600)
    try:
        assert from_memory.fingerprint == from_path.fingerprint
    finally:
        from_path.close()
    assert audio.flac_streaminfo(b"fLaC") is None and audio.flac_streaminfo(b"ID3" + data) is None


def _levels_by_mean(pcm: np.ndarray) -> np.ndarray:
    """The VAD's frame levels as first written: mean of squares per zero-padded 30 ms frame."""
    n = math.ceil(len(pcm) / audio.FRAME_SAMPLES)
    seg = np.concatenate([pcm.astype(np.float64), np.zeros(n * audio.FRAME_SAMPLES - len(pcm))])
    rms = np.sqrt(np.mean(seg.reshape(-1, audio.FRAME_SAMPLES) ** 2, axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-9) / 32768.0)


@pytest.mark.parametrize("length", [1, 479, 480, 481, 15_361, 48_000 * 20 + 17])
def test_frame_levels_equal_the_mean_of_squares_bit_for_bit(length: int) -> None:
    pcm = RNG.integers(-32768, 32768, length, dtype=np.int16)
    pcm[: min(length, 2000)] = -32768  # full-scale frames: the largest sums
    assert np.array_equal(audio.frame_levels_db(pcm), _levels_by_mean(pcm))
    assert np.array_equal(audio.frame_levels_db(pcm, block_frames=7), _levels_by_mean(pcm))


def _runs_frame_by_frame(levels: np.ndarray, *, trim: bool = True) -> list[tuple[int, int]]:
    """`audio.find_speech` as it was written before the numpy run edges: one Python step per frame."""
    n = len(levels)
    if n == 0:
        return []
    if not trim:
        return [(0, n)]
    floor = float(np.percentile(levels, 10))
    loud = float(np.percentile(levels, 95))
    voiced = levels > max(audio.ABS_FLOOR_DB, min(floor + 12.0, loud - 15.0))
    pad = round(audio.PAD_SECONDS / audio.FRAME_SECONDS)
    lead = round(audio.LEAD_PAD_SECONDS / audio.FRAME_SECONDS)
    tail = round(audio.TAIL_PAD_SECONDS / audio.FRAME_SECONDS)
    runs: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if not voiced[i]:
            i += 1
            continue
        j = i
        while j < n and voiced[j]:
            j += 1
        if j - i >= audio.MIN_SPEECH_FRAMES:
            start, end = max(i - pad, 0), min(j + pad, n)
            if runs and start <= runs[-1][1]:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((start, end))
        i = j
    if runs:
        runs[0] = (max(runs[0][0] - max(lead - pad, 0), 0), runs[0][1])
        runs[-1] = (runs[-1][0], min(runs[-1][1] + max(tail - pad, 0), n))
    return runs


def test_find_speech_keeps_the_frame_by_frame_runs() -> None:
    rng = np.random.default_rng(7)
    cases = [np.full(n, v) for n in (1, 5, 40) for v in (-90.0, -20.0)]
    for _ in range(400):
        n = int(rng.integers(1, 900))
        # quiet floor with loud bursts of random lengths, some shorter than MIN_SPEECH_FRAMES
        levels = rng.normal(-70, 3, n)
        for _ in range(int(rng.integers(0, 12))):
            a = int(rng.integers(0, n))
            levels[a : a + int(rng.integers(1, 60))] = rng.normal(-20, 4)
        cases.append(levels)
    cases.append(np.concatenate([np.full(50, -20.0), np.full(100, -80.0), np.full(50, -20.0)]))
    for levels in cases:
        assert audio.find_speech(levels) == _runs_frame_by_frame(levels)
        assert audio.find_speech(levels, trim=False) == _runs_frame_by_frame(levels, trim=False)
        floor, loud = float(np.percentile(levels, 10)), float(np.percentile(levels, 95))
        expected = max(audio.ABS_FLOOR_DB, min(floor + 12.0, loud - 15.0))
        assert audio.speech_threshold_db(levels) == expected
    assert audio.find_speech(np.zeros(0)) == []


def test_percentiles_equal_numpys_bit_for_bit() -> None:
    rng = np.random.default_rng(11)
    arrays = [np.array([-42.5]), np.array([-80.0, -20.0]), np.full(7, -55.25)]
    for n in [*range(1, 40), 99, 100, 101, 500, 501, 999, 1000, 4321, 72_000]:
        arrays.append(rng.normal(-60, 15, n))
        arrays.append(np.round(rng.normal(-60, 15, n)))  # many ties
    arrays.append(audio.frame_levels_db(RNG.integers(-3000, 3000, 48_000 * 3, dtype=np.int16)))
    for values in arrays:
        pcts = (10, 95, 0, 50, 100, 33.3, 99.9)
        before = values.copy()
        got = audio.percentiles(values, pcts)
        assert np.array_equal(values, before)  # the caller's array is left as it was
        assert got == [float(np.percentile(values, p)) for p in pcts], len(values)


def test_frame_levels_reuse_one_scratch_per_thread() -> None:
    import threading
    import tracemalloc

    pcm = RNG.integers(-32768, 32768, 16_000 * 15, dtype=np.int16)
    expected = _levels_by_mean(pcm)
    assert np.array_equal(audio.frame_levels_db(pcm), expected)  # this thread's scratch now exists
    tracemalloc.start()
    try:
        levels = audio.frame_levels_db(pcm)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(levels, expected)
    assert peak < 64 * 1024  # the output's few KB: no float64 copy of the samples per call

    results: list[bool] = []

    def levels_in_a_thread(seed: int) -> None:
        other = np.random.default_rng(seed).integers(-32768, 32768, 16_000 * 20 + 7, dtype=np.int16)
        results.extend(np.array_equal(audio.frame_levels_db(other), _levels_by_mean(other)) for _ in range(5))

    threads = [threading.Thread(target=levels_in_a_thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 20
