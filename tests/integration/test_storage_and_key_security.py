"""Presigned URLs expire, S3 objects are private, and API keys are stored only as hashes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import text

from core import auth
from core.db import session_scope
from core.models import Base
from core.storage import Storage
from tests.api_helpers import (
    ApiServer,
    make_key,
    sine_wav,
    start_api_server,
    stop_api_server,
)
from tests.support import Stack


@pytest.fixture
def short_presign_api(stack: Stack) -> Iterator[ApiServer]:
    """An API whose presigned upload URLs live 4 seconds (signing time is whole seconds, so a loaded
    machine needs some margin for the fresh URL to still be valid when it is used)."""
    server = start_api_server(stack, VOXQ_S3_PRESIGN_EXPIRY_SECONDS="4")
    try:
        yield server
    finally:
        stop_api_server(server)


def test_presigned_upload_url_from_the_api_expires(short_presign_api: ApiServer) -> None:
    wav = sine_wav(0.5)
    with short_presign_api.client(make_key("presign")) as c:
        batch_id = c.post("/v1/batches", json={}).json()["id"]
        ask = {"filename": "p.wav", "bytes": len(wav), "sha256": hashlib.sha256(wav).hexdigest()}
        fresh = c.post(f"/v1/batches/{batch_id}/uploads", json=ask).json()
        stale = c.post(f"/v1/batches/{batch_id}/uploads", json=ask).json()
        assert httpx.put(fresh["upload_url"], content=wav, headers=fresh["headers"]).status_code == 200
        time.sleep(5.5)
        late = httpx.put(stale["upload_url"], content=wav, headers=stale["headers"])
        assert late.status_code == 403, late.text
        assert b"expired" in late.content.lower() or b"AccessDenied" in late.content


def test_presigned_get_expires(stack: Stack) -> None:
    storage = Storage()
    storage.upload_bytes(b"voice", "sec/get-expiry")
    url = storage.presign_get("sec/get-expiry", expires=3)  # whole-second signing: keep a margin
    assert httpx.get(url).content == b"voice"
    time.sleep(4.5)
    late = httpx.get(url)
    assert late.status_code == 403 and late.content != b"voice"


def test_s3_objects_and_bucket_are_private(api: ApiServer, stack: Stack) -> None:
    with api.client(make_key("private")) as c:
        batch_id = c.post("/v1/batches", json={}).json()["id"]
        job = c.post(f"/v1/batches/{batch_id}/files", files=[("file", ("a.wav", sine_wav(0.5)))]).json()
    storage = Storage()
    keys = [o["Key"] for o in storage.client.list_objects_v2(Bucket=storage.bucket).get("Contents", [])]
    assert keys and any(k.endswith(job["jobs"][0]["sha256"]) for k in keys)
    base = stack.s3_endpoint_url.rstrip("/")
    for key in keys:
        anonymous = httpx.get(f"{base}/{storage.bucket}/{key}")
        assert anonymous.status_code == 403, (key, anonymous.status_code)
        assert not anonymous.content.startswith(b"RIFF")
        assert httpx.head(f"{base}/{storage.bucket}/{key}").status_code == 403
    assert httpx.get(f"{base}/{storage.bucket}?list-type=2").status_code == 403  # no anonymous listing
    assert httpx.put(f"{base}/{storage.bucket}/anon", content=b"x").status_code == 403
    assert not storage.head("anon")
    # a signed URL for one object does not open another
    signed = storage.presign_get(keys[0], expires=60)
    other = urlsplit(signed)._replace(path=f"/{storage.bucket}/someone-else").geturl()
    assert httpx.get(other).status_code == 403


def test_api_keys_are_stored_only_as_hashes(api: ApiServer) -> None:
    plaintexts = [make_key("hashed-a"), make_key("hashed-b")]
    with session_scope() as session:
        issued = auth.create_key(session, "hashed-c")
        plaintexts.append(issued.plaintext)
    with api.client(plaintexts[0]) as c:  # a used key stays hashed (last-used bookkeeping included)
        assert c.get("/v1/batches").status_code == 200
    with session_scope() as session:
        rows = [dict(r) for r in session.execute(text("SELECT * FROM api_keys")).mappings()]
        assert len(rows) == 3
        stored = "\n".join(str(v) for row in rows for v in row.values())
        # every table, every column, as text: the plaintext (or its secret part) is nowhere
        everything = "\n".join(
            str(r[0])
            for table in Base.metadata.sorted_tables
            for r in session.execute(text(f'SELECT row_to_json(t)::text FROM "{table.name}" t'))
        )
    for plaintext in plaintexts:
        secret = plaintext.removeprefix(auth.KEY_PREFIX)
        assert plaintext not in stored and secret not in stored
        assert secret not in everything and secret[8:] not in everything
        assert auth.hash_key(plaintext) in stored  # what is stored is the SHA-256
    assert api.log_path.read_bytes().find(plaintexts[0].encode()) == -1
