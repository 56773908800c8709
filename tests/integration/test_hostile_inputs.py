"""Malformed and hostile input through the real API and real worker processes.

Each kind gets a clear, stable code from the API (refused at upload) or from the worker (the job fails
with a reason), no worker process dies, and good files submitted alongside them are transcribed.
Kinds already covered elsewhere (test_api_bad_input: empty file, random bytes, PDF renamed .mp3, text
file, header-only WAV, control characters and `..` in filenames; test_api_idempotency: a key reused with
another body; test_pipeline_flow: garbage and over-long audio in the worker) are not repeated one by one;
this file adds the missing kinds and the "alongside" and "no worker died" checks.

Every file is generated here with PyAV, numpy, wave and struct; no ffmpeg command is needed.
"""

from __future__ import annotations

import io
import struct
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from sqlalchemy import select

from core.db import session_scope
from core.models import Job
from tests.api_helpers import (
    ApiServer,
    make_key,
    sine_wav,
    tenant_objects,
    wav_header,
)
from tests.audio_fixtures import tones
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import hosted_env
from tests.support import Stack, celery_worker, child_pids, wait_until

# --- generators -------------------------------------------------------------------------------------


def _crc8(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _utf8_number(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    if n < 0x800:
        return bytes([0xC0 | n >> 6, 0x80 | n & 0x3F])
    return bytes([0xE0 | n >> 12, 0x80 | (n >> 6) & 0x3F, 0x80 | n & 0x3F])


def silent_flac(seconds: float, *, declare_length: bool, rate: int = 8000) -> bytes:
    """A valid FLAC of digital silence built frame by frame (CONSTANT subframes of 65,535 samples).

    Ten hours take ~64 KB. With `declare_length=False` STREAMINFO says "length unknown", so only
    decoding reveals how long it is (a decompression bomb for anyone who decodes it all).
    """
    block = 65535
    frames = -(-int(seconds * rate) // block)
    total = frames * block if declare_length else 0
    info = struct.pack(">HH", block, block) + b"\0" * 6
    info += ((rate << 44) | (15 << 36) | total).to_bytes(8, "big") + b"\0" * 16  # mono, 16 bit, no MD5
    out = [b"fLaC", bytes([0x80, 0, 0, len(info)]), info]
    for n in range(frames):
        # fixed blocking, block size from the 16-bit field, 8 kHz, mono, 16 bit
        head = b"\xff\xf8\x74\x08" + _utf8_number(n) + struct.pack(">H", block - 1)
        frame = head + bytes([_crc8(head)]) + b"\x00\x00\x00"  # CONSTANT subframe, value 0
        out.append(frame + struct.pack(">H", _crc16(frame)))
    return b"".join(out)


_CRC8 = [_crc8(bytes([i])) for i in range(256)]
_CRC16 = [_crc16(bytes([i])) for i in range(256)]


def _fast_crc8(data: bytes) -> int:
    crc = 0
    for b in data:
        crc = _CRC8[crc ^ b]
    return crc


def _fast_crc16(data: bytes) -> int:
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ b]
    return crc


def wide_flac(seconds: float, *, rate: int = 655_350, channels: int = 8) -> bytes:
    """A valid FLAC of digital silence at FLAC's highest sample rate on 8 channels, length declared.

    Two hours take ~2.6 MB, and the header says exactly what it is, so no length check refuses it; but
    decoding it means 38 billion samples to resample: about 4 minutes of CPU on this kind of machine.
    """
    block = 65535
    frames = -(-int(seconds * rate) // block)
    info = struct.pack(">HH", block, block) + b"\0" * 6
    info += ((rate << 44) | ((channels - 1) << 41) | (15 << 36) | frames * block).to_bytes(8, "big")
    info += b"\0" * 16  # no MD5
    out = [b"fLaC", bytes([0x80, 0, 0, len(info)]), info]
    for n in range(frames):
        # block size from the 16-bit field, rate from STREAMINFO, `channels` independent, 16 bit
        head = (
            b"\xff\xf8\x70"
            + bytes([((channels - 1) << 4) | 0x08])
            + _utf8_number(n)
            + struct.pack(">H", block - 1)
        )
        frame = head + bytes([_fast_crc8(head)]) + b"\x00\x00\x00" * channels  # CONSTANT subframes, 0
        out.append(frame + struct.pack(">H", _fast_crc16(frame)))
    return b"".join(out)


def _video_only(fmt: str) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def _zip_renamed() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("song.mp3", b"\xff\xfb\x90\x00" * 1000)
    return buf.getvalue()


# (name, bytes, HTTP status, code) refused by the API at upload
def api_refused() -> list[tuple[str, bytes, int, str]]:
    """Every hostile upload the API itself must refuse, with its status and stable code."""
    wav = sine_wav(1.0)
    mp3 = tones([440, 880], fmt="mp3")
    flac = tones([440, 880], fmt="flac")
    pcm = b"\x01\x02" * 16000
    return [
        ("truncated-header.wav", wav[:30], 415, "unsupported_media"),
        ("truncated.mp3", mp3[:60], 415, "unsupported_media"),
        ("truncated.flac", flac[:30], 415, "unsupported_media"),
        ("archive.mp3", _zip_renamed(), 415, "unsupported_media"),
        ("id3-tag-only.mp3", b"ID3\x04\x00\x00\x00\x00\x00\x10" + b"\0" * 16, 415, "unsupported_media"),
        ("video-only.mp4", _video_only("mp4"), 415, "unsupported_media"),
        ("no-audio-stream.mkv", _video_only("matroska"), 415, "unsupported_media"),
        ("zero-channels.wav", wav_header(len(pcm), channels=0) + pcm, 415, "unsupported_media"),
        ("zero-rate.wav", wav_header(len(pcm), rate=0) + pcm, 415, "unsupported_media"),
        ("absurd-rate.wav", wav_header(len(pcm), rate=2_000_000_000) + pcm, 415, "unsupported_media"),
    ]


def _problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"] == "application/problem+json"
    body = resp.json()
    assert body["code"] == code and body["status"] == status and body["detail"]
    return dict(body)


@pytest.fixture
def worker_proc(stack: Stack, fake_openai: FakeOpenAI) -> Iterator[Any]:
    with celery_worker(stack, env=hosted_env(), concurrency=2) as proc:
        wait_until(lambda: len(child_pids(proc.pid)) == 2, timeout=60, what="pool children up")
        yield proc


def test_hostile_files_get_stable_codes_and_good_files_alongside_succeed(
    api: ApiServer, worker_proc: Any, tmp_path: Path
) -> None:
    pids_before = {worker_proc.pid, *child_pids(worker_proc.pid)}
    key = make_key("hostile")
    refused = api_refused()
    with api.client(key, timeout=120) as c:
        batch = c.post("/v1/batches", json={"name": "hostile"}).json()
        good_ids = []
        for n, (name, payload, status, code) in enumerate(refused):
            # each hostile file alone, and next to a good file in one request (all-or-nothing)
            _problem(
                c.post(f"/v1/batches/{batch['id']}/files", files=[("file", (name, payload))]), status, code
            )
            mixed = c.post(
                f"/v1/batches/{batch['id']}/files",
                files=[("file", (f"good-{n}.flac", tones([500 + 10 * n]))), ("file", (name, payload))],
            )
            _problem(mixed, status, code)
            _problem(c.post("/v1/jobs", files=[("file", (name, payload))]), status, code)
        # files the API cannot judge without decoding them all go to the worker
        bomb = silent_flac(10 * 3600, declare_length=False)
        assert len(bomb) < 100_000  # ten hours of audio in ~64 KB
        long_declared = silent_flac(6.5 * 3600, declare_length=True)
        hostile_names = {
            "bomb": "ten-hours-of-silence.flac",
            "long": "six-and-a-half-hours.flac",
            "slashes": "a/b\\c/../../d.flac",
            "dots": "..",
            "long_name": "x" * 500 + ".flac",
            "controls": "\x1b[31mred\x07.flac",
        }
        payloads = {
            "bomb": bomb,
            "long": long_declared,
            "slashes": tones([610]),
            "dots": tones([620]),
            "long_name": tones([630]),
            "controls": tones([640]),
        }
        goods = {f"good-{i}.flac": tones([700 + 20 * i, 1200]) for i in range(4)}
        files = [("file", (hostile_names[k], payloads[k])) for k in hostile_names]
        files += [("file", (name, data)) for name, data in goods.items()]
        resp = c.post(f"/v1/batches/{batch['id']}/files", files=files)
        assert resp.status_code == 201, resp.text
        uploaded = resp.json()["jobs"]
        assert len(uploaded) == len(files)
        by_kind = {k: uploaded[i] for i, k in enumerate(hostile_names)}
        by_name = {j["filename"]: j for j in uploaded}
        # names are data: kept (bounded, control characters dropped), never used as storage paths
        assert by_kind["slashes"]["filename"] == "a/b\\c/../../d.flac"
        assert by_kind["dots"]["filename"] == ".."
        assert by_kind["long_name"]["filename"] == "x" * 500 + ".flac"
        # (httpx escapes some control characters itself; raw ones are in test_api_bad_input)
        assert by_kind["controls"]["filename"].startswith("[31mred")
        assert not any(ord(ch) < 32 for ch in by_kind["controls"]["filename"])
        submitted = c.post(f"/v1/batches/{batch['id']}/submit")
        assert submitted.status_code in (200, 202), submitted.text
        good_ids = [by_name[n]["id"] for n in goods]
        good_ids += [by_kind[k]["id"] for k in ("slashes", "dots", "long_name", "controls")]

        def finished() -> list[dict[str, Any]] | None:
            jobs = c.get(f"/v1/batches/{batch['id']}/jobs", params={"limit": 200}).json()["items"]
            return jobs if all(j["status"] in ("succeeded", "failed") for j in jobs) else None

        started = time.monotonic()
        jobs = {j["id"]: j for j in wait_until(finished, timeout=240, interval=0.5, what="jobs finished")}
        elapsed = time.monotonic() - started
        bomb_job = jobs[by_kind["bomb"]["id"]]
        long_job = jobs[by_kind["long"]["id"]]
        for job in (bomb_job, long_job):
            assert job["status"] == "failed"
            assert job["error"]["code"] == "audio_too_long", job
            assert job["error"]["message"]
        for job_id in good_ids:
            assert jobs[job_id]["status"] == "succeeded", jobs[job_id]
        text = c.get(f"/v1/jobs/{by_name['good-0.flac']['id']}/transcript").text.strip()
        assert text == "tone700 tone1200"
        assert elapsed < 200
    with session_scope() as session:
        rows = session.execute(
            select(Job.object_key, Job.sha256).where(Job.batch_id == uuid.UUID(batch["id"]))
        )
        for object_key, sha in rows:
            assert (
                object_key and object_key.endswith(sha) and ".." not in object_key and "\\" not in object_key
            )
    # no worker process died or was replaced
    assert worker_proc.poll() is None
    assert {worker_proc.pid, *child_pids(worker_proc.pid)} == pids_before


def test_huge_multipart_part_counts_are_refused_cheaply(api: ApiServer) -> None:
    key = make_key("parts")
    with api.client(key, timeout=120) as c:
        batch_id = c.post("/v1/batches", json={}).json()["id"]
        boundary = "pp"
        part = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\nx\r\n"
        ).encode()
        body = part * 5000 + f"--{boundary}--\r\n".encode()
        started = time.monotonic()
        resp = c.post(
            f"/v1/batches/{batch_id}/files",
            content=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        _problem(resp, 422, "too_many_files")
        assert time.monotonic() - started < 60
        # thousands of tiny form fields on the one-file endpoint: refused, not a 5xx
        fields = (f'--{boundary}\r\nContent-Disposition: form-data; name="language"\r\n\r\nen\r\n').encode()
        resp = c.post(
            "/v1/jobs",
            content=fields * 20000 + f"--{boundary}--\r\n".encode(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert 400 <= resp.status_code < 500, resp.text[:300]
        assert resp.headers["content-type"] == "application/problem+json"
        assert c.get("/readyz").status_code == 200
    wait_until(lambda: tenant_objects("parts") == [], timeout=30, what="no leftovers")


def test_idempotency_key_reused_with_another_body_is_refused_alongside_uploads(api: ApiServer) -> None:
    with api.client(make_key("idem")) as c:
        first = c.post("/v1/batches", json={"name": "one"}, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 201
        _problem(
            c.post("/v1/batches", json={"name": "two"}, headers={"Idempotency-Key": "k-1"}),
            422,
            "idempotency_key_reused",
        )
        again = c.post("/v1/batches", json={"name": "one"}, headers={"Idempotency-Key": "k-1"})
        assert again.json()["id"] == first.json()["id"]
        # the same key on another route is another request too: refused, nothing stored
        upload = c.post(
            f"/v1/batches/{first.json()['id']}/files",
            files=[("file", ("a.wav", sine_wav(0.5)))],
            headers={"Idempotency-Key": "k-1"},
        )
        _problem(upload, 422, "idempotency_key_reused")
        ok = c.post(f"/v1/batches/{first.json()['id']}/files", files=[("file", ("a.wav", sine_wav(0.5)))])
        assert ok.status_code == 201, ok.text


def test_a_decompression_bomb_is_refused_without_decoding_it(tmp_path: Path) -> None:
    from core.errors import AudioTooLong
    from worker.audio import decode_to_pcm

    bomb = tmp_path / "bomb.flac"
    bomb.write_bytes(silent_flac(10 * 3600, declare_length=False))
    with av.open(str(bomb)) as container:  # the header really does not tell the length
        assert container.duration is None
    started = time.monotonic()
    with pytest.raises(AudioTooLong, match="limit"):
        decode_to_pcm(bomb, max_seconds=6 * 3600, tmp_dir=str(tmp_path))
    # decoding even the allowed 6 h would take many seconds and ~700 MB of temporary PCM
    assert time.monotonic() - started < 3.0
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.flac"]


def test_a_file_that_would_cost_minutes_of_cpu_fails_alone_in_the_sandbox(
    api: ApiServer, stack: Stack, fake_openai: FakeOpenAI
) -> None:
    bomb = wide_flac(2 * 3600)
    assert len(bomb) < 3_000_000
    env = hosted_env(VOXQ_DECODE_CPU_SECONDS="4")
    with celery_worker(stack, env=env, concurrency=2) as proc:
        wait_until(lambda: len(child_pids(proc.pid)) == 2, timeout=60, what="pool children up")
        pids_before = {proc.pid, *child_pids(proc.pid)}
        with api.client(make_key("cpu-bomb"), timeout=120) as c:
            batch = c.post("/v1/batches", json={"name": "cpu bomb"}).json()
            goods = {f"good-{i}.flac": tones([900 + 40 * i, 1300]) for i in range(2)}
            files = [("file", ("two-hours-655khz-8ch.flac", bomb))]
            files += [("file", (name, data)) for name, data in goods.items()]
            uploaded = c.post(f"/v1/batches/{batch['id']}/files", files=files)
            assert uploaded.status_code == 201, uploaded.text  # a valid, honestly labelled file
            by_name = {j["filename"]: j["id"] for j in uploaded.json()["jobs"]}
            assert c.post(f"/v1/batches/{batch['id']}/submit").status_code == 202

            def finished() -> dict[str, Any] | None:
                jobs = c.get(f"/v1/batches/{batch['id']}/jobs").json()["items"]
                done = all(j["status"] in ("succeeded", "failed") for j in jobs)
                return {j["id"]: j for j in jobs} if done else None

            # Decoding it unbounded takes minutes of CPU; the sandbox stops it at 4 s.
            jobs = wait_until(finished, timeout=120, interval=0.5, what="jobs finished")
            bomb_job = jobs[by_name["two-hours-655khz-8ch.flac"]]
            assert bomb_job["status"] == "failed", bomb_job
            assert bomb_job["error"]["code"] == "media_limit_exceeded" and bomb_job["error"]["message"]
            for name in goods:
                assert jobs[by_name[name]]["status"] == "succeeded", jobs[by_name[name]]
            assert c.get("/readyz").status_code == 200
        # no worker process died or was replaced: only the sandbox's child was
        assert proc.poll() is None
        assert {proc.pid, *child_pids(proc.pid)} >= pids_before


def test_the_decode_of_a_cpu_bomb_is_cut_off_by_the_cpu_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.errors import MediaLimitExceeded
    from core.sandbox import close_sandboxes
    from core.settings import reset_settings_cache
    from worker.audio import decode_to_pcm

    monkeypatch.setenv("VOXQ_DECODE_CPU_SECONDS", "2")
    reset_settings_cache()
    close_sandboxes()
    try:
        started = time.monotonic()
        with pytest.raises(MediaLimitExceeded):
            decode_to_pcm(wide_flac(3600), max_seconds=6 * 3600, tmp_dir=str(tmp_path), memory_seconds=120)
        assert time.monotonic() - started < 30  # ~2 min of CPU unbounded
        assert list(tmp_path.iterdir()) == []  # the killed child's spilled PCM is gone too
    finally:
        close_sandboxes()
        reset_settings_cache()
