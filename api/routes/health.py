"""Liveness (`/healthz`, always 200 with each check's result) and readiness (`/readyz`, 503 on a failure).

Besides the dependencies, both report a provider that refused the fleet's API key (core.provider_health)
as `provider:<name>` = "degraded: ...": `/readyz` then answers 200 with status `degraded` (the API still
takes uploads and jobs still finish on the next model or the local engine, so it stays in rotation; the
operator must replace the key).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.problems import problem_response, problem_responses
from api.schemas import HealthOut
from core import db
from core.provider_health import read_auth_failures
from core.settings import get_settings
from core.storage import make_s3_client

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_SECONDS = 2.0
_pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="voxq-health")


def _check_database() -> None:
    db.ping()


def _check_redis() -> None:
    client = redis.Redis.from_url(
        get_settings().redis_url,
        socket_timeout=CHECK_TIMEOUT_SECONDS,
        socket_connect_timeout=CHECK_TIMEOUT_SECONDS,
    )
    try:
        client.ping()
    finally:
        client.close()


def _provider_checks() -> dict[str, str]:
    """`provider:<name>` -> the reason, for each provider whose API key was refused lately (no secret)."""
    client = redis.Redis.from_url(
        get_settings().redis_url,
        socket_timeout=CHECK_TIMEOUT_SECONDS,
        socket_connect_timeout=CHECK_TIMEOUT_SECONDS,
    )
    try:
        return {f"provider:{name}": failure.reason() for name, failure in read_auth_failures(client).items()}
    finally:
        client.close()


def _check_s3() -> None:
    settings = get_settings()
    # Fail fast: one try with short timeouts, so a dead S3 answers within the check's budget.
    client = make_s3_client(settings, connect_timeout=1, read_timeout=2, max_attempts=1)
    client.head_bucket(Bucket=settings.s3_bucket)


CHECKS: dict[str, Callable[[], None]] = {"database": _check_database, "redis": _check_redis, "s3": _check_s3}


def run_checks() -> dict[str, str]:
    """Run every check in parallel; each reports "ok" or a short reason (never a secret)."""
    futures = {name: _pool.submit(check) for name, check in CHECKS.items()}
    providers = _pool.submit(_provider_checks)
    results: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=CHECK_TIMEOUT_SECONDS + 1)
            results[name] = "ok"
        except FutureTimeout:
            results[name] = "error: timed out"
        except Exception as exc:
            results[name] = f"error: {type(exc).__name__}"
    with contextlib.suppress(Exception):  # Redis itself is checked and reported above
        results.update(providers.result(timeout=CHECK_TIMEOUT_SECONDS + 1))
    return results


@router.get("/healthz", response_model=HealthOut, response_model_exclude_none=True)
def healthz() -> HealthOut:
    """Liveness: the process answers; also reports each dependency's check."""
    return HealthOut(status="ok", checks=run_checks())


def retiring_models() -> list[dict[str, object]]:
    """Configured models with a retirement date and the days left (negative: retired, sent nothing)."""
    from core.providers.retirement import retirement_details, utc_today

    return retirement_details(get_settings(), utc_today())


@router.get("/readyz", response_model=HealthOut, responses=problem_responses(503))
def readyz() -> JSONResponse:
    """Readiness: 200 when Postgres, Redis and S3 answer (status `degraded` when a provider refused the API
    key), else a 503 problem naming the failing checks. Details list the configured models that have a
    retirement date, with the days left."""
    checks = run_checks()
    models = retiring_models()
    failing = sorted(name for name, result in checks.items() if result.startswith("error"))
    if failing:
        return problem_response(
            503, "not_ready", f"unavailable: {', '.join(failing)}", checks=checks, models=models
        )
    degraded = any(result.startswith("degraded") for result in checks.values())
    return JSONResponse({"status": "degraded" if degraded else "ok", "checks": checks, "models": models})
