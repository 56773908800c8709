"""core.storage reads through boto3 against the real signature-checking S3 (SeaweedFS), and botocore's
own retries and connection pool (`make_s3_client`) against tiny local HTTP servers.

What the pipeline relies on: the server checks the signature (a wrong key is refused), a missing object
raises `ClientError` with S3's code (prepare maps `NoSuchKey` to `source_missing`), odd keys round-trip,
large objects stream in bounded memory, 5xx answers and refused connections are retried, and keep-alive
connections are reused (but never one the server closed).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from pydantic import SecretStr

from core.settings import Settings, get_settings
from core.statuses import JobStatus
from core.storage import Storage, make_s3_client
from tests.pipeline_support import Pipeline
from tests.support import Stack


def _settings(**update: Any) -> Settings:
    return get_settings().model_copy(update=update)


def test_odd_keys_round_trip(stack: Stack) -> None:
    storage = Storage()
    keys = ["plain/abc", "odd/a b+c=d&e;f,g'h(i)j!k*l~m", "odd/ünïcødé/ключ", "odd/%41%2F", "deep/a//b"]
    for i, key in enumerate(keys):
        data = os.urandom(1000 + i)
        storage.upload_bytes(data, key)
        assert storage.get_bytes(key) == data, key
        assert b"".join(storage.iter_chunks(key, chunk=300)) == data, key


def test_an_empty_object_is_empty(stack: Stack) -> None:
    storage = Storage()
    storage.upload_bytes(b"", "empty/one")
    assert storage.get_bytes("empty/one") == b""
    assert list(storage.iter_chunks("empty/one")) == []


def test_a_wrong_secret_or_access_key_is_refused_by_the_server(stack: Stack) -> None:
    storage = Storage()
    storage.upload_bytes(b"secret audio", "sig/one")
    for update in ({"s3_secret_access_key": SecretStr("not-the-secret")}, {"s3_access_key_id": "nobody"}):
        other = Storage(_settings(**update))
        with pytest.raises(ClientError) as refused:
            other.get_bytes("sig/one")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert refused.value.response["Error"]["Code"] in {
            "SignatureDoesNotMatch",
            "AccessDenied",
            "InvalidAccessKeyId",
        }
    assert storage.get_bytes("sig/one") == b"secret audio"


def test_a_missing_object_raises_no_such_key(stack: Stack) -> None:
    storage = Storage()
    with pytest.raises(ClientError) as missing:
        storage.get_bytes("missing/nothing-here")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
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
    for _ in range(3):
        chunks = storage.iter_chunks("early/big", chunk=64 * 1024)
        assert next(chunks) == big[: 64 * 1024]
        chunks.close()  # stopped after one chunk: the rest of the body was still on the connection
        assert storage.get_bytes("early/small") == small
        assert b"".join(storage.iter_chunks("early/small", chunk=1000)) == small


@pytest.mark.usefixtures("hosted_settings")
def test_prepare_reads_uploads_and_a_missing_one_fails_as_source_missing(
    pipeline: Pipeline, stack: Stack
) -> None:
    from tests.pipeline_support import tones
    from worker.prepare import prepare_jobs

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


class _S3ish(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 GETs answered with `body`: 503 SlowDown to the first `fail` of them; closing each
    connection after its answer without saying so when `drop` (as a server's idle timeout does)."""

    protocol_version = "HTTP/1.1"
    body = b"x" * 5000
    fail = 0
    drop = False
    connections = 0
    closed = 0
    seen = 0

    def setup(self) -> None:
        type(self).connections += 1
        super().setup()

    def do_GET(self) -> None:
        cls = type(self)
        cls.seen += 1
        if cls.seen <= cls.fail:
            payload = b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
            self.send_response(503)
        else:
            payload = cls.body
            self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        if cls.drop:
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _s3ish(**attrs: Any) -> Iterator[tuple[Storage, type[_S3ish]]]:
    """A Storage on a local `_S3ish` server (attributes of its handler set from `attrs`)."""
    handler = type("S3ish", (_S3ish,), dict(attrs))

    class Server(http.server.ThreadingHTTPServer):
        def shutdown_request(self, request: Any) -> None:
            super().shutdown_request(request)
            handler.closed += 1  # the socket is closed: a client that looks now sees it

    server = Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        yield Storage(_settings(s3_endpoint_url=url), bucket="b"), handler
    finally:
        server.shutdown()
        server.server_close()


def test_keep_alive_connections_are_reused() -> None:
    with _s3ish() as (storage, handler):
        for _ in range(4):
            assert storage.get_bytes("k") == handler.body
    assert handler.seen == 4 and handler.connections == 1


def test_a_pooled_connection_the_server_closed_is_not_a_failed_attempt() -> None:
    with _s3ish(drop=True) as (storage, handler):
        storage.client = make_s3_client(storage.settings, max_attempts=0)  # no retry could hide a failure
        for i in range(3):
            assert storage.get_bytes("k") == handler.body
            # An idle timeout closes a pooled connection between two requests, not while the client is
            # already sending the next one (that race is what botocore's retries are for).
            deadline = time.monotonic() + 10
            while handler.closed < i + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert handler.closed == i + 1
    assert handler.seen == 3 and handler.connections == 3


def test_5xx_answers_are_retried_until_the_attempts_run_out() -> None:
    """`max_attempts` is botocore's: retries after the first request."""
    with _s3ish(fail=1) as (storage, handler):
        storage.client = make_s3_client(storage.settings, max_attempts=2)
        assert storage.get_bytes("k") == handler.body and handler.seen == 2
        handler.fail, handler.seen = 10, 0
        storage.client = make_s3_client(storage.settings, max_attempts=1)
        with pytest.raises(ClientError) as exc:
            storage.get_bytes("k")
    assert handler.seen == 2
    assert exc.value.response["Error"]["Code"] == "SlowDown"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503


def test_refused_connections_are_retried_then_raised() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        client = make_s3_client(_settings(s3_endpoint_url=f"http://127.0.0.1:{port}"), max_attempts=2)
        sent: list[str] = []
        client.meta.events.register("before-send.s3.GetObject", lambda request, **_: sent.append(request.url))
        with pytest.raises(EndpointConnectionError):
            client.get_object(Bucket="b", Key="k")
    assert len(sent) == 3
