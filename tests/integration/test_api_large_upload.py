"""A 1 GiB upload over real HTTP streams through the API with bounded memory."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from core.db import session_scope
from core.models import Job
from core.storage import Storage
from tests.api_helpers import ApiServer, make_key, wav_header

GIB = 1024**3
BLOCK = 1024 * 1024
RSS_BUDGET = 100 * 1024 * 1024


class _StreamedWav:
    """A 1 GiB multipart body (WAV header + silence) generated block by block, hashed as it is sent."""

    def __init__(self, total: int) -> None:
        self.data_bytes = total - 44
        self.file_sha = hashlib.sha256()
        self.head = b'--big\r\nContent-Disposition: form-data; name="file"; filename="long.wav"\r\n\r\n'
        self.tail = b"\r\n--big--\r\n"
        self.content_length = len(self.head) + total + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        header = wav_header(self.data_bytes)
        self.file_sha.update(header)
        yield header
        silence = bytes(BLOCK)
        left = self.data_bytes
        while left:
            block = silence if left >= BLOCK else bytes(left)
            self.file_sha.update(block)
            left -= len(block)
            yield block
        yield self.tail


@pytest.mark.slow
def test_one_gib_upload_streams_with_bounded_api_memory(api: ApiServer) -> None:
    key = make_key("acme")
    with api.client(key, timeout=600.0) as c:
        batch_id = c.post("/v1/batches", json={"profile": "podcast"}).json()["id"]
        body = _StreamedWav(GIB)
        baseline = api.rss_bytes()
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, api.rss_bytes())
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            resp = c.post(
                f"/v1/batches/{batch_id}/files",
                content=iter(body),
                headers={
                    "Content-Type": "multipart/form-data; boundary=big",
                    "Content-Length": str(body.content_length),
                },
            )
        finally:
            done.set()
            sampler.join()
        elapsed = time.monotonic() - started
        assert resp.status_code == 201, resp.text
        job = resp.json()["jobs"][0]
        assert job["bytes"] == GIB and job["sha256"] == body.file_sha.hexdigest()
        detail = c.get(f"/v1/jobs/{job['id']}").json()
        assert detail["duration_seconds"] == pytest.approx((GIB - 44) / 32000, abs=0.01)
        assert detail["codec"] == "pcm_s16le"
    growth = peak - baseline
    print(f"1 GiB upload: {elapsed:.1f}s, API RSS {baseline / 2**20:.0f} -> peak {peak / 2**20:.0f} MiB")
    assert growth < RSS_BUDGET, f"API RSS grew by {growth / 2**20:.0f} MiB"
    storage = Storage()
    with session_scope() as session:
        row = session.get(Job, uuid.UUID(job["id"]))
        assert row is not None and row.object_key is not None
        object_key = row.object_key
    stored = storage.head(object_key)
    assert stored is not None and int(stored["ContentLength"]) == GIB
    storage.delete(object_key)  # 1 GiB is too much to leave in the session's bucket
