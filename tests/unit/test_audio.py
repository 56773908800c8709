"""worker.audio: decoding bounds, VAD trimming, the trimmed→original time map, chunking, FLAC."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import av
import numpy as np
import pytest

from core.errors import AudioTooLong, EmptyAudio, UnsupportedMedia
from tests.audio_fixtures import sequence, silence, tone, wav_bytes
from worker import audio
from worker.audio import speech


def write(tmp_path: Path, data: bytes, name: str = "a.wav") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_decodes_any_rate_and_channels_to_16k_mono_with_probe(tmp_path: Path) -> None:
    data = wav_bytes(sequence([(440, 1.0)], lead=0.5, rate=44_100), rate=44_100, channels=2)
    decoded = audio.decode_to_pcm(write(tmp_path, data), max_seconds=60)
    try:
        assert decoded.duration == pytest.approx(2.0, abs=0.01)
        assert decoded.probe.sample_rate == 44_100 and decoded.probe.channels == 2
        assert decoded.probe.codec == "pcm_s16le"
        assert len(decoded.pcm()) == decoded.samples
    finally:
        decoded.close()
    assert not decoded.path.exists()


def test_fingerprint_is_of_the_samples_not_the_container(tmp_path: Path) -> None:
    samples = sequence([(300, 0.5), (600, 0.5)])
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    wav = audio.decode_to_pcm(write(tmp_path, wav_bytes(samples)), max_seconds=60)
    flac = audio.decode_to_pcm(write(tmp_path, audio.encode_flac(pcm), "a.flac"), max_seconds=60)
    other = audio.decode_to_pcm(write(tmp_path, wav_bytes(samples * 0.5), "b.wav"), max_seconds=60)
    assert wav.fingerprint == flac.fingerprint
    assert other.fingerprint != wav.fingerprint
    for d in (wav, flac, other):
        d.close()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", EmptyAudio),
        (b"\x00" * 4000, UnsupportedMedia),
        (b"RIFF$\x00\x00\x00WAVEfmt garbage that is not a real header" * 10, UnsupportedMedia),
    ],
)
def test_bad_input_raises_a_coded_audio_error(tmp_path: Path, data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        audio.decode_to_pcm(write(tmp_path, data), max_seconds=60)
    assert not list(tmp_path.glob("voxq-pcm-*"))


def test_zero_samples_is_empty_audio(tmp_path: Path) -> None:
    with pytest.raises(EmptyAudio):
        audio.decode_to_pcm(write(tmp_path, wav_bytes(np.zeros(0))), max_seconds=60)


def test_duration_bound_stops_decoding(tmp_path: Path) -> None:
    with pytest.raises(AudioTooLong) as info:
        audio.decode_to_pcm(write(tmp_path, wav_bytes(tone(200, 12.0))), max_seconds=5)
    assert info.value.code == "audio_too_long"


def test_file_without_audio_stream_is_unsupported(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=1)
        stream.width, stream.height = 16, 16  # type: ignore[union-attr]
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), dtype=np.uint8), format="rgb24")
        for packet in stream.encode(frame):  # type: ignore[union-attr]
            out.mux(packet)
        for packet in stream.encode(None):  # type: ignore[union-attr]
            out.mux(packet)
    with pytest.raises(UnsupportedMedia):
        audio.decode_to_pcm(write(tmp_path, buf.getvalue(), "v.mp4"), max_seconds=60)


def test_trim_cuts_edges_and_collapses_long_pauses_with_an_exact_time_map(tmp_path: Path) -> None:
    # 2 s silence, tone 1 s, 5 s silence, tone 1 s, 3 s silence.
    samples = np.concatenate([silence(2), tone(440, 1), silence(5), tone(880, 1), silence(3)])
    prepared = audio.prepare_audio(write(tmp_path, wav_bytes(samples)), max_seconds=60, max_chunk_seconds=600)
    try:
        tmap = prepared.time_map
        assert len(tmap.intervals) == 2
        # The lead-in before the first tone, PAD_SECONDS either side of the pause, the tail after the last.
        pad, lead, tail = audio.PAD_SECONDS, audio.LEAD_PAD_SECONDS, audio.TAIL_PAD_SECONDS
        assert lead < 2 and tail < 3  # this layout needs the edges to be cut
        assert prepared.speech_seconds == pytest.approx((lead + 1 + pad) + (pad + 1 + tail), abs=0.07)
        assert tmap.intervals[0][1] == pytest.approx(2.0 - lead, abs=0.03)
        # The start of each tone, in trimmed time, maps back to where it is in the original.
        assert tmap.to_original(lead) == pytest.approx(2.0, abs=0.04)
        second_start = tmap.intervals[1][0] + pad
        assert tmap.to_original(second_start) == pytest.approx(8.0, abs=0.04)
        # The trimmed audio really is the tones: its energy sits where the map says.
        trimmed = prepared.trimmed_pcm(0, prepared.speech_seconds)
        assert len(trimmed) == pytest.approx(prepared.speech_seconds * 16_000, abs=2)
        first_tone = trimmed[int(lead * 16_000) + 100 : int((lead + 0.9) * 16_000)]
        assert np.abs(first_tone).mean() > 1000
        assert np.abs(trimmed[: int((lead - 0.05) * 16_000)]).max() == 0  # the lead-in is the file's own
    finally:
        prepared.close()


def test_lead_in_and_tail_are_kept_but_never_beyond_the_file(tmp_path: Path) -> None:
    # Speech 0.2 s after the start and 0.12 s before the end: less than the lead-in/tail, so all is kept.
    assert audio.LEAD_PAD_SECONDS > 0.2 and audio.TAIL_PAD_SECONDS > 0.12
    samples = np.concatenate([silence(0.2), tone(440, 1), silence(4), tone(660, 1), silence(0.12)])
    prepared = audio.prepare_audio(write(tmp_path, wav_bytes(samples)), max_seconds=60, max_chunk_seconds=600)
    try:
        intervals = prepared.time_map.intervals
        assert intervals[0][1] == 0.0
        last_end = intervals[-1][1] + intervals[-1][2]
        assert last_end == pytest.approx(6.32, abs=0.001)
        # The inner pause is still collapsed to 2 x PAD_SECONDS: the lead-in/tail apply to the edges only.
        assert len(intervals) == 2
        assert intervals[1][1] - (intervals[0][1] + intervals[0][2]) == pytest.approx(
            4 - 2 * audio.PAD_SECONDS, abs=0.07
        )
    finally:
        prepared.close()


def test_lead_in_and_tail_lengths_are_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = np.concatenate([silence(3), tone(440, 1), silence(3)])
    path = write(tmp_path, wav_bytes(samples))
    for lead, tail in ((0.3, 0.3), (1.0, 0.5), (2.0, 2.5)):
        monkeypatch.setattr(speech, "LEAD_PAD_SECONDS", lead)
        monkeypatch.setattr(speech, "TAIL_PAD_SECONDS", tail)
        prepared = audio.prepare_audio(path, max_seconds=60, max_chunk_seconds=600)
        try:
            (start, original, length), *rest = prepared.time_map.intervals
            assert not rest and start == 0.0
            assert original == pytest.approx(3.0 - lead, abs=0.035)
            assert original + length == pytest.approx(4.0 + tail, abs=0.035)
            # Time 0 of what is sent is the start of the lead-in in the original file.
            assert prepared.time_map.to_original(lead) == pytest.approx(3.0, abs=0.035)
        finally:
            prepared.close()


def test_all_silence_has_no_speech(tmp_path: Path) -> None:
    prepared = audio.prepare_audio(
        write(tmp_path, wav_bytes(silence(3))), max_seconds=60, max_chunk_seconds=600
    )
    try:
        assert not prepared.has_speech and prepared.time_map.chunks == []
    finally:
        prepared.close()


def test_trimming_can_be_turned_off(tmp_path: Path) -> None:
    samples = np.concatenate([silence(2), tone(440, 1), silence(2)])
    prepared = audio.prepare_audio(
        write(tmp_path, wav_bytes(samples)), max_seconds=60, max_chunk_seconds=600, trim=False
    )
    try:
        assert prepared.speech_seconds == pytest.approx(5.0, abs=0.03)
        assert prepared.time_map.to_original(3.0) == pytest.approx(3.0, abs=0.001)
    finally:
        prepared.close()


def test_chunks_cut_at_pauses_stay_under_the_limit_and_cover_everything(tmp_path: Path) -> None:
    freqs = [300, 400, 500, 600, 700, 800, 900]
    samples = sequence([(f, 1.0) for f in freqs], gap=2.0)
    prepared = audio.prepare_audio(write(tmp_path, wav_bytes(samples)), max_seconds=60, max_chunk_seconds=3.5)
    try:
        chunks = list(prepared.iter_chunks())
        assert len(chunks) >= 3
        assert all(c.seconds <= 3.5 + 1e-6 for c in chunks)
        assert chunks[0].trimmed_start == 0
        for a, b in itertools.pairwise(chunks):
            assert a.trimmed_end == b.trimmed_start
            assert a.original_end <= b.original_start
        assert chunks[-1].trimmed_end == pytest.approx(prepared.speech_seconds)
        # Cuts fall on collapsed pauses (interval joins), never inside a tone.
        joins = {round(iv[0], 4) for iv in prepared.time_map.intervals}
        assert all(round(c.trimmed_start, 4) in joins for c in chunks)
        # Each chunk is valid FLAC of exactly its samples.
        for c in chunks:
            back = audio.decode_flac(c.flac)
            assert len(back) == pytest.approx(c.seconds * 16_000, abs=2)
    finally:
        prepared.close()


def test_chunk_without_pauses_is_cut_at_the_quietest_point(tmp_path: Path) -> None:
    # Continuous sound with one dip in level: no pause to cut at, so the cut goes to the dip.
    loud = tone(500, 3.0, amplitude=0.5)
    dip = tone(500, 0.4, amplitude=0.05)
    samples = np.concatenate([loud, dip, loud])
    prepared = audio.prepare_audio(
        write(tmp_path, wav_bytes(samples)), max_seconds=60, max_chunk_seconds=5.0, trim=False
    )
    try:
        start, cut = prepared.time_map.chunks[0]
        assert start == 0 and 3.0 <= cut <= 3.4
    finally:
        prepared.close()


def test_oversized_encoded_chunk_is_halved(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    noise = rng.uniform(-0.5, 0.5, 16_000 * 8)  # noise compresses badly
    prepared = audio.prepare_audio(write(tmp_path, wav_bytes(noise)), max_seconds=60, max_chunk_seconds=600)
    try:
        whole = len(audio.encode_flac(prepared.trimmed_pcm(0, prepared.speech_seconds)))
        chunks = list(prepared.iter_chunks(max_bytes=whole // 2 + 1000))
        assert len(chunks) >= 2
        assert all(len(c.flac) <= whole // 2 + 1000 for c in chunks)
        assert len(prepared.time_map.chunks) == len(chunks)
    finally:
        prepared.close()


def test_map_segments_to_original_time() -> None:
    tmap = audio.TimeMap(intervals=[(0.0, 2.0, 1.5), (1.5, 10.0, 2.0)])
    segs = audio.map_segments(
        [
            {"start": 0.2, "end": 1.4, "text": " a", "words": [{"start": 0.2, "end": 1.4, "word": "a"}]},
            {"start": 1.6, "end": 3.0, "text": " b"},
        ],
        text="a b",
        offset=0.0,
        duration=3.5,
        tmap=tmap,
    )
    assert [(s["start"], s["end"], s["text"]) for s in segs] == [(2.2, 3.4, "a"), (10.1, 11.5, "b")]
    assert segs[0]["words"] == [{"start": 2.2, "end": 3.4, "word": "a"}]
    # No segments from the provider: one segment spanning the piece, ending at the end of kept audio.
    whole = audio.map_segments(None, text="a b", offset=0.0, duration=3.5, tmap=tmap)
    assert whole == [{"start": 2.0, "end": 12.0, "text": "a b"}]
    # A span that ends exactly at a join ends where the earlier interval ends.
    assert tmap.to_original(1.5, end=True) == 3.5 and tmap.to_original(1.5) == 10.0
    assert audio.TimeMap.from_json(tmap.to_json()).intervals == tmap.intervals


def test_split_quietest_cuts_in_the_gap() -> None:
    pcm = (np.concatenate([tone(300, 1.0), silence(0.3), tone(300, 1.0)]) * 32767).astype(np.int16)
    left, right, cut = audio.split_quietest(pcm)
    assert 1.0 <= cut <= 1.3
    assert len(left) + len(right) == len(pcm)


def test_in_memory_decode_matches_the_temp_file_and_spills_past_its_bound(tmp_path: Path) -> None:
    samples = sequence([(300, 1.0), (600, 1.0)], lead=0.5)
    data = audio.encode_flac((np.clip(samples, -1, 1) * 32767).astype(np.int16))
    on_disk = audio.decode_to_pcm(write(tmp_path, data, "a.flac"), max_seconds=60, tmp_dir=str(tmp_path))
    in_memory = audio.decode_to_pcm(data, max_seconds=60, memory_seconds=10, tmp_dir=str(tmp_path))
    spilled = audio.decode_to_pcm(data, max_seconds=60, memory_seconds=1, tmp_dir=str(tmp_path))
    try:
        assert in_memory.in_memory and in_memory.path is None
        assert not on_disk.in_memory and not spilled.in_memory and spilled.path is not None
        assert spilled.path.exists()
        # The fingerprint (dedupe's key) does not depend on where the samples were kept.
        assert in_memory.fingerprint == on_disk.fingerprint == spilled.fingerprint
        reference = on_disk.pcm()[0 : on_disk.samples]
        assert np.array_equal(in_memory.pcm(), reference)
        assert np.array_equal(spilled.pcm()[0 : spilled.samples], reference)
    finally:
        for d in (on_disk, in_memory, spilled):
            d.close()
    assert [p.name for p in tmp_path.iterdir()] == ["a.flac"]


def test_in_memory_decode_resamples_other_formats_like_the_file_path(tmp_path: Path) -> None:
    data = wav_bytes(sequence([(440, 1.0)], lead=0.5, rate=44_100), rate=44_100, channels=2)
    from_file = audio.decode_to_pcm(write(tmp_path, data), max_seconds=60)
    from_bytes = audio.decode_to_pcm(data, max_seconds=60, memory_seconds=60)
    try:
        assert from_bytes.in_memory and from_bytes.samples == from_file.samples
        assert from_bytes.fingerprint == from_file.fingerprint
    finally:
        from_file.close()
        from_bytes.close()


def test_in_memory_decode_keeps_the_duration_bound() -> None:
    with pytest.raises(AudioTooLong):
        audio.decode_to_pcm(wav_bytes(tone(200, 12.0)), max_seconds=5, memory_seconds=60)
    with pytest.raises(EmptyAudio):
        audio.decode_to_pcm(b"", max_seconds=5, memory_seconds=60)
