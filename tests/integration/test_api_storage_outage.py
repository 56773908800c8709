"""Object storage unreachable during an upload, submit, import or delete: 503 `storage_unavailable` with
Retry-After, and a cleanup that fails too never replaces the request's first error (issue #16, item 22a).

The storage outage is real: an API process whose S3 endpoint is a closed port, or one that reaches the
session's SeaweedFS through a TCP relay the test cuts in the middle of a request.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from core.storage import Storage
from tests.api_helpers import (
    ApiServer,
    finish_job,
    grant_import,
    import_bucket,
    make_key,
    sine_wav,
    start_api_server,
    stop_api_server,
    tenant_objects,
)
from tests.support import Stack, wait_until
from voxq.embedded import free_port

PART = 5 * 1024 * 1024  # S3's smallest multipart part


class Relay:
    """A TCP relay to a real server that can be cut: open connections are closed, new ones refused."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.is_cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.is_cut:
                    client.close()
                    return
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        with self.lock:
            self.is_cut = True
            with contextlib.suppress(OSError):  # shutdown wakes the accepting thread (Linux)
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def _assert_storage_unavailable(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == "storage_unavailable"
    assert int(resp.headers["retry-after"]) > 0


@pytest.fixture
def no_s3_api(stack: Stack) -> Iterator[ApiServer]:
    """An API process whose S3 endpoint is a closed port (Postgres and Redis are the session's)."""
    server = start_api_server(stack, VOXQ_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    try:
        yield server
    finally:
        stop_api_server(server)


def test_every_storage_failure_of_a_request_is_503_storage_unavailable(
    api: ApiServer, no_s3_api: ApiServer, stack: Stack
) -> None:
    key = make_key("acme")
    grant_import("acme", import_bucket(stack), "calls/")  # the import below is allowed, then its read fails
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={}).json()
        done = c.post(f"/v1/batches/{batch['id']}/files", files=[("file", ("a.wav", sine_wav(1.0)))])
        assert done.status_code == 201
    job_id = done.json()["jobs"][0]["id"]
    finish_job(job_id)
    before = tenant_objects("acme")
    with no_s3_api.client(key) as c:
        small = [("file", ("b.wav", sine_wav(1.0)))]
        _assert_storage_unavailable(c.post(f"/v1/batches/{batch['id']}/files", files=small))
        big = [("file", ("c.wav", sine_wav(200.0)))]  # over one S3 part: streamed as a multipart upload
        _assert_storage_unavailable(c.post(f"/v1/batches/{batch['id']}/files", files=big))
        _assert_storage_unavailable(c.post("/v1/jobs", files=small))
        slot = c.post(f"/v1/batches/{batch['id']}/uploads", json={"filename": "d.wav", "bytes": 100})
        assert slot.status_code == 201  # signing a URL needs no storage
        _assert_storage_unavailable(c.post(f"/v1/batches/{batch['id']}/submit"))
        uri = f"s3://{import_bucket(stack)}/calls/e.wav"
        _assert_storage_unavailable(c.post(f"/v1/batches/{batch['id']}/imports", json={"s3_uris": [uri]}))
        _assert_storage_unavailable(c.delete(f"/v1/jobs/{job_id}"))
    # The failed delete changed nothing: the job is still there, and deleting it again works.
    assert tenant_objects("acme") == before
    with api.client(key) as c:
        assert c.get(f"/v1/jobs/{job_id}").status_code == 200
        assert c.get(f"/v1/jobs/{job_id}/transcript").status_code == 200
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert tenant_objects("acme") == []
    log = no_s3_api.log_path.read_text()
    assert stack.s3_secret_access_key not in log


def test_a_cleanup_that_fails_does_not_replace_the_first_error(stack: Stack) -> None:
    relay = Relay(int(stack.s3_endpoint_url.rsplit(":", 1)[1]))
    server = start_api_server(
        stack,
        VOXQ_S3_ENDPOINT_URL=f"http://127.0.0.1:{relay.port}",
        VOXQ_S3_MULTIPART_CHUNK_BYTES=str(PART),
        VOXQ_MAX_UPLOAD_BYTES=str(PART + 1024 * 1024),
    )
    try:
        key = make_key("acme")
        storage = Storage()
        with server.client(key) as c:
            batch_id = c.post("/v1/batches", json={}).json()["id"]

            def body() -> Iterator[bytes]:
                yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.wav"\r\n\r\n'
                yield bytes(PART + 1024)  # one full part: the API sends it to S3 as it arrives
                wait_until(lambda: tenant_uploads(storage), timeout=30, what="the first part in S3")
                relay.cut()  # storage goes away before the rest of the file arrives
                yield bytes(2 * 1024 * 1024)  # past VOXQ_MAX_UPLOAD_BYTES: 413, then the cleanup fails
                yield b"\r\n--b--\r\n"

            resp = c.post(
                f"/v1/batches/{batch_id}/files",
                content=body(),
                headers={"Content-Type": "multipart/form-data; boundary=b"},
            )
        assert resp.status_code == 413, resp.text
        assert resp.json()["code"] == "file_too_large"
        log = server.log_path.read_text()
        assert "cleanup" in log and stack.s3_secret_access_key not in log
        assert tenant_uploads(storage)  # left for the incoming sweep (it aborts it after its age limit)
    finally:
        stop_api_server(server)
        relay.cut()


def tenant_uploads(storage: Storage) -> list[str]:
    """Keys of unfinished multipart uploads in the bucket that have a part stored."""
    listed = storage.client.list_multipart_uploads(Bucket=storage.bucket)
    return [
        u["Key"]
        for u in listed.get("Uploads", [])
        if storage.client.list_parts(Bucket=storage.bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
    ]
