"""Accepting received files: probe each, put it at its content key, record its job; all or nothing.

What `api.ingest` received (files held in memory, or at temporary keys `{tenant}/incoming/{uuid}`) is
probed by content (in memory, or by ranged reads of the temporary object), then put at its
content-addressed key `content_key(tenant, sha256)`: a held file is PUT there once, a temporary object is
copied server-side; identical content of a tenant is stored once. Any failure removes what this request
created; a cleanup that fails itself is logged and never replaces the request's first error (the
incoming sweep removes temporary leftovers).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from api.ingest import Received, ReceivedFile, cleanup_quietly, delete_keys, discard
from api.locks import object_locks
from api.probe import ProbeResult, SeekableReader, probe, probe_s3_object
from api.problems import Problem, from_voxq_error
from core.errors import AudioError, EmptyAudio
from core.storage import Storage, content_key

T = TypeVar("T")

# Files of one request probed and copied at once (S3 round trips, not CPU).
ACCEPT_PARALLELISM = 8


@dataclass
class AcceptedFile:
    """A received file that probed as audio and sits at its content key."""

    received: ReceivedFile
    object_key: str
    probe: ProbeResult
    new_object: bool = False  # this request created the object (so a later failure must delete it)


def forget_new_objects(storage: Storage, accepted: list[AcceptedFile]) -> None:
    """Delete the content objects this request created (the database refused the jobs)."""
    delete_keys(storage, [a.object_key for a in accepted if a.new_object])


class _HeldReader(SeekableReader):
    """A seekable read-only view of a held file's buffer (`io.BytesIO` would copy a bytearray whole)."""

    def __init__(self, data: bytearray) -> None:
        super().__init__(len(data))
        self._view = memoryview(data)

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def close(self) -> None:
        self._view.release()
        super().close()


def _probe_one(storage: Storage, tenant_id: uuid.UUID, item: ReceivedFile) -> AcceptedFile:
    """Probe one received file (in memory or at its temporary key) and name its content key."""
    name = item.filename or "a file"
    if item.size == 0 or (item.temp_key is None and item.data is None):
        raise Problem(400, "empty_file", f"{name} is empty")
    try:
        if item.data is not None:
            with _HeldReader(item.data) as held:
                result = probe(held)
        else:
            assert item.temp_key is not None
            result = probe_s3_object(storage.client, storage.bucket, item.temp_key, item.size)
    except EmptyAudio as exc:
        raise Problem(400, "empty_audio", f"{name}: {exc.message}") from exc
    except AudioError as exc:
        problem = from_voxq_error(exc)
        problem.detail = f"{name}: {exc.message}"
        raise problem from exc
    return AcceptedFile(item, content_key(str(tenant_id), item.sha256), result, new_object=False)


def _place(storage: Storage, item: AcceptedFile) -> None:
    """Put a file at its content key unless that object exists (same bytes: nothing to do).

    A held file is PUT there once; a file at a temporary key is copied server-side.
    """
    if storage.head(item.object_key) is not None:
        return
    if item.received.data is not None:
        # The whole file is the body and its SHA-256 is known: SigV4 signs that instead of hashing again.
        assert len(item.received.data) == item.received.size
        storage.upload_bytes(item.received.data, item.object_key, sha256=item.received.sha256)
    else:
        assert item.received.temp_key is not None
        storage.copy(item.received.temp_key, item.object_key)
    item.new_object = True


def _run_all(kind: str, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """Run `fn` over `items` in parallel (S3 round trips); results in order, first failure raised."""
    if len(items) == 1:  # the common one-file request: no pool to start
        return [fn(items[0])]
    results: list[T] = []
    failure: BaseException | None = None
    with ThreadPoolExecutor(
        max_workers=max(1, min(ACCEPT_PARALLELISM, len(items))), thread_name_prefix=kind
    ) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            try:
                results.append(future.result())
            except BaseException as exc:
                failure = failure or exc
    if failure is not None:
        raise failure
    return results


def accept_files(
    storage: Storage, tenant_id: uuid.UUID, received: Received, record: Callable[[list[AcceptedFile]], T]
) -> T:
    """Probe every file, put it at its content key and `record` the jobs; all or nothing.

    The objects' locks are held from "make sure the object is there" to "the jobs using it are
    committed", so a concurrent delete of a job with the same audio cannot remove it in between. Any
    failure removes what this request created. Blocking: call from a worker thread.
    """
    try:
        accepted = _run_all("voxq-probe", partial(_probe_one, storage, tenant_id), received.files)
        with object_locks(a.object_key for a in accepted):
            try:
                _run_all("voxq-place", partial(_place, storage), _first_per_key(accepted))
                return record(accepted)
            except BaseException:
                cleanup_quietly("new content objects", lambda: forget_new_objects(storage, accepted))
                raise
    finally:
        cleanup_quietly("temporary objects", lambda: discard(storage, received))


def _first_per_key(accepted: Sequence[AcceptedFile]) -> list[AcceptedFile]:
    seen: dict[str, AcceptedFile] = {}
    for item in accepted:
        seen.setdefault(item.object_key, item)
    return list(seen.values())
