"""Streaming multipart ingest: each file part is hashed as it arrives, never whole on disk.

A file that fits in one S3 part (`s3_multipart_chunk_bytes`) is buffered anyway: while the request
holds at most `HOLD_BYTES_PER_REQUEST` of such files, they stay in memory, are probed there and PUT
once, straight to their content-addressed key (their SHA-256 is known when the part ends). Any other
file part is written to a temporary key `{tenant}/incoming/{uuid}` (S3 multipart upload in parts of
that size, so memory stays bounded whatever the size), probed by reading only what the demuxer needs
from S3, then server-side copied to its content key (`api.accept`). Any rejection removes everything
this request wrote; a cleanup that fails itself (storage gone) is logged and never replaces the
request's first error. Filenames are data only: they never reach an object key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from api.idempotency import HEADER, IdempotencyStore, Outcome, conflict_problem, valid_key
from api.problems import PROBLEM_MEDIA_TYPE, Problem
from core.settings import get_settings
from core.storage import Storage

log = logging.getLogger(__name__)

FILE_FIELD = "file"
MAX_FILES_PER_REQUEST = 1000
MAX_FIELD_BYTES = 64 * 1024
MAX_FILENAME_CHARS = 1000
# Multipart framing (boundaries, part headers) on top of the file bytes a request may carry.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024
# One-part files a request keeps in memory until they are probed and stored (the rest go to S3 at once).
HOLD_BYTES_PER_REQUEST = 32 * 1024 * 1024
# Control characters, lone surrogates, and line/paragraph separators (they break logs and CSV exports).
_DROPPED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def clean_filename(raw: bytes | str | None) -> str | None:
    """A filename as data: UTF-8, control characters dropped, trimmed; None when nothing is left."""
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _DROPPED_CATEGORIES).strip()
    return text[:MAX_FILENAME_CHARS] or None


def incoming_key(tenant_id: uuid.UUID) -> str:
    """A fresh temporary key for an upload in progress."""
    return f"{tenant_id}/incoming/{uuid.uuid4().hex}"


@dataclass
class ReceivedFile:
    """One file part as received: where it was written (or its bytes, when held), its size and hash."""

    filename: str | None
    content_type: str | None
    temp_key: str | None
    size: int
    sha256: str
    data: bytearray | None = field(default=None, repr=False)  # held in memory: not written anywhere yet


@dataclass
class Received:
    """Everything a multipart request carried."""

    files: list[ReceivedFile] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)

    def fingerprint(self, path: str) -> str:
        """What was asked, for idempotency: path, form fields and each file's name, size and hash."""
        desc = {
            "path": path,
            "fields": {k: v for k, v in sorted(self.fields.items())},
            "files": [[f.filename, f.size, f.sha256] for f in self.files],
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


class _PartWriter:
    """Streams one file part to S3 (or only hashes it), enforcing the size limit as bytes arrive."""

    def __init__(self, storage: Storage | None, key: str | None, limit: int) -> None:
        self.storage = storage
        self.key = key
        self.limit = limit
        self.sha = hashlib.sha256()
        self.size = 0
        # The part's chunks as they arrived, joined once when the part is sent or held (growing one
        # bytearray chunk by chunk re-copied it at every reallocation: 13% of the API's GIL time in P4).
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.part_size = get_settings().s3_multipart_chunk_bytes
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.stored = False  # an object exists at `key`

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise Problem(
                413, "file_too_large", f"a file may be at most {self.limit} bytes (VOXQ_MAX_UPLOAD_BYTES)"
            )
        if self.storage is None:
            self.sha.update(data)
            return
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered >= self.part_size:
            await self._flush_part()

    def _take_buffered(self) -> bytearray:
        """The buffered bytes in one buffer (one allocation, one copy), added to the file's SHA-256; the
        writer starts a new buffer."""
        body = bytearray().join(self.chunks)
        # Hashed here, in order, once per S3 part (or whole held file): one call that releases the GIL
        # instead of one per ~64 KB chunk on the event loop.
        self.sha.update(body)
        self.chunks.clear()
        self.buffered = 0
        return body

    async def _flush_part(self) -> None:
        assert self.storage is not None and self.key is not None
        body = self._take_buffered()
        client, bucket, key = self.storage.client, self.storage.bucket, self.key
        if self.upload_id is None:
            created = await run_in_threadpool(lambda: client.create_multipart_upload(Bucket=bucket, Key=key))
            self.upload_id = created["UploadId"]
        number = len(self.parts) + 1
        upload_id = self.upload_id
        answer = await run_in_threadpool(
            lambda: client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,  # type: ignore[arg-type]
            )
        )
        self.parts.append({"ETag": answer["ETag"], "PartNumber": number})

    async def finish(self, hold_limit: int = 0) -> bytearray | None:
        """Complete the part: its bytes when it fits in one S3 part and `hold_limit` (nothing written),
        else None after completing the object at `key` (nothing either for an empty part)."""
        if self.storage is None or self.size == 0:
            return None
        assert self.key is not None
        key = self.key
        if self.upload_id is None:
            body = self._take_buffered()
            if len(body) <= hold_limit:
                return body
            storage, sha256 = self.storage, self.sha.hexdigest()
            await run_in_threadpool(lambda: storage.upload_bytes(body, key, sha256=sha256))
            self.stored = True
            return None
        if self.chunks:
            await self._flush_part()
        client, bucket = self.storage.client, self.storage.bucket
        upload_id, parts = self.upload_id, self.parts
        await run_in_threadpool(
            lambda: client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        )
        self.upload_id = None
        self.stored = True
        return None

    async def abort(self) -> None:
        """Drop whatever was written of this part."""
        self.chunks.clear()
        self.buffered = 0
        if self.storage is None:
            return
        client, bucket, key = self.storage.client, self.storage.bucket, self.key
        if self.upload_id is not None:
            upload_id = self.upload_id
            self.upload_id = None
            await run_in_threadpool(
                lambda: client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)  # type: ignore[arg-type]
            )


class _Events:
    """Collects the parser's callbacks so the async loop can act on them (S3 calls are awaited there)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self._header_field = b""
        self._header_value = b""

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": lambda: self.items.append(("begin", None)),
            "on_part_data": lambda data, start, end: self.items.append(("data", bytes(data[start:end]))),
            "on_part_end": lambda: self.items.append(("end", None)),
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
        }

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self.items.append(("header", (self._header_field.lower(), self._header_value)))
        self._header_field = b""
        self._header_value = b""


def check_content_length(request: Request, limit: int) -> None:
    """Refuse (413) a request that announces more bytes than allowed, before reading any of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD_BYTES:
        raise Problem(
            413,
            "file_too_large",
            f"a request may carry at most {limit} bytes of files (VOXQ_MAX_UPLOAD_BYTES)",
        )


def _boundary(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise Problem(415, "unsupported_content_type", "send the files as multipart/form-data")
    return params[b"boundary"]


class _Parts:
    """The state of one multipart body being read: the part in progress and everything received so far."""

    def __init__(
        self,
        storage: Storage,
        tenant_id: uuid.UUID,
        allowed_fields: frozenset[str],
        hash_only: bool,
        limit: int,
    ) -> None:
        self.storage = storage
        self.tenant_id = tenant_id
        self.allowed_fields = allowed_fields
        self.hash_only = hash_only
        self.limit = limit
        self.received = Received()
        self.writer: _PartWriter | None = None
        self.headers: dict[bytes, bytes] = {}
        self.field_name: str | None = None
        self.field_value = bytearray()
        self.in_headers = False
        self.held = 0  # bytes of one-part files kept in memory by this request

    @property
    def unfinished(self) -> bool:
        """The body stopped inside a part."""
        return self.writer is not None or self.in_headers

    async def on_event(self, kind: str, value: Any) -> None:
        """Act on one parser event, in order: a part begins, a header, data, a part ends."""
        if kind == "begin":
            self.headers, self.writer, self.field_name, self.in_headers = {}, None, None, True
            self.field_value.clear()
        elif kind == "header":
            self.headers[value[0]] = value[1]
        elif kind == "data":
            self._headers_done()
            if self.writer is not None:
                await self.writer.write(value)
            else:
                self.field_value += value
                if len(self.field_value) > MAX_FIELD_BYTES:
                    raise Problem(422, "field_too_large", f"form field {self.field_name!r} is too large")
        elif kind == "end":
            self._headers_done()  # a part with no data at all ends right after its headers
            await self._end_part()

    def _headers_done(self) -> None:
        """The part's headers are complete: start a file writer or a form field."""
        if not self.in_headers:
            return
        self.in_headers = False
        disposition, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise Problem(
                400, "invalid_multipart", "each part needs Content-Disposition: form-data; name=..."
            )
        name = params[b"name"].decode("utf-8", errors="replace")
        if name == FILE_FIELD:
            if len(self.received.files) >= MAX_FILES_PER_REQUEST:
                raise Problem(422, "too_many_files", f"at most {MAX_FILES_PER_REQUEST} files per request")
            key = None if self.hash_only else incoming_key(self.tenant_id)
            self.writer = _PartWriter(None if self.hash_only else self.storage, key, self.limit)
        elif name not in self.allowed_fields:
            raise Problem(422, "unknown_field", f"unknown form field {name!r}")
        else:
            self.field_name = name

    async def _end_part(self) -> None:
        if self.writer is not None:
            writer = self.writer
            data = await writer.finish(HOLD_BYTES_PER_REQUEST - self.held)
            self.held += len(data or b"")
            filename, ctype = _file_meta(self.headers)
            self.received.files.append(
                ReceivedFile(
                    filename=filename,
                    content_type=ctype,
                    temp_key=writer.key if writer.stored else None,
                    size=writer.size,
                    sha256=writer.sha.hexdigest(),
                    data=data,
                )
            )
            self.writer = None
        elif self.field_name is not None:
            text = bytes(self.field_value).decode("utf-8", errors="replace")
            self.received.fields.setdefault(self.field_name, []).append(text)

    async def abort(self) -> None:
        """Drop the part in progress and every file already written."""
        await _abort(self.writer, self.storage, self.received)


async def receive_multipart(
    request: Request,
    storage: Storage,
    tenant_id: uuid.UUID,
    *,
    allowed_fields: frozenset[str],
    hash_only: bool,
) -> Received:
    """Stream a multipart body: files to S3 temp keys (or only hashed), small form fields kept."""
    limit = get_settings().max_upload_bytes
    check_content_length(request, limit)
    events = _Events()
    parser = MultipartParser(_boundary(request), events.callbacks(), max_header_count=16)  # type: ignore[arg-type]
    parts = _Parts(storage, tenant_id, allowed_fields, hash_only, limit)
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise Problem(400, "invalid_multipart", "the multipart body is malformed") from exc
            for kind, value in events.items:
                await parts.on_event(kind, value)
            events.items.clear()
        parser.finalize()
    except ClientDisconnect:
        await cleanup_quietly_async("the upload in progress", parts.abort)
        raise Problem(400, "client_disconnected", "the client went away during the upload") from None
    except BaseException:
        await cleanup_quietly_async("the upload in progress", parts.abort)
        raise
    if parts.unfinished:
        await cleanup_quietly_async("the upload in progress", parts.abort)
        raise Problem(400, "invalid_multipart", "the multipart body ended in the middle of a part")
    return parts.received


def _file_meta(headers: dict[bytes, bytes]) -> tuple[str | None, str | None]:
    _, params = parse_options_header(headers.get(b"content-disposition", b""))
    ctype = headers.get(b"content-type")
    return clean_filename(params.get(b"filename")), (ctype.decode("latin-1")[:200] if ctype else None)


async def _abort(writer: _PartWriter | None, storage: Storage, received: Received) -> None:
    try:
        if writer is not None:
            await writer.abort()
    finally:  # the files already written are removed even when the part in progress could not be
        keys = [f.temp_key for f in received.files if f.temp_key]
        if keys:
            await run_in_threadpool(delete_keys, storage, keys)


def delete_keys(storage: Storage, keys: list[str]) -> None:
    """Delete these objects (each tried, the first failure raised)."""
    failure: Exception | None = None
    for key in keys:
        try:
            storage.delete(key)
        except Exception as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def cleanup_quietly(what: str, cleanup: Callable[[], None]) -> None:
    """Run a cleanup after a failure (or a finished request); if it fails too, log it (the exception's
    type only: its text can carry URLs and keys) and go on, so the request's own outcome stands."""
    try:
        cleanup()
    except Exception as exc:
        log.warning(
            "upload cleanup failed (%s: %s); the incoming sweep removes temporary leftovers",
            what,
            type(exc).__name__,
        )


async def cleanup_quietly_async(what: str, cleanup: Callable[[], Awaitable[None]]) -> None:
    """`cleanup_quietly` for a coroutine cleanup."""
    try:
        await cleanup()
    except Exception as exc:
        log.warning(
            "upload cleanup failed (%s: %s); the incoming sweep removes temporary leftovers",
            what,
            type(exc).__name__,
        )


def discard(storage: Storage, received: Received) -> None:
    """Delete every temporary object of a request (after a replay or a rejection)."""
    delete_keys(storage, [f.temp_key for f in received.files if f.temp_key])


async def ingest_multipart(
    request: Request,
    tenant_id: uuid.UUID,
    storage: Storage,
    *,
    allowed_fields: frozenset[str],
    finish: Callable[[Received], tuple[int, dict[str, Any]]],
) -> JSONResponse:
    """Stream a multipart upload, then `finish` it (blocking: probe, create jobs), honouring idempotency.

    Shared by `/v1/batches/{id}/files` and `/v1/jobs`. With an `Idempotency-Key` already answered, the
    body is only hashed (nothing is stored) and the first answer is replayed when the hashes match.
    """
    store = IdempotencyStore()
    key = request.headers.get(HEADER)
    replay_of = None
    if key is not None:
        if not valid_key(key):
            raise Problem(400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 ASCII characters")
        begun = await run_in_threadpool(store.begin, tenant_id, key, "POST", request.url.path, None)
        if begun.outcome in (Outcome.IN_PROGRESS, Outcome.MISMATCH):
            status, body = conflict_problem(begun.outcome)
            return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)
        if begun.outcome is Outcome.REPLAY:
            replay_of = begun
    try:
        received = await receive_multipart(
            request, storage, tenant_id, allowed_fields=allowed_fields, hash_only=replay_of is not None
        )
        fingerprint = received.fingerprint(request.url.path)
        if replay_of is not None:
            if replay_of.request_hash != fingerprint:
                status, body = conflict_problem(Outcome.MISMATCH)
                return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)
            return JSONResponse(
                replay_of.body, status_code=replay_of.status or 200, headers={"Idempotent-Replayed": "true"}
            )
        if not received.files:
            await run_in_threadpool(cleanup_quietly, "temporary objects", lambda: discard(storage, received))
            raise Problem(400, "no_files", "send at least one part named `file`")
        status, payload = await run_in_threadpool(finish, received)
        if key is not None:
            await run_in_threadpool(store.complete, tenant_id, key, status, payload, fingerprint)
            key = None
        return JSONResponse(payload, status_code=status)
    finally:
        if key is not None and replay_of is None:
            await run_in_threadpool(store.release, tenant_id, key)
