"""The FastAPI app: `create_app()` builds it; `app` is what `uvicorn api.main:app` serves."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from api.idempotency import IdempotencyMiddleware
from api.problems import install_problem_handlers
from api.routes import batches, health, jobs, usage
from core.logging import configure_logging
from core.observability import metrics_router

# Every router the app serves. Add a module's router here (e.g. observability's `/metrics`).
ROUTERS: list[APIRouter] = [
    health.router,
    batches.router,
    jobs.router,
    usage.router,
    metrics_router(),
]

DESCRIPTION = """voxq ingest API: submit audio in batches, poll status, export transcripts, see costs.

Authenticate with `Authorization: Bearer <key>` (create keys with `voxq keys create --tenant NAME`).
Every error is `application/problem+json` with a stable `code`. POSTs accept an `Idempotency-Key` header.
"""


def create_app() -> FastAPI:
    """A new app with every router, the idempotency middleware and problem+json error handlers."""
    configure_logging()  # one redacting JSON (or human) handler, uvicorn's loggers included
    app = FastAPI(title="voxq", version="0.1.0", description=DESCRIPTION)
    for router in ROUTERS:
        app.include_router(router)
    install_problem_handlers(app)
    app.add_middleware(IdempotencyMiddleware)
    return app


app = create_app()
