"""A key in steady use is looked up again before its cache entry expires: no request waits for it (P4b)."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy import text

from core.db import get_engine
from tests.api_helpers import make_key, start_api_server, stop_api_server
from tests.support import Stack

TTL = 3.0  # VOXQ_AUTH_CACHE_SECONDS for this server; entries are due for refresh after 0.8 of it


def test_a_polled_key_is_answered_while_its_lookup_would_block(stack: Stack) -> None:
    """Before: the first request after the entry expired looked the key up, and every request of the
    key waited for that lookup (25-80 ms stalls every TTL under P4b's polling). Here any lookup after
    the entry's first TTL would block on a locked api_keys table: the request must not need one."""
    server = start_api_server(stack, VOXQ_AUTH_CACHE_SECONDS=str(TTL))
    try:
        key = make_key("steady")
        with server.client(key, timeout=10) as client:
            assert client.get("/v1/batches").status_code == 200  # looked up and cached
            time.sleep(0.85 * TTL)
            assert client.get("/v1/batches").status_code == 200  # from the entry; refreshed behind it
            time.sleep(0.35 * TTL)  # the first lookup's entry has expired by now
            with get_engine().connect() as conn:
                conn.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))  # lookups block
                try:
                    response = client.get("/v1/batches", timeout=1.5)
                except httpx.TimeoutException:
                    pytest.fail("the request waited for a key lookup")
                finally:
                    conn.rollback()
            assert response.status_code == 200
    finally:
        stop_api_server(server)
