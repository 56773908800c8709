"""Jobs: one-file submit, status, transcript export, attempts, cancel and delete."""

from __future__ import annotations

import json
import uuid
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError

from api import queries, service
from api.accept import accept_files
from api.deps import SessionDep, SessionRoute, StorageDep, TenantContext, TenantDep, run_polled
from api.ingest import Received, cleanup_quietly, discard, ingest_multipart
from api.problems import COMMON_PROBLEMS, UPLOAD_PROBLEMS, Problem, validation_code
from api.schemas import AlignOut, AlignRequest, AttemptList, BatchOptions, JobOut, TranscriptFormat
from api.transcripts import cue_headers, render
from core.statuses import JobStatus
from core.storage import Storage

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=COMMON_PROBLEMS, route_class=SessionRoute)

OPTION_FIELDS = frozenset(BatchOptions.model_fields)
FORM_BOOLEANS = {"true": True, "false": False}

SINGLE_JOB_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string"},
                        "profile": {"type": "string", "enum": ["voicemail", "podcast", "auto"]},
                        "language": {"type": "string"},
                        "prompt": {"type": "string"},
                        "models": {"type": "string", "description": "comma-separated model chain"},
                        "webhook_url": {"type": "string"},
                        "budget_usd": {"type": "string"},
                        "priority": {"type": "string", "enum": ["high", "normal", "low"]},
                        "prefer": {"type": "string", "enum": ["cost", "speed"]},
                        "timestamps": {"type": "string", "enum": ["none", "segment", "word"]},
                        "routing": {"type": "string", "enum": ["chain", "cheapest"]},
                        "diarize": {"type": "string", "enum": ["true", "false"]},
                        "metadata": {"type": "string", "description": "a JSON object"},
                    },
                }
            }
        },
    }
}


@router.post(
    "", status_code=202, response_model=JobOut, openapi_extra=SINGLE_JOB_BODY, responses=UPLOAD_PROBLEMS
)
async def submit_one(request: Request, tenant: TenantDep, storage: StorageDep) -> JSONResponse:
    """Upload one file with the batch options as form fields: a one-file batch, queued at once."""
    return await ingest_multipart(
        request,
        tenant.tenant_id,
        storage,
        allowed_fields=OPTION_FIELDS,
        finish=partial(create_single_job, tenant, storage),
    )


def _options_from_form(fields: dict[str, list[str]]) -> BatchOptions:
    data: dict[str, Any] = {}
    for name, values in fields.items():
        if len(values) != 1 and name != "models":
            raise Problem(422, "validation_error", f"form field {name!r} given more than once")
        if name == "models":
            data[name] = [m.strip() for v in values for m in v.split(",") if m.strip()]
        elif name == "metadata":
            try:
                data[name] = json.loads(values[0])
            except ValueError:
                raise Problem(422, "validation_error", "metadata must be a JSON object") from None
        elif name == "diarize":  # a form field is text: "true"/"false" as the JSON body's booleans
            data[name] = FORM_BOOLEANS.get(values[0], values[0])
        else:
            data[name] = values[0]
    try:
        return BatchOptions.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        code = validation_code([str(e["type"]) for e in exc.errors()])
        raise Problem(422, code, f"{where}: {first['msg']}") from None


def create_single_job(
    tenant: TenantContext, storage: Storage, received: Received
) -> tuple[int, dict[str, Any]]:
    """Create a one-file batch from a multipart `/v1/jobs` request and queue its job (blocking)."""
    try:
        if len(received.files) != 1:
            raise Problem(
                422, "one_file_only", "POST /v1/jobs takes exactly one `file`; use a batch for more"
            )
        options = _options_from_form(received.fields)
        service.check_webhook(options)
    except Problem:
        cleanup_quietly("temporary objects", lambda: discard(storage, received))
        raise
    record = partial(service.record_single_job, tenant, options)
    out, queued = accept_files(storage, tenant.tenant_id, received, record)
    service.enqueue_or_revert(queued, JobStatus.UPLOADED.value)
    return 202, jsonable_encoder(out)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: uuid.UUID, tenant: TenantDep) -> JobOut:
    """A job's status, error, probe results, producing model, attempt count, cost and dedupe link."""
    # The polled endpoint: one hop to the poll thread, one query, the connection back before the answer
    # is built.
    return await run_polled(queries.read_job_out, tenant, job_id)


@router.get(
    "/{job_id}/transcript",
    responses={
        200: {
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "object"}},
                "application/x-subrip": {"schema": {"type": "string"}},
                "text/vtt": {"schema": {"type": "string"}},
            }
        }
    },
)
def get_transcript(
    job_id: uuid.UUID, tenant: TenantDep, session: SessionDep, format: TranscriptFormat = "txt"
) -> Response:
    """The transcript as txt, json, srt or vtt (srt/vtt need timestamps: 409 otherwise).

    srt/vtt answers say where their cues come from in `X-Voxq-Cues` (`aligned`, `partial`, or
    `transcript`: the model's own segments, whole chunks for a text-only model) and the alignment's state
    in `X-Voxq-Alignment`."""
    job = queries.get_job(session, tenant, job_id)
    transcript = queries.find_transcript(session, tenant, job)
    if transcript is None:
        raise Problem(409, "transcript_not_ready", f"the job is {job.status}; no transcript yet")
    body, media_type = render(job, transcript, format)
    if media_type == "application/json":
        return JSONResponse(body)
    headers = cue_headers(transcript) if format in ("srt", "vtt") else None
    return PlainTextResponse(str(body), media_type=media_type, headers=headers)


@router.post("/{job_id}/align", status_code=202, response_model=AlignOut)
def align_job(
    job_id: uuid.UUID, tenant: TenantDep, session: SessionDep, body: AlignRequest | None = None
) -> AlignOut:
    """Time a succeeded job's transcript again (word timestamps and subtitle cues), on the align queue.

    409 `job_not_succeeded` unless the job succeeded. The transcript's alignment is `pending` until the
    align task writes it; the transcript's text never changes."""
    return service.request_alignment(session, tenant, job_id, body.timestamps if body else None)


@router.get("/{job_id}/attempts", response_model=AttemptList)
def list_attempts(job_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> AttemptList:
    """Every provider call made for the job, oldest first, with what each cost."""
    return queries.attempt_list(session, tenant, job_id)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> JobOut:
    """Cancel a job that has not finished (a processing job's worker sees it before writing)."""
    return queries.load_job_out(session, service.cancel_job(session, tenant, job_id))


@router.delete("/{job_id}", status_code=204)
def delete_job(job_id: uuid.UUID, tenant: TenantDep, storage: StorageDep) -> Response:
    """Delete a job's audio and transcript; its row stays (marked deleted) so cost records keep their job.

    Audio shared with another live job of the tenant (same content) stays until that job is deleted too.
    """
    service.delete_job(tenant, storage, job_id)
    return Response(status_code=204)
