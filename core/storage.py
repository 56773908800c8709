"""S3 storage over boto3: path-style, content-addressed keys, streaming transfers, presigned URLs."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import re
import socket
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

import boto3
import botocore.auth
import urllib3
from boto3.s3.transfer import TransferConfig
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import ClientError

from core.errors import StorageError
from core.settings import Settings, get_settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_SAFE_PART = re.compile(r"^[A-Za-z0-9_.-]+$")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
READ_CHUNK = 1024 * 1024

# `put_object(..., **{KNOWN_SHA256: digest})`: the SHA-256 (hex) of exactly the Body, already computed
# by the caller; SigV4 signs it as the payload hash instead of hashing the body a second time.
KNOWN_SHA256 = "VoxqBodySha256"
_KNOWN_SHA256_CONTEXT = "voxq_body_sha256"
_KNOWN_PAYLOAD_SIGNER = "voxq-s3v4-known-payload"


class KnownPayloadS3SigV4Auth(S3SigV4Auth):
    """S3 SigV4 that signs a body whose SHA-256 the caller already knows, instead of hashing it again.

    Only a request whose context carries the digest (see `KNOWN_SHA256`) gets it; anything else is
    hashed as usual. The server recomputes the payload hash and refuses the request when it differs
    (`XAmzContentSHA256Mismatch`), so a wrong digest fails the PUT: it never stores other bytes.
    """

    def payload(self, request: AWSRequest) -> str:
        """The known digest when the payload is signed at all, else botocore's own answer."""
        known = request.context.get(_KNOWN_SHA256_CONTEXT)
        this: Any = self  # botocore's own checks; the stubs omit these private methods
        if (
            known is None
            or this._is_streaming_checksum_payload(request)
            or not this._should_sha256_sign_payload(request)
        ):
            return str(super().payload(request))
        return str(known)


botocore.auth.AUTH_TYPE_MAPS.setdefault(_KNOWN_PAYLOAD_SIGNER, KnownPayloadS3SigV4Auth)


def _take_known_sha256(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """before-parameter-build: move our pseudo-parameter into the request context (S3 never sees it)."""
    known = params.pop(KNOWN_SHA256, None)
    if known is not None:
        if not isinstance(known, str) or not _SHA256_HEX.fullmatch(known):
            raise ValueError(f"{KNOWN_SHA256} must be a lowercase hex SHA-256")
        context[_KNOWN_SHA256_CONTEXT] = known


def _choose_known_payload_signer(signature_version: str, context: dict[str, Any], **_: Any) -> str | None:
    """choose-signer: plain S3 SigV4 requests that carry a known digest use `KnownPayloadS3SigV4Auth`."""
    if context.get(_KNOWN_SHA256_CONTEXT) and signature_version in {"s3v4", "v4"}:
        return _KNOWN_PAYLOAD_SIGNER
    return None


def content_key(tenant_id: str, sha256: str) -> str:
    """The object key for audio with this hash: `tenant/sha256[:2]/sha256` (never user text)."""
    if not _SAFE_PART.match(tenant_id) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError("tenant id and sha256 must be plain identifiers")
    return f"{tenant_id}/{sha256[:2]}/{sha256}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key` into (bucket, key)."""
    match = re.fullmatch(r"s3://([^/]+)/(.+)", uri)
    if not match:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return match.group(1), match.group(2)


@dataclass(frozen=True)
class StoredObject:
    """What an upload produced: its key, size and SHA-256."""

    key: str
    bytes: int
    sha256: str


class _HashingReader:
    """A file-like wrapper that hashes and counts what boto3 reads through it, and can cap the size."""

    def __init__(self, raw: IO[bytes], limit: int | None) -> None:
        self._raw = raw
        self._limit = limit
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n if n and n > 0 else READ_CHUNK)
        self.sha.update(data)
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            raise StorageError(f"object larger than {self._limit} bytes")
        return data


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class SignedGetter:
    """GET objects with SigV4 over a pooled urllib3 connection, without botocore's request pipeline.

    boto3's `get_object` was ~20% of a prepare child's CPU per voicemail (P1): its event hooks, parameter
    validation, endpoint resolution, signing through AWSRequest and response parsing cost far more than
    the request. This signs the same request itself (path-style URL; `host`, `x-amz-content-sha256` with the
    empty payload's hash, `x-amz-date`; the signing key cached per day), so the server still checks the
    signature. Retried like boto3's standard mode (`max_attempts`, 429/5xx and connection errors, jittered
    exponential backoff) while nothing of the body has been handed out; an error answer raises botocore's
    `ClientError` with S3's error code (`NoSuchKey`, `SignatureDoesNotMatch`, ...), as `get_object` does.
    """

    def __init__(
        self,
        endpoint_url: str,
        access_key: str,
        secret_key: str,
        region: str,
        *,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        max_attempts: int = 5,
        maxsize: int = 32,
    ) -> None:
        url = urllib.parse.urlsplit(endpoint_url)
        if url.scheme not in {"http", "https"} or not url.hostname:
            raise ValueError(f"not an http(s) endpoint: {endpoint_url!r}")
        self.host = url.netloc  # as sent in the Host header (with a non-default port)
        self.base_path = url.path.rstrip("/")
        self.access_key = access_key
        self._secret = secret_key
        self.region = region
        self.max_attempts = max_attempts
        self.pool = urllib3.connectionpool.connection_from_url(
            f"{url.scheme}://{url.netloc}",
            maxsize=maxsize,
            block=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=False,
        )
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()
        # `get` (whole small objects) speaks HTTP/1.1 over its own pooled sockets for plain-http endpoints:
        # see `_plain_get`. https endpoints and streaming (`open`, `iter_chunks`) use urllib3.
        self._plain = (url.hostname, url.port or 80) if url.scheme == "http" else None
        self._timeouts = (connect_timeout, read_timeout)
        self._idle: list[socket.socket] = []
        self._idle_pid = os.getpid()  # a forked child never uses its parent's sockets
        self._maxsize = maxsize

    def _signing_key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = ("AWS4" + self._secret).encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            with self._lock:
                self._keys = {day: key}  # one day's key at a time
        return key

    def signed_headers(self, path: str, now: datetime | None = None) -> dict[str, str]:
        """SigV4 headers for `GET path` (an already URI-encoded absolute path, no query string)."""
        now = now or datetime.now(UTC)
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        canonical = (
            f"GET\n{path}\n\nhost:{self.host}\nx-amz-content-sha256:{EMPTY_SHA256}\nx-amz-date:{stamp}\n\n"
            f"host;x-amz-content-sha256;x-amz-date\n{EMPTY_SHA256}"
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        return {
            "Host": self.host,
            "X-Amz-Content-SHA256": EMPTY_SHA256,
            "X-Amz-Date": stamp,
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                f"SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}"
            ),
        }

    def path(self, bucket: str, key: str) -> str:
        """The path-style request path, URI-encoded as SigV4 wants it for S3 (each byte once, `/` kept)."""
        return f"{self.base_path}/{urllib.parse.quote(bucket, safe='')}/{urllib.parse.quote(key, safe='/~')}"

    def open(self, bucket: str, key: str) -> urllib3.BaseHTTPResponse:
        """A 200 response to `GET bucket/key` whose body is not read yet (release it when done)."""
        path = self.path(bucket, key)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.pool.urlopen(
                    "GET", path, headers=self.signed_headers(path), preload_content=False, redirect=False
                )
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if attempt >= self.max_attempts:
                    raise StorageError(f"GET {bucket}/{key} failed: {type(exc).__name__}") from exc
                _backoff(attempt)
                continue
            if response.status == 200:
                return response
            body = response.read()
            response.release_conn()
            if response.status in _RETRY_STATUSES and attempt < self.max_attempts:
                _backoff(attempt)
                continue
            raise _client_error(response.status, body, dict(response.headers))

    def get(self, bucket: str, key: str) -> bytes:
        """The whole object (for objects known to be small)."""
        if self._plain is not None:
            path = self.path(bucket, key)
            attempt = 0
            while True:
                attempt += 1
                try:
                    status, headers, body = self._plain_get(path)
                except _Unsupported:
                    break  # an answer this lean client does not read (chunked, encoded): urllib3's turn
                except OSError as exc:
                    if attempt >= self.max_attempts:
                        raise StorageError(f"GET {bucket}/{key} failed: {type(exc).__name__}") from exc
                    _backoff(attempt)
                    continue
                if status == 200:
                    return body
                if status in _RETRY_STATUSES and attempt < self.max_attempts:
                    _backoff(attempt)
                    continue
                raise _client_error(status, body, headers)
        response = self.open(bucket, key)
        done = False
        try:
            data = response.read()
            done = True
            return data
        finally:
            _release(response, done)

    def _plain_get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """One signed `GET path` over a pooled socket: (status, headers, body).

        urllib3 + http.client cost ~0.35 ms of CPU per 40 KB voicemail (P1: pool bookkeeping, a liveness
        poll, email-module header parsing); this request costs ~0.1 ms. It reads only what S3 servers send
        for a GET: a status line, headers, and a body of the stated `Content-Length` (anything else raises
        `_Unsupported` before a byte is returned, and the caller asks again through urllib3). A pooled
        socket the server has closed meanwhile fails before any answer byte: that is retried at once on a
        new connection (GET is idempotent). Connection errors and timeouts raise `OSError`.
        """
        assert self._plain is not None
        lines = [f"GET {path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in self.signed_headers(path).items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        while True:
            sock = self._take()
            reused = sock is not None
            if sock is None:
                sock = socket.create_connection(self._plain, timeout=self._timeouts[0])
                sock.settimeout(self._timeouts[1])
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                answer = _read_answer(sock, request)
            except _StaleConnection:
                sock.close()
                if reused:
                    continue  # the server closed the idle connection: ask again on a new one
                raise ConnectionResetError("the server closed the connection before answering") from None
            except BaseException:
                sock.close()
                raise
            status, headers, body, keep = answer
            if keep and len(self._idle) < self._maxsize:
                self._idle.append(sock)
            else:
                sock.close()
            return status, headers, body

    def _take(self) -> socket.socket | None:
        if self._idle_pid != os.getpid():
            self._idle, self._idle_pid = [], os.getpid()  # the parent's sockets stay the parent's
        try:
            return self._idle.pop()
        except IndexError:
            return None

    def iter_chunks(self, bucket: str, key: str, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        """The object's bytes, `chunk` at a time (never held whole)."""
        response = self.open(bucket, key)
        done = False
        try:
            yield from response.stream(chunk)
            done = True
        finally:
            _release(response, done)


class _Unsupported(Exception):
    """An answer `SignedGetter._plain_get` does not read itself (no length, chunked, content-encoded)."""


class _StaleConnection(Exception):
    """The connection ended before the first byte of an answer."""


_MAX_HEAD = 64 * 1024


def _read_answer(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """Send `request` and read one HTTP/1.1 answer with a `Content-Length` body: (status, headers (names
    lowercased), body, whether the connection can be reused)."""
    try:
        sock.sendall(request)
        buf = sock.recv(65536)
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
        raise _StaleConnection from None
    if not buf:
        raise _StaleConnection
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > _MAX_HEAD:
            raise _Unsupported("answer head too long")
        more = sock.recv(65536)
        if not more:
            raise ConnectionResetError("the connection ended inside the answer's head")
        buf += more
    head = buf[:end].decode("latin-1").split("\r\n")
    version, _, rest = head[0].partition(" ")
    code = rest[:3]
    if version not in {"HTTP/1.1", "HTTP/1.0"} or not code.isdigit():
        raise _Unsupported(f"not an HTTP/1.x status line: {head[0][:40]!r}")
    status = int(code)
    headers: dict[str, str] = {}
    for line in head[1:]:
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or not name or (name == "content-length" and name in headers):
            raise _Unsupported("malformed or repeated header")
        headers[name] = value.strip()
    length = headers.get("content-length", "")
    if (
        status < 200
        or not length.isdigit()
        or "transfer-encoding" in headers
        or headers.get("content-encoding", "identity").lower() != "identity"
    ):
        raise _Unsupported("an answer without a plain Content-Length body")
    size = int(length)
    body = bytearray(size)
    have = min(len(buf) - end - 4, size)
    body[:have] = buf[end + 4 : end + 4 + have]
    if len(buf) - end - 4 > size:
        raise _Unsupported("more bytes than the stated length")  # never reuse a confused connection
    view = memoryview(body)
    while have < size:
        n = sock.recv_into(view[have:])
        if not n:
            raise ConnectionResetError("the connection ended inside the body")
        have += n
    connection = headers.get("connection", "").lower()
    keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    return status, headers, bytes(body), keep


def _release(response: urllib3.BaseHTTPResponse, complete: bool) -> None:
    """Give the connection back to the pool; one whose body was not read to the end (an error, a reader
    that stopped early) is closed first, so no later request reads the rest of this body as its answer."""
    if not complete:
        response.close()
    response.release_conn()


def _backoff(attempt: int) -> None:
    """Sleep before retry number `attempt` (as botocore's standard mode: full jitter, 2^n s, ≤ 20 s)."""
    time.sleep(random.uniform(0, min(20.0, 2.0 ** (attempt - 1))))


def _client_error(status: int, body: bytes, headers: dict[str, str]) -> ClientError:
    """What botocore raises for this S3 error answer: the XML error's code, else the HTTP status."""
    code, message = str(status), ""
    try:
        root = ET.fromstring(body) if body else None  # noqa: S314 (our own S3 endpoint's answer)
    except ET.ParseError:
        root = None
    if root is not None:
        code = root.findtext("Code") or code
        message = root.findtext("Message") or ""
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers},
    }
    return ClientError(response, "GetObject")


class Storage:
    """The bucket voxq keeps audio in."""

    def __init__(self, settings: Settings | None = None, *, bucket: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.bucket = bucket or self.settings.s3_bucket
        self.client: S3Client = make_s3_client(self.settings)
        self.transfer_config = TransferConfig(
            multipart_threshold=self.settings.s3_multipart_threshold_bytes,
            multipart_chunksize=self.settings.s3_multipart_chunk_bytes,
            max_concurrency=2,
            use_threads=True,
        )
        # s3transfer buffers up to 10 parts of a non-seekable stream by default (80 MB at 8 MB parts):
        # two (one per transfer thread) bound a transfer's memory whatever the object's size.
        self.transfer_config.max_in_memory_upload_chunks = 2
        self.transfer_config.max_in_memory_download_chunks = 2
        # Plain GETs skip boto3 when voxq talks to its own S3 endpoint with static keys (SeaweedFS, MinIO):
        # see SignedGetter. AWS without an endpoint URL keeps boto3 (its endpoint and credential chain).
        self.getter: SignedGetter | None = None
        if self.settings.s3_endpoint_url and self.settings.s3_access_key_id:
            self.getter = SignedGetter(
                self.settings.s3_endpoint_url,
                self.settings.s3_access_key_id,
                self.settings.s3_secret_access_key.get_secret_value(),
                self.settings.s3_region,
            )

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in {"404", "NoSuchBucket", "NotFound"}:
                raise StorageError(f"cannot reach bucket {self.bucket}: {code}") from exc
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as create_exc:
                create_code = str(create_exc.response.get("Error", {}).get("Code", ""))
                if create_code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise StorageError(f"cannot create bucket {self.bucket}") from create_exc

    def upload_stream(self, fileobj: IO[bytes], key: str, *, limit: int | None = None) -> StoredObject:
        """Stream `fileobj` to `key` (multipart above the threshold), hashing as it goes."""
        reader = _HashingReader(fileobj, limit)
        self.client.upload_fileobj(reader, self.bucket, key, Config=self.transfer_config)  # type: ignore[arg-type]
        return StoredObject(key=key, bytes=reader.size, sha256=reader.sha.hexdigest())

    def upload_bytes(
        self, data: bytes | bytearray, key: str, content_type: str | None = None, *, sha256: str | None = None
    ) -> None:
        """Put an object in one request. `sha256`: the hex SHA-256 of `data` when the caller already
        has it (it is signed as the payload hash instead of hashing `data` again; S3 refuses a wrong one)."""
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        if sha256 is not None:
            extra[KNOWN_SHA256] = sha256
        # botocore takes a bytearray as it is (its stubs say bytes): a held upload buffer is not copied.
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)  # type: ignore[arg-type]

    def download_to(self, key: str, fileobj: IO[bytes], *, bucket: str | None = None) -> None:
        """Stream an object into `fileobj` (ranged, multipart-aware)."""
        self.client.download_fileobj(bucket or self.bucket, key, fileobj, Config=self.transfer_config)

    def get_bytes(self, key: str, *, bucket: str | None = None) -> bytes:
        """A small object's bytes in one GET (raises `ClientError`, e.g. `NoSuchKey`, as `get_object`)."""
        if self.getter is not None:
            return self.getter.get(bucket or self.bucket, key)
        body = self.client.get_object(Bucket=bucket or self.bucket, Key=key)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def iter_chunks(self, key: str, *, bucket: str | None = None, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        """Yield an object's bytes in chunks without holding it whole."""
        if self.getter is not None:
            yield from self.getter.iter_chunks(bucket or self.bucket, key, chunk)
            return
        body = self.client.get_object(Bucket=bucket or self.bucket, Key=key)["Body"]
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

    def head(self, key: str, *, bucket: str | None = None) -> dict[str, Any] | None:
        """Object metadata, or None when the object does not exist."""
        try:
            return dict(self.client.head_object(Bucket=bucket or self.bucket, Key=key))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise

    def copy(self, src_key: str, dst_key: str, *, src_bucket: str | None = None) -> None:
        """Server-side copy (multipart for big objects)."""
        self.client.copy(
            {"Bucket": src_bucket or self.bucket, "Key": src_key},
            self.bucket,
            dst_key,
            Config=self.transfer_config,
        )

    def delete(self, key: str) -> None:
        """Delete an object (no error when it is already gone)."""
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many were deleted."""
        deleted = 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})  # type: ignore[typeddict-item]
                deleted += len(keys)
        return deleted

    def presign_put(self, key: str, *, expires: int | None = None, content_type: str | None = None) -> str:
        """A URL anyone holding it may PUT this one object to, until it expires."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if content_type:
            params["ContentType"] = content_type
        return self.client.generate_presigned_url(
            "put_object", Params=params, ExpiresIn=expires or self.settings.s3_presign_expiry_seconds
        )

    def presign_get(self, key: str, *, expires: int | None = None) -> str:
        """A URL to GET one object until it expires."""
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=expires or self.settings.s3_presign_expiry_seconds,
        )

    def ping(self) -> None:
        """Raise unless the bucket answers."""
        self.client.head_bucket(Bucket=self.bucket)


def make_s3_client(
    settings: Settings, *, connect_timeout: float = 5, read_timeout: float = 60, max_attempts: int = 5
) -> S3Client:
    """A boto3 S3 client with path-style addressing and SigV4, as SeaweedFS and MinIO need."""
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=settings.s3_secret_access_key.get_secret_value(),
        region_name=settings.s3_region,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=32,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    for operation in ("PutObject", "UploadPart"):
        client.meta.events.register(f"before-parameter-build.s3.{operation}", _take_known_sha256)
        client.meta.events.register(f"choose-signer.s3.{operation}", _choose_known_payload_signer)  # type: ignore[arg-type]
    return client
