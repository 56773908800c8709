"""PUTs that carry the SHA-256 the API already computed as the object's checksum: the real S3 checks it."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import pytest
from botocore.exceptions import ClientError

from core.storage import Storage
from tests.support import Stack


def _stored(storage: Storage, key: str) -> bytes:
    return b"".join(storage.iter_chunks(key))


def _sent_headers(storage: Storage) -> list[dict[str, str]]:
    sent: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        sent.append(
            {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        )

    storage.client.meta.events.register("before-send.s3.PutObject", record)
    return sent


def test_a_known_digest_is_sent_as_the_checksum_and_the_object_is_stored_intact(stack: Stack) -> None:
    storage = Storage()
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = hashlib.sha256(data).hexdigest()
    sent = _sent_headers(storage)
    storage.upload_bytes(data, "known/right", sha256=digest)
    storage.upload_bytes(bytearray(data), "known/bytearray", sha256=digest)
    checksum = base64.b64encode(hashlib.sha256(data).digest())
    assert [h["x-amz-checksum-sha256"] for h in sent] == [checksum.decode()] * 2
    assert _stored(storage, "known/right") == data
    assert _stored(storage, "known/bytearray") == data


def test_a_wrong_known_digest_is_refused_and_nothing_is_stored(stack: Stack) -> None:
    """SeaweedFS, like AWS S3 and MinIO, recomputes the SHA-256 checksum of the body and refuses a
    mismatch: a caller's wrong belief about its bytes never ends up stored under their name."""
    storage = Storage()
    data = os.urandom(256 * 1024)
    wrong = hashlib.sha256(data + b"x").hexdigest()
    with pytest.raises(ClientError) as refused:
        storage.upload_bytes(data, "known/wrong", sha256=wrong)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert storage.head("known/wrong") is None


def test_without_a_known_digest_no_checksum_is_sent_and_botocore_signs_the_body(stack: Stack) -> None:
    storage = Storage()
    data = os.urandom(100_000)
    sent = _sent_headers(storage)
    storage.upload_bytes(data, "known/plain")
    [headers] = sent
    assert not any(name.lower().startswith("x-amz-checksum-") for name in headers)
    assert headers["x-amz-content-sha256"] == hashlib.sha256(data).hexdigest()
    assert _stored(storage, "known/plain") == data


def test_a_known_digest_must_look_like_one(stack: Stack) -> None:
    storage = Storage()
    with pytest.raises(ValueError):
        storage.upload_bytes(b"x", "known/bad", sha256="nope")
    assert storage.head("known/bad") is None
