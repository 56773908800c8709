"""core.storage.SignedGetter: voxq's own SigV4 GET against the real signature-checking S3 (SeaweedFS).

What it must keep from boto3's `get_object`: the server checks the signature (a wrong key is refused), a
missing object raises `ClientError` with S3's code (prepare maps `NoSuchKey` to `source_missing`), odd keys
are encoded as SigV4 wants, large objects stream in bounded memory, and 5xx answers are retried.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from botocore.exceptions import ClientError

from core import storage as storage_module
from core.errors import StorageError
from core.settings import get_settings
from core.statuses import JobStatus
from core.storage import SignedGetter, Storage
from tests.pipeline_support import Pipeline
from tests.support import Stack


def _getter(secret: str | None = None, access: str | None = None) -> SignedGetter:
    s = get_settings()
    return SignedGetter(
        s.s3_endpoint_url or "",
        access or s.s3_access_key_id,
        secret or s.s3_secret_access_key.get_secret_value(),
        s.s3_region,
    )


def test_storage_gets_through_the_signed_getter_what_boto3_stored(stack: Stack) -> None:
    storage = Storage()
    assert storage.getter is not None  # an endpoint URL and static keys: the lean path
    keys = ["plain/abc", "odd/a b+c=d&e;f,g'h(i)j!k*l~m", "odd/ünïcødé/ключ", "odd/%41%2F", "deep/a//b"]
    for i, key in enumerate(keys):
        data = os.urandom(1000 + i)
        storage.upload_bytes(data, key)
        assert storage.get_bytes(key) == data, key
        assert b"".join(storage.iter_chunks(key, chunk=300)) == data, key
        body = storage.client.get_object(Bucket=storage.bucket, Key=key)["Body"].read()
        assert body == data  # and boto3 reads the same object under the same key


def test_an_empty_object_is_empty(stack: Stack) -> None:
    storage = Storage()
    storage.upload_bytes(b"", "empty/one")
    assert storage.get_bytes("empty/one") == b""
    assert list(storage.iter_chunks("empty/one")) == []


def test_a_wrong_secret_or_access_key_is_refused_by_the_server(stack: Stack) -> None:
    storage = Storage()
    storage.upload_bytes(b"secret audio", "sig/one")
    assert _getter().get(storage.bucket, "sig/one") == b"secret audio"
    with pytest.raises(ClientError) as wrong_secret:
        _getter(secret="not-the-secret").get(storage.bucket, "sig/one")
    assert wrong_secret.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert wrong_secret.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}
    with pytest.raises(ClientError) as wrong_key:
        _getter(access="nobody").get(storage.bucket, "sig/one")
    assert wrong_key.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_a_missing_object_raises_no_such_key_like_boto3(stack: Stack) -> None:
    storage = Storage()
    with pytest.raises(ClientError) as lean:
        storage.get_bytes("missing/nothing-here")
    with pytest.raises(ClientError) as boto:
        storage.client.get_object(Bucket=storage.bucket, Key="missing/nothing-here")
    assert lean.value.response["Error"]["Code"] == boto.value.response["Error"]["Code"] == "NoSuchKey"
    assert lean.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as bucket:
        storage.get_bytes("x", bucket="voxq-no-such-bucket-here")
    assert bucket.value.response["Error"]["Code"] == "NoSuchBucket"
    with pytest.raises(ClientError):
        next(storage.iter_chunks("missing/nothing-here"))


def test_a_large_object_streams_in_bounded_memory(stack: Stack) -> None:
    storage = Storage()
    size = 24 * 1024 * 1024 + 5
    data = os.urandom(size)
    storage.upload_bytes(data, "large/one")
    expected = hashlib.sha256(data).hexdigest()
    del data
    digest = hashlib.sha256()
    seen = 0
    biggest = 0
    tracemalloc.start()
    try:
        for chunk in storage.iter_chunks("large/one", chunk=256 * 1024):
            digest.update(chunk)
            seen += len(chunk)
            biggest = max(biggest, len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == size and digest.hexdigest() == expected
    assert biggest <= 256 * 1024
    assert peak < 4 * 1024 * 1024  # never the 24 MB object at once


def test_a_reader_that_stops_early_does_not_leave_its_body_to_the_next_request(stack: Stack) -> None:
    storage = Storage()
    big = os.urandom(3 * 1024 * 1024)
    small = os.urandom(5000)
    storage.upload_bytes(big, "early/big")
    storage.upload_bytes(small, "early/small")
    getter = SignedGetter(
        stack.s3_endpoint_url, stack.s3_access_key_id, stack.s3_secret_access_key, get_settings().s3_region,
        maxsize=1,
    )  # fmt: skip
    for _ in range(3):
        chunks = getter.iter_chunks(storage.bucket, "early/big", chunk=64 * 1024)
        assert next(chunks) == big[: 64 * 1024]
        chunks.close()  # stopped after one chunk: the rest of the body is still on the connection
        assert getter.get(storage.bucket, "early/small") == small
        assert b"".join(getter.iter_chunks(storage.bucket, "early/small", chunk=1000)) == small


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first `fail` GETs, then 200 with `body`."""

    fail = 0
    seen = 0
    body = b"finally"

    def do_GET(self) -> None:
        type(self).seen += 1
        if type(self).seen <= type(self).fail:
            payload = b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
            self.send_response(503)
        else:
            payload = type(self).body
            self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A local threading HTTP server with `handler` on 127.0.0.1 (its base URL), shut down on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, type[_Flaky]]]:
    monkeypatch.setattr(storage_module, "_backoff", lambda attempt: None)  # no sleeping in the test
    handler = type("Flaky", (_Flaky,), {"fail": 0, "seen": 0})
    with _serving(handler) as url:
        yield url, handler


def test_5xx_answers_are_retried_until_the_attempts_run_out(flaky: tuple[str, type[_Flaky]]) -> None:
    url, handler = flaky
    handler.fail = 2
    getter = SignedGetter(url, "k", "s", "us-east-1", max_attempts=3)
    assert getter.get("b", "k") == b"finally" and handler.seen == 3
    handler.fail, handler.seen = 10, 0
    with pytest.raises(ClientError) as exc:
        getter.get("b", "k")
    assert handler.seen == 3
    assert exc.value.response["Error"]["Code"] == "SlowDown"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503


def test_connection_errors_are_retried_then_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    waits: list[int] = []
    monkeypatch.setattr(storage_module, "_backoff", waits.append)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        getter = SignedGetter(f"http://127.0.0.1:{port}", "k", "s", "us-east-1", max_attempts=4)
        with pytest.raises(StorageError):
            getter.get("b", "k")
    assert waits == [1, 2, 3]


@pytest.mark.usefixtures("hosted_settings")
def test_prepare_reads_uploads_through_it_and_a_missing_one_fails_as_source_missing(
    pipeline: Pipeline, stack: Stack
) -> None:
    from tests.pipeline_support import tones
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime

    assert get_runtime().storage.getter is not None  # the worker's client takes the lean GET
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    kept = pipeline.job(tenant, batch, tones(430))
    lost = pipeline.job(tenant, batch, tones(440))
    key = pipeline.jobs([lost])[lost].object_key
    assert key is not None
    Storage().delete(key)
    report = prepare_jobs([kept, lost], owner="test:1")
    assert report.failed == 1 and report.grouped == 1 and report.errors == 0
    rows = pipeline.jobs([kept, lost])
    assert rows[lost].status == JobStatus.FAILED.value and rows[lost].error_code == "source_missing"
    assert rows[kept].status == JobStatus.PROCESSING.value and rows[kept].group_id is not None


def test_whole_small_objects_come_over_pooled_plain_sockets_not_urllib3(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage()
    data = os.urandom(40_000)
    storage.upload_bytes(data, "plain/voicemail")
    getter = _getter()

    def no_urllib3(*args: object, **kwargs: object) -> None:
        raise AssertionError("urllib3 was used for a whole small object")

    monkeypatch.setattr(getter.pool, "urlopen", no_urllib3)
    for _ in range(5):
        assert getter.get(storage.bucket, "plain/voicemail") == data
    assert len(getter._idle) == 1  # one keep-alive connection, reused by every GET
    with pytest.raises(ClientError) as exc:
        getter.get(storage.bucket, "plain/missing")
    assert exc.value.response["Error"]["Code"] == "NoSuchKey"
    assert getter.get(storage.bucket, "plain/voicemail") == data  # the error answer's body was read off
    with pytest.raises(ClientError) as exc:
        _getter(secret="not-the-secret").get(storage.bucket, "plain/voicemail")
    assert exc.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


class _Http11(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 answers of `body`: with a length, chunked (`chunked`), and/or closing the connection
    after each answer without saying so (`drop`, as a server's idle timeout does); counts connections."""

    protocol_version = "HTTP/1.1"
    body = b"x" * 5000
    chunked = False
    drop = False
    connections = 0
    seen = 0

    def setup(self) -> None:
        type(self).connections += 1
        super().setup()

    def do_GET(self) -> None:
        type(self).seen += 1
        body = type(self).body
        self.send_response(200)
        if type(self).chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 1000):
                piece = body[i : i + 1000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        if type(self).drop:
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http11(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, type[_Http11]]]:
    waits: list[int] = []
    monkeypatch.setattr(storage_module, "_backoff", waits.append)
    handler = type("Http11", (_Http11,), {"waits": waits})
    with _serving(handler) as url:
        yield url, handler


def test_a_pooled_connection_the_server_closed_is_asked_again_at_once(
    http11: tuple[str, type[_Http11]],
) -> None:
    url, handler = http11
    handler.drop = True
    getter = SignedGetter(url, "k", "s", "us-east-1", max_attempts=1)
    for _ in range(3):
        # max_attempts=1: a stale pooled socket must not count as a failed attempt, nor wait
        assert getter.get("b", "k") == handler.body
    assert handler.seen == 3 and handler.connections == 3
    assert handler.waits == []  # type: ignore[attr-defined]


def test_keep_alive_answers_reuse_one_connection(http11: tuple[str, type[_Http11]]) -> None:
    url, handler = http11
    getter = SignedGetter(url, "k", "s", "us-east-1")
    for _ in range(4):
        assert getter.get("b", "k") == handler.body
    assert handler.seen == 4 and handler.connections == 1


def test_a_chunked_answer_is_read_through_urllib3(http11: tuple[str, type[_Http11]]) -> None:
    url, handler = http11
    handler.chunked = True
    handler.body = os.urandom(4500)
    getter = SignedGetter(url, "k", "s", "us-east-1")
    assert getter.get("b", "k") == handler.body
    assert handler.seen == 2  # the lean GET gave up on it unread; urllib3 asked once more
    assert getter._idle == []  # and the half-read connection was not kept
