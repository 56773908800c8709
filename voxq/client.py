"""A small Python client for the voxq API (httpx): batches, uploads with progress, status, transcripts, usage.

    with VoxqClient() as voxq:                     # VOXQ_API_URL, VOXQ_API_KEY
        batch = voxq.create_batch(profile="voicemail")
        voxq.upload_files(batch["id"], ["a.wav", "b.mp3"])
        voxq.submit(batch["id"])
        done = voxq.wait(batch["id"])
        print(voxq.transcript(job_id, "srt"))

Files at or above `presign_threshold` go straight to S3 through a presigned PUT; smaller ones are
streamed as multipart (several per request). Nothing is read into memory whole.
"""

from __future__ import annotations

import io
import mimetypes
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_PRESIGN_THRESHOLD = 64 * 1024 * 1024
# Small files share a request (fewer round trips for voicemail-sized audio), up to these bounds.
FILES_PER_REQUEST = 20
BYTES_PER_REQUEST = 64 * 1024 * 1024
TERMINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled", "skipped")
CHUNK = 256 * 1024
# Problem codes that mean "this file is bad" (the others mean the request or the server is).
REJECTED_FILE_CODES = frozenset(
    {"unsupported_media", "empty_file", "empty_audio", "file_too_large", "audio_too_long"}
)

Progress = Callable[[int], None]  # called with the number of bytes just sent


class ApiError(Exception):
    """Raised when the API answers with an error (a problem document)."""

    def __init__(self, status: int, code: str, detail: str, body: Any = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.body = body


class _CountingFile(io.RawIOBase):
    """A read-only view of a file that reports every chunk read (httpx streams multipart through it)."""

    def __init__(self, raw: IO[bytes], progress: Progress | None) -> None:
        super().__init__()
        self._raw = raw
        self._progress = progress

    def readable(self) -> bool:
        """Always readable."""
        return True

    def seekable(self) -> bool:
        """Seekable like the file it wraps (httpx measures the length)."""
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Delegate to the file."""
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        """Delegate to the file."""
        return self._raw.tell()

    def fileno(self) -> int:
        """Delegate to the file."""
        return self._raw.fileno()

    def read(self, size: int = -1) -> bytes:
        """Read and report."""
        data = self._raw.read(size if size and size > 0 else CHUNK)
        if data and self._progress is not None:
            self._progress(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        """Read into a buffer and report."""
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _file_chunks(path: Path, progress: Progress | None) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            if progress is not None:
                progress(len(chunk))
            yield chunk


def content_type_for(path: Path) -> str:
    """A content type guessed from the name (the server decides by content anyway)."""
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


class VoxqClient:
    """A client for one voxq API with one key."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        presign_threshold: int = DEFAULT_PRESIGN_THRESHOLD,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("VOXQ_API_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("VOXQ_API_KEY", "")
        self.presign_threshold = presign_threshold
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        # Presigned URLs point at S3, not at the API: no API key goes there.
        self._s3 = httpx.Client(timeout=timeout, transport=transport)

    def __enter__(self) -> VoxqClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()
        self._s3.close()

    # -- plumbing -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _api_error(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # -- batches ----------------------------------------------------------------------------------

    def create_batch(self, *, idempotency_key: str | None = None, **options: Any) -> dict[str, Any]:
        """Create a batch (`profile`, `language`, `prompt`, `models`, `webhook_url`, `budget_usd`, ...)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {k: v for k, v in options.items() if v is not None}
        result: dict[str, Any] = self._json("POST", "/v1/batches", json=body, headers=headers)
        return result

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        """A batch with counts, progress and cost so far."""
        result: dict[str, Any] = self._json("GET", f"/v1/batches/{batch_id}")
        return result

    def iter_batches(self, status: str | None = None, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every batch of the tenant (optionally of one status), newest first (follows cursors)."""
        params: dict[str, Any] = {"limit": page_size}
        if status:
            params["status"] = status
        yield from self._paginate("/v1/batches", params)

    def iter_jobs(
        self, batch_id: str, status: str | None = None, page_size: int = 200
    ) -> Iterator[dict[str, Any]]:
        """Every job of a batch in upload order, optionally of one status."""
        params: dict[str, Any] = {"limit": page_size}
        if status:
            params["status"] = status
        yield from self._paginate(f"/v1/batches/{batch_id}/jobs", params)

    def _paginate(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            page = self._json("GET", path, params={**params, **({"cursor": cursor} if cursor else {})})
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def submit(self, batch_id: str) -> dict[str, Any]:
        """Queue every uploaded job (and verify presigned uploads)."""
        result: dict[str, Any] = self._json("POST", f"/v1/batches/{batch_id}/submit")
        return result

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """Cancel every unfinished job of the batch."""
        result: dict[str, Any] = self._json("POST", f"/v1/batches/{batch_id}/cancel")
        return result

    def retry_failed(self, batch_id: str) -> dict[str, Any]:
        """Queue the batch's failed jobs again."""
        result: dict[str, Any] = self._json("POST", f"/v1/batches/{batch_id}/retry-failed")
        return result

    def import_objects(self, batch_id: str, s3_uris: Sequence[str]) -> dict[str, Any]:
        """Add audio already in an allowed bucket, by reference."""
        result: dict[str, Any] = self._json(
            "POST", f"/v1/batches/{batch_id}/imports", json={"s3_uris": list(s3_uris)}
        )
        return result

    # -- uploads ----------------------------------------------------------------------------------

    def upload_files(
        self,
        batch_id: str,
        paths: Sequence[str | Path],
        progress: Progress | None = None,
        *,
        skip_rejected: bool = False,
    ) -> list[dict[str, Any]]:
        """Upload files (big ones presigned, small ones several per request); one job per file, in order.

        The server refuses a whole request when one file in it is bad. With `skip_rejected`, the files of
        a refused request are sent again one by one and each bad file comes back as
        `{"id": None, "filename", "status": "rejected", "error": {"code", "message"}}` instead of raising.
        """
        results: dict[int, dict[str, Any]] = {}
        pending: list[tuple[int, Path]] = []
        pending_bytes = 0

        def flush() -> None:
            results.update(self._upload_group(batch_id, pending, progress, skip_rejected))

        for index, raw in enumerate(paths):
            path = Path(raw)
            size = path.stat().st_size
            if size >= self.presign_threshold:
                results[index] = self.upload_presigned(batch_id, path, progress)
                continue
            if pending and (len(pending) >= FILES_PER_REQUEST or pending_bytes + size > BYTES_PER_REQUEST):
                flush()
                pending, pending_bytes = [], 0
            pending.append((index, path))
            pending_bytes += size
        if pending:
            flush()
        return [results[i] for i in range(len(paths))]

    def _upload_group(
        self, batch_id: str, items: Sequence[tuple[int, Path]], progress: Progress | None, skip_rejected: bool
    ) -> dict[int, dict[str, Any]]:
        try:
            jobs = self._upload_multipart(batch_id, items, progress)
            return dict(zip([i for i, _ in items], jobs, strict=True))
        except ApiError as exc:
            if not skip_rejected or exc.code not in REJECTED_FILE_CODES:
                raise
            if len(items) == 1:
                index, path = items[0]
                return {
                    index: {
                        "id": None,
                        "filename": path.name,
                        "status": "rejected",
                        "error": {"code": exc.code, "message": exc.detail},
                    }
                }
        out: dict[int, dict[str, Any]] = {}
        for item in items:  # find the bad file(s): one request each
            out.update(self._upload_group(batch_id, [item], progress, skip_rejected))
        return out

    def upload_file(
        self, batch_id: str, path: str | Path, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Upload one file; returns its job."""
        return self.upload_files(batch_id, [path], progress)[0]

    def _upload_multipart(
        self, batch_id: str, items: Sequence[tuple[int, Path]], progress: Progress | None
    ) -> list[dict[str, Any]]:
        handles = [open(path, "rb") for _, path in items]  # noqa: SIM115 - closed below
        try:
            files = [
                ("file", (path.name, _CountingFile(fh, progress), content_type_for(path)))
                for (_, path), fh in zip(items, handles, strict=True)
            ]
            jobs: list[dict[str, Any]] = self._json("POST", f"/v1/batches/{batch_id}/files", files=files)[
                "jobs"
            ]
            return jobs
        finally:
            for fh in handles:
                fh.close()

    def request_upload(
        self,
        batch_id: str,
        filename: str,
        size: int,
        *,
        sha256: str | None = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        """Ask for a presigned PUT for one file; returns `{job_id, upload_url, headers, expires_at}`."""
        body: dict[str, Any] = {"filename": filename, "bytes": size}
        if sha256:
            body["sha256"] = sha256
        if content_type:
            body["content_type"] = content_type
        result: dict[str, Any] = self._json("POST", f"/v1/batches/{batch_id}/uploads", json=body)
        return result

    def upload_presigned(
        self, batch_id: str, path: str | Path, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Upload a big file straight to S3 through a presigned PUT; verified by the server at submit."""
        path = Path(path)
        size = path.stat().st_size
        slot = self.request_upload(batch_id, path.name, size)
        headers = {**slot.get("headers", {}), "Content-Length": str(size)}
        response = self._s3.put(slot["upload_url"], content=_file_chunks(path, progress), headers=headers)
        if response.status_code >= 300:
            raise ApiError(response.status_code, "presigned_upload_failed", response.text[:500])
        return {
            "id": slot["job_id"],
            "filename": path.name,
            "status": "pending_upload",
            "bytes": size,
            "sha256": None,
        }

    # -- jobs ---------------------------------------------------------------------------------------

    def submit_file(self, path: str | Path, **options: Any) -> dict[str, Any]:
        """Upload one file as its own batch, queued at once (`POST /v1/jobs`)."""
        path = Path(path)
        data = {
            k: (",".join(v) if isinstance(v, list) else str(v)) for k, v in options.items() if v is not None
        }
        with open(path, "rb") as fh:
            result: dict[str, Any] = self._json(
                "POST", "/v1/jobs", files=[("file", (path.name, fh, content_type_for(path)))], data=data
            )
        return result

    def get_job(self, job_id: str) -> dict[str, Any]:
        """A job's status, error, model, attempts and cost."""
        result: dict[str, Any] = self._json("GET", f"/v1/jobs/{job_id}")
        return result

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """Every provider call of a job, with its cost."""
        items: list[dict[str, Any]] = self._json("GET", f"/v1/jobs/{job_id}/attempts")["items"]
        return items

    def transcript(self, job_id: str, fmt: str = "txt") -> str:
        """The transcript as txt, json, srt or vtt (ApiError `timestamps_unavailable` for srt/vtt without)."""
        return self._request("GET", f"/v1/jobs/{job_id}/transcript", params={"format": fmt}).text

    def align(self, job_id: str, timestamps: str | None = None) -> dict[str, Any]:
        """Time a succeeded job's transcript again (`segment` or `word`); its alignment is then pending."""
        body = {"timestamps": timestamps} if timestamps else None
        result: dict[str, Any] = self._json("POST", f"/v1/jobs/{job_id}/align", json=body)
        return result

    def wait_timings(
        self, job_id: str, *, timeout: float = 300.0, poll_seconds: float = 1.0
    ) -> dict[str, Any]:
        """The transcript's `alignment` once it is no longer `pending` (subtitles follow the text by
        seconds), or as it is after `timeout`; `{"status": "none"}` when no timings were asked for."""
        deadline = time.monotonic() + timeout
        while True:
            alignment: dict[str, Any] = self._json(
                "GET", f"/v1/jobs/{job_id}/transcript", params={"format": "json"}
            ).get("alignment") or {"status": "none"}
            if alignment.get("status") != "pending" or time.monotonic() > deadline:
                return alignment
            time.sleep(poll_seconds)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a job that has not finished."""
        result: dict[str, Any] = self._json("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def delete_job(self, job_id: str) -> None:
        """Delete a job's audio and transcript."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    # -- waiting, usage, health -----------------------------------------------------------------------

    def wait(
        self,
        batch_id: str,
        *,
        poll_seconds: float = 2.0,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until every job of the batch is finished; the final batch (TimeoutError after `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.get_batch(batch_id)
            if on_update is not None:
                on_update(batch)
            if is_finished(batch):
                return batch
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} not finished after {timeout}s")
            time.sleep(poll_seconds)

    def usage(
        self, *, start: str | None = None, end: str | None = None, group_by: str = "day"
    ) -> dict[str, Any]:
        """The tenant's cost report (`start`/`end`: ISO dates or datetimes)."""
        params = {"group_by": group_by, **({"from": start} if start else {}), **({"to": end} if end else {})}
        result: dict[str, Any] = self._json("GET", "/v1/usage", params=params)
        return result

    def health(self) -> dict[str, Any]:
        """The API's liveness answer with each dependency's check."""
        result: dict[str, Any] = self._json("GET", "/healthz")
        return result


def is_finished(batch: dict[str, Any]) -> bool:
    """True when the batch has jobs and every one of them is in a terminal status."""
    counts: dict[str, int] = batch.get("counts", {})
    total = int(batch.get("total_jobs", sum(counts.values())))
    done = sum(int(counts.get(s, 0)) for s in TERMINAL_JOB_STATUSES)
    return batch.get("status") == "cancelled" or (total > 0 and done >= total)


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "code" in body:
        return ApiError(response.status_code, str(body["code"]), str(body.get("detail", "")), body)
    return ApiError(response.status_code, "http_error", response.text[:500], body)
