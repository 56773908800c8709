"""Many concurrent requests against a small DB pool, over real HTTP: every one is answered, none stalls.

Regression test for the P4b closed-loop stall: a sync route's request session held its connection
until after FastAPI had validated the response on the threadpool, so with more requests than threads
every thread waited for a connection held by a request waiting for a thread, until the pool's 30 s
timeout. The server here has 4 connections (pool 2 + 2 overflow) and 8 request threads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.api_helpers import ApiServer, make_key, start_api_server, stop_api_server
from tests.support import Stack

CLIENTS = 60
# Well under SQLAlchemy's 30 s pool timeout: a stalled request fails the test instead of being rescued.
REQUEST_TIMEOUT = 15.0


@pytest.fixture(name="small_pool_api")
def small_pool_api_fixture(stack: Stack) -> Iterator[ApiServer]:
    server = start_api_server(stack, VOXQ_DATABASE_POOL_SIZE="2")
    try:
        yield server
    finally:
        stop_api_server(server)


async def _burst(url: str, key: str, paths: list[str]) -> list[int | str]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=REQUEST_TIMEOUT
    ) as client:

        async def one(path: str) -> int | str:
            try:
                return (await client.get(path)).status_code
            except httpx.TimeoutException:
                return "timeout"

        return list(await asyncio.gather(*(one(p) for p in paths)))


def test_a_burst_larger_than_the_thread_and_db_pools_is_answered(small_pool_api: ApiServer) -> None:
    key = make_key("burst")
    with small_pool_api.client(key) as c:
        batch = c.post("/v1/batches", json={"name": "burst"}).json()["id"]
    # Sync routes with a request session (batch, job list, usage) and the async job read, interleaved.
    kinds = [f"/v1/batches/{batch}", f"/v1/batches/{batch}/jobs", "/v1/usage", "/v1/batches"]
    paths = [kinds[i % len(kinds)] for i in range(CLIENTS)]
    for _ in range(3):  # three bursts back to back: the stall needed only one
        started = time.monotonic()
        statuses = asyncio.run(_burst(small_pool_api.url, key, paths))
        assert statuses == [200] * CLIENTS, statuses
        assert time.monotonic() - started < REQUEST_TIMEOUT
