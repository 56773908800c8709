"""S3 storage over boto3: content-addressed keys, streaming transfers, presigned URLs."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as EndpointUnreachable

from core.errors import StorageError
from core.settings import Settings, get_settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_SAFE_PART = re.compile(r"^[A-Za-z0-9_.-]+$")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
READ_CHUNK = 1024 * 1024
DERIVED = "derived"  # the key segment of intermediate audio: `{tenant}/derived/...`
# Connections of a process's S3 client: one per thread that may use it at once (a worker's I/O threads,
# an API process's threadpool) without botocore discarding connections past the pool's size.
S3_MAX_POOL_CONNECTIONS = 32


def content_key(tenant_id: str, sha256: str) -> str:
    """The object key for audio with this hash: `tenant/sha256[:2]/sha256` (never user text)."""
    if not _SAFE_PART.match(tenant_id) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError("tenant id and sha256 must be plain identifiers")
    return f"{tenant_id}/{sha256[:2]}/{sha256}"


def derived_key(tenant_id: uuid.UUID | str, job_id: uuid.UUID | str, index: int | None = None) -> str:
    """Where prepare stores a job's normalised FLAC (or one chunk of it): intermediate audio, removed
    when the job is deleted and by the storage sweep once the job has ended."""
    if index is None:
        return f"{tenant_id}/{DERIVED}/{job_id}.flac"
    return f"{tenant_id}/{DERIVED}/{job_id}/{index:05d}.flac"


def derived_prefix(tenant_id: uuid.UUID | str, job_id: uuid.UUID | str) -> str:
    """The prefix of every derived object of one job (its whole FLAC and its chunks' FLACs)."""
    return f"{tenant_id}/{DERIVED}/{job_id}"


def derived_job_id(key: str) -> uuid.UUID | None:
    """The job a derived object belongs to (None for a key of another shape)."""
    parts = key.split("/")
    if len(parts) < 3 or parts[1] != DERIVED:
        return None
    try:
        return uuid.UUID(parts[2].removesuffix(".flac"))
    except ValueError:
        return None


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key` into (bucket, key)."""
    match = re.fullmatch(r"s3://([^/]+)/(.+)", uri)
    if not match:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return match.group(1), match.group(2)


class ObjectChanged(StorageError):
    """Raised when an object is no longer the version that was checked (a conditional read or copy failed)."""

    code = "object_changed"


# S3 error codes that mean the service, not the request, is at fault (it is down, overloaded or slow).
_OUTAGE_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "503", "500"}
)


def storage_outage(exc: BaseException) -> bool:
    """Whether `exc` says S3 is unreachable or failing (after botocore's own retries), not that the
    request or the object is wrong."""
    if isinstance(exc, EndpointUnreachable | HTTPClientError | ConnectionError | TimeoutError):
        return True  # connection refused, reset or timed out
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return int(status) >= 500 or str(error.get("Code", "")) in _OUTAGE_CODES
    return False


def _precondition_failed(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code", "")) in {"PreconditionFailed", "412"} or status == 412


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
        has it; it is sent as the object's SHA-256 checksum, so S3 stores `data` only if it has that hash."""
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        if sha256 is not None:
            if not _SHA256_HEX.fullmatch(sha256):
                raise ValueError("sha256 must be a lowercase hex SHA-256")
            extra["ChecksumSHA256"] = base64.b64encode(bytes.fromhex(sha256)).decode("ascii")
        # botocore takes a bytearray as it is (its stubs say bytes): a held upload buffer is not copied.
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)  # type: ignore[arg-type]

    def download_to(self, key: str, fileobj: IO[bytes], *, bucket: str | None = None) -> None:
        """Stream an object into `fileobj` (ranged, multipart-aware)."""
        self.client.download_fileobj(bucket or self.bucket, key, fileobj, Config=self.transfer_config)

    def get_bytes(self, key: str, *, bucket: str | None = None) -> bytes:
        """A small object's bytes in one GET (raises `ClientError`, e.g. `NoSuchKey`, as `get_object`)."""
        body = self.client.get_object(Bucket=bucket or self.bucket, Key=key)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def iter_chunks(
        self, key: str, *, bucket: str | None = None, chunk: int = READ_CHUNK, if_match: str | None = None
    ) -> Iterator[bytes]:
        """Yield an object's bytes in chunks without holding it whole (`if_match`: only the version with
        this ETag, else `ObjectChanged`)."""
        extra: dict[str, Any] = {"IfMatch": if_match} if if_match is not None else {}
        try:
            body = self.client.get_object(Bucket=bucket or self.bucket, Key=key, **extra)["Body"]
        except ClientError as exc:
            if if_match is not None and _precondition_failed(exc):
                raise ObjectChanged(f"{key} changed since it was checked") from exc
            raise
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

    def sha256_of(self, key: str, *, if_match: str | None = None) -> str:
        """The hex SHA-256 of an object, streamed (memory stays at one read chunk whatever its size)."""
        digest = hashlib.sha256()
        for data in self.iter_chunks(key, if_match=if_match):
            digest.update(data)
        return digest.hexdigest()

    def head(self, key: str, *, bucket: str | None = None) -> dict[str, Any] | None:
        """Object metadata, or None when the object does not exist."""
        try:
            return dict(self.client.head_object(Bucket=bucket or self.bucket, Key=key))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise

    def copy(
        self, src_key: str, dst_key: str, *, src_bucket: str | None = None, if_match: str | None = None
    ) -> None:
        """Server-side copy (multipart for big objects). `if_match`: copy only the source version with
        this ETag (every part of a multipart copy is conditional), else `ObjectChanged`."""
        extra = {"CopySourceIfMatch": if_match} if if_match is not None else None
        try:
            self.client.copy(
                {"Bucket": src_bucket or self.bucket, "Key": src_key},
                self.bucket,
                dst_key,
                ExtraArgs=extra,
                Config=self.transfer_config,
            )
        except ClientError as exc:
            if if_match is not None and _precondition_failed(exc):
                raise ObjectChanged(f"{src_key} changed since it was checked") from exc
            raise

    def delete(self, key: str) -> None:
        """Delete an object (no error when it is already gone)."""
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many were deleted."""
        deleted = 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [obj["Key"] for obj in page.get("Contents", [])]
            self.delete_many(keys)
            deleted += len(keys)
        return deleted

    def delete_many(self, keys: list[str]) -> None:
        """Delete these objects, up to 1,000 per request (`StorageError` if S3 refused any of them)."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})  # type: ignore[typeddict-item]
            if answer.get("Errors"):  # a per-key refusal is in the 200 answer, not an exception
                codes = sorted({str(e.get("Code", "")) for e in answer["Errors"]})
                raise StorageError(f"S3 refused to delete {len(answer['Errors'])} object(s): {codes}")

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
    """A boto3 S3 client with SigV4; path-style addressing for a custom endpoint (SeaweedFS and MinIO need
    it), botocore's own choice for AWS. botocore retries throttling, 5xx answers and connection errors
    (`max_attempts` retries after the first request)."""
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=settings.s3_secret_access_key.get_secret_value(),
        region_name=settings.s3_region,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=S3_MAX_POOL_CONNECTIONS,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
