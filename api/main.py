"""The FastAPI app: `create_app()` builds it; `app` is what `uvicorn api.main:app` serves."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI
from sqlalchemy.exc import SQLAlchemyError

from api.guard import RequestGuard
from api.idempotency import IdempotencyMiddleware
from api.metrics import metrics_router
from api.problems import install_problem_handlers
from api.routes import batches, health, jobs, usage, webhooks
from core.db import get_engine
from core.import_grants import check_env_grants
from core.logs import configure_logging
from core.settings import get_settings

log = logging.getLogger(__name__)

# Every router the app serves. Add a module's router here (e.g. api.metrics' `/metrics`).
ROUTERS: list[APIRouter] = [
    health.router,
    batches.router,
    jobs.router,
    usage.router,
    webhooks.router,
    metrics_router(),
]

DESCRIPTION = """voxq ingest API: submit audio in batches, poll status, export transcripts, see costs.

Authenticate with `Authorization: Bearer <key>` (create keys with `voxq keys create --tenant NAME`).
Every error is `application/problem+json` with a stable `code`. POSTs accept an `Idempotency-Key` header.
"""


def warm_db_pool(size: int) -> int:
    """Open up to `size` pooled connections now, so the first burst of requests does not pay for them.

    Returns how many were opened; a database that is down now is not fatal (`/readyz` reports it).
    """
    engine = get_engine()
    opened: list[Any] = []
    try:
        for _ in range(size):
            opened.append(engine.connect())
    except SQLAlchemyError as exc:
        log.warning("database pool warm-up stopped: %s", type(exc).__name__)
    finally:
        for conn in opened:
            conn.close()
    return len(opened)


def check_providers_at_start() -> list[str]:
    """Validate the providers configuration (ConfigError stops the API) and log each retirement warning;
    returns the warnings."""
    from core.providers.retirement import check_providers, utc_today

    warnings = check_providers(get_settings(), utc_today())
    for line in warnings:
        log.warning("model retirement: %s", line)
    return warnings


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    # Sync routes run on anyio's thread pool (40 threads) and each holds a DB connection while it runs.
    # With fewer connections than threads, a burst leaves threads queued on the pool for its whole
    # timeout; as many threads as connections keeps the queue in front of the threads instead.
    check_providers_at_start()
    pool = get_settings().database_pool_size
    anyio.to_thread.current_default_thread_limiter().total_tokens = max(8, 2 * pool)
    # P4b: 100 clients polling a fresh process waited up to ~0.5 s while each request opened its own
    # Postgres connection (pool grows lazily); the pool's steady size is opened at startup instead.
    await anyio.to_thread.run_sync(warm_db_pool, pool)
    freeze_startup_objects()
    yield


def freeze_startup_objects() -> int:
    """Put what startup left alive (modules, classes, caches: ~170K objects) out of the collector's scans.

    P4b: after a large upload one API process ran a full (generation 2) collection every ~1.4 s while
    polled, each ~115 ms over ~210K objects and collecting nothing: a stall for every request in flight
    (p99 62-108 ms, p50 3.5 ms; measured with gc.callbacks). Frozen objects are still freed by reference
    counting; only garbage cycles among them would stay. Once per process (later calls change nothing).
    Returns how many objects are frozen.
    """
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()
    return gc.get_freeze_count()


def create_app() -> FastAPI:
    """A new app with every router, the idempotency middleware and problem+json error handlers."""
    configure_logging()  # one redacting JSON (or human) handler, uvicorn's loggers included
    check_env_grants()  # VOXQ_IMPORT_BUCKETS would let every tenant import every object: dev only
    app = FastAPI(title="voxq", version="0.1.0", description=DESCRIPTION, lifespan=_lifespan)
    for router in ROUTERS:
        app.include_router(router)
    install_problem_handlers(app)
    app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(RequestGuard)  # added last: outermost, before any body is read
    return app


app = create_app()
