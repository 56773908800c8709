"""Errors as RFC 9457 problem documents: `application/problem+json` with a stable `code`, in one place.

Every error the API answers — ours, FastAPI's validation errors, Starlette's 404/405 and unexpected
exceptions — goes through `problem_response`, so clients can branch on `code` alone.
"""

from __future__ import annotations

import logging
import traceback
from http import HTTPStatus
from typing import Any

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import AudioError, EmptyAudio, StorageError, UnsupportedMedia, VoxqError

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:voxq:problem:"

log = logging.getLogger("voxq.api")

# Codes for errors FastAPI/Starlette raise themselves.
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "file_too_large",
    415: "unsupported_media",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}


class ProblemDocument(BaseModel):
    """An error answer (RFC 9457) with voxq's stable `code`."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting problem+json answers for these statuses."""
    schema = {"$ref": "#/components/schemas/ProblemDocument"}
    return {
        status: {
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}},
        }
        for status in statuses
    }


# Sent with 503s: a dependency is briefly unavailable, try again after this many seconds.
RETRY = {"Retry-After": "5"}

# What every authenticated /v1 route can answer besides success.
COMMON_PROBLEMS = problem_responses(400, 401, 404, 409, 422, 503)
UPLOAD_PROBLEMS = problem_responses(413, 415)


class Problem(Exception):
    """Raised by routes to answer with a problem document."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers
        self.extra = extra or {}


def storage_unavailable() -> Problem:
    """The 503 for object storage that is unreachable or failed an operation: try again shortly."""
    return Problem(
        503,
        "storage_unavailable",
        "object storage is unreachable or refused the operation; try again shortly",
        headers=RETRY,
    )


# What the S3 client raises when storage fails: a connection or timeout (botocore), an error answer
# that outlived botocore's retries (ClientError), a managed transfer's failure (boto3).
STORAGE_FAILURES: tuple[type[Exception], ...] = (BotoCoreError, ClientError, Boto3Error)


def not_found(what: str) -> Problem:
    """The 404 for an id that does not exist for this tenant (others' ids look exactly the same)."""
    return Problem(404, "not_found", f"{what} not found")


def problem_body(
    status: int, code: str, detail: str, title: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The JSON body of a problem document."""
    return {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem document response."""
    return JSONResponse(
        jsonable_encoder(problem_body(status, code, detail, title, **extra)),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def from_voxq_error(exc: VoxqError) -> Problem:
    """Translate a core error into the problem the API answers with."""
    if isinstance(exc, EmptyAudio):
        return Problem(400, exc.code, exc.message)
    if isinstance(exc, UnsupportedMedia):
        return Problem(415, exc.code, exc.message)
    if isinstance(exc, AudioError):
        return Problem(422, exc.code, exc.message)
    if isinstance(exc, StorageError):
        return storage_unavailable()
    return Problem(400, exc.code, exc.message)


async def _on_problem(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(
        exc.status, exc.code, exc.detail, title=exc.title, headers=exc.headers, **exc.extra
    )


async def _on_voxq_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, VoxqError)
    return await _on_problem(request, from_voxq_error(exc))


async def _on_storage_failure(request: Request, exc: Exception) -> JSONResponse:
    # Only the type and S3's error code: the message can carry presigned URLs and object keys.
    code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
    log.warning("storage failed on %s %s: %s %s", request.method, request.url.path, type(exc).__name__, code)
    return await _on_problem(request, storage_unavailable())


async def _on_http_exception(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    headers = dict(exc.headers) if exc.headers else None
    return problem_response(exc.status_code, code, detail, headers=headers)


# Validation error types with a code of their own (anything else is `validation_error`).
_VALIDATION_CODES = {
    "extra_forbidden": "unknown_field",
    "model_not_allowed": "model_not_allowed",
    "invalid_timestamps": "invalid_timestamps",
    "invalid_routing": "invalid_routing",
    "invalid_diarize": "invalid_diarize",
}


def validation_code(error_types: list[str]) -> str:
    """The problem code for a failed validation with these error types (pydantic's `type`s)."""
    for error_type, code in _VALIDATION_CODES.items():
        if error_type in error_types:
            return code
    return "validation_error"


async def _on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        for err in exc.errors()
    ]
    code = validation_code([str(e["type"]) for e in errors])
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    return problem_response(
        422, code, f"{where}: {first['msg']}" if where else str(first["msg"]), errors=errors
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The exception's message can carry request data (SQL parameters: prompts, metadata, filenames),
    # so only its type and the stack go to the log.
    stack = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unhandled %s on %s %s\n%s", type(exc).__name__, request.method, request.url.path, stack)
    return problem_response(500, "internal_error", "an unexpected error occurred")


def _with_problem_schema(app: FastAPI) -> None:
    """Add ProblemDocument to the OpenAPI components the `responses` above refer to."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["ProblemDocument"] = ProblemDocument.model_json_schema()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error of `app` a problem document (and document it in the OpenAPI)."""
    _with_problem_schema(app)
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(VoxqError, _on_voxq_error)
    for failure in STORAGE_FAILURES:
        app.add_exception_handler(failure, _on_storage_failure)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
