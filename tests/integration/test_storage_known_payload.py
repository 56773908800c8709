"""PUTs that reuse the SHA-256 the API already computed as SigV4's payload hash: the real S3 checks it."""

from __future__ import annotations

import hashlib
import os

import pytest
from botocore.exceptions import ClientError

from core.storage import KNOWN_SHA256, Storage
from tests.support import Stack


def _stored(storage: Storage, key: str) -> bytes:
    return b"".join(storage.iter_chunks(key))


def test_a_known_digest_is_signed_and_the_object_is_stored_intact(stack: Stack) -> None:
    storage = Storage()
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = hashlib.sha256(data).hexdigest()
    sent: list[bytes] = []
    storage.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(request.headers["X-Amz-Content-SHA256"])
    )
    storage.upload_bytes(data, "known/right", sha256=digest)
    storage.upload_bytes(bytearray(data), "known/bytearray", sha256=digest)
    assert sent == [digest.encode(), digest.encode()]  # the digest given, signed as the payload hash
    assert _stored(storage, "known/right") == data
    assert _stored(storage, "known/bytearray") == data


def test_a_wrong_known_digest_never_stores_other_bytes(stack: Stack) -> None:
    """The digest only replaces botocore's own hash in the signature; the body sent is the body.

    AWS S3 and MinIO recompute the payload hash and refuse a mismatch (XAmzContentSHA256Mismatch).
    SeaweedFS (4.48, the embedded server) checks the signature but not the body against the signed
    hash: it stores the request as sent. Either way no other bytes than the body can end up stored.
    """
    storage = Storage()
    data = os.urandom(256 * 1024)
    wrong = hashlib.sha256(data + b"x").hexdigest()
    try:
        storage.upload_bytes(data, "known/wrong", sha256=wrong)
    except ClientError as refused:
        assert "SHA256" in str(refused) or "Mismatch" in str(refused)
        assert storage.head("known/wrong") is None
    else:
        assert _stored(storage, "known/wrong") == data


def test_without_a_known_digest_botocore_still_hashes_the_body(stack: Stack) -> None:
    storage = Storage()
    data = os.urandom(100_000)
    sent: list[bytes] = []
    storage.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(request.headers["X-Amz-Content-SHA256"])
    )
    storage.upload_bytes(data, "known/plain")
    assert sent == [hashlib.sha256(data).hexdigest().encode()]
    assert _stored(storage, "known/plain") == data


def test_a_known_digest_must_look_like_one(stack: Stack) -> None:
    storage = Storage()
    with pytest.raises(ValueError):
        storage.client.put_object(Bucket=storage.bucket, Key="known/bad", Body=b"x", **{KNOWN_SHA256: "nope"})
    assert storage.head("known/bad") is None
