"""The API's outermost layer: who is calling before any body is read, and a cap on every body.

FastAPI reads (and parses) a JSON body before it resolves a route's dependencies, so without this an
unauthenticated client could make the API read, buffer and parse bodies of any size. `RequestGuard`
answers before reading a byte of the body:

- a `/v1/` request with a body and no valid API key is refused at once: 401 (the key lookup is the
  process's cached one, api.deps.tenant_for_key; the route reuses the answer);
- a body larger than its cap (by `Content-Length`) is refused at once: 413.

Then every body is counted as it streams, whether or not a `Content-Length` announced it (chunked
transfer encoding): a JSON (any non-multipart) body over `VOXQ_MAX_JSON_BODY_BYTES` (1 MiB) is refused
with 413 `body_too_large` before the route sees it (it is read here, at most that much); a multipart
upload over `VOXQ_MAX_UPLOAD_BYTES` plus framing is cut off with 413 `file_too_large` while it streams
(the upload code removes what it stored, as for any failed upload).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.bodies import read_capped
from api.deps import TENANT_SCOPE_KEY, TenantContext, tenant_for_key
from api.ingest import MULTIPART_OVERHEAD_BYTES
from api.problems import PROBLEM_MEDIA_TYPE, problem_body
from core.settings import get_settings

# Paths whose requests need an API key (the rest: health, metrics, docs).
AUTHENTICATED_PREFIX = "/v1/"


class UploadTooLarge(HTTPException):
    """Raised (from `receive`) when a streaming upload passes its request's cap."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"a request may carry at most {limit} bytes (VOXQ_MAX_UPLOAD_BYTES)")


async def _answer(
    send: Send, status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> None:
    import json

    payload = json.dumps(problem_body(status, code, detail)).encode()
    raw = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    # The body was not read: the connection cannot be reused for another request.
    raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def _authenticated(authorization: str) -> TenantContext | None:
    """The tenant of a `Bearer` API key, or None (no key, another scheme, unknown or revoked)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return await tenant_for_key(token.strip())


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


class RequestGuard:
    """Authenticate before reading a body, and cap every body (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        declared = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        if not chunked and (declared is None or declared.strip() in ("", "0")):
            await self.app(scope, receive, send)  # no body to guard
            return
        if scope["path"].startswith(AUTHENTICATED_PREFIX):
            tenant = await _authenticated(headers.get("authorization", ""))
            if tenant is None:
                await _answer(
                    send,
                    401,
                    "unauthorized",
                    "missing, invalid or revoked API key: send `Authorization: Bearer <key>`",
                    {"WWW-Authenticate": 'Bearer realm="voxq"'},
                )
                return
            scope[TENANT_SCOPE_KEY] = tenant
        settings = get_settings()
        multipart = headers.get("content-type", "").lower().startswith("multipart/")
        limit = settings.max_json_body_bytes
        if multipart:
            limit = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await self._too_large(send, multipart, limit)
            return
        if multipart:
            await self.app(scope, _counting(receive, limit), send)
            return
        body = await read_capped(receive, limit)
        if body is None:
            await self._too_large(send, multipart, limit)
            return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _too_large(send: Send, multipart: bool, limit: int) -> None:
        if multipart:
            detail = f"a request may carry at most {limit} bytes (VOXQ_MAX_UPLOAD_BYTES)"
            await _answer(send, 413, "file_too_large", detail)
        else:
            await _answer(send, 413, "body_too_large", f"request bodies are limited to {limit} bytes")


def _counting(receive: Receive, limit: int) -> Receive:
    """`receive` that raises UploadTooLarge once more than `limit` body bytes went through."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise UploadTooLarge(limit)
        return message

    return counted


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` that hands the app the already-read body, then waits for the client as usual."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
