"""Fixtures: one real server of each kind per test session, flushed around each test.

A server is started here (embedded, under a temp dir) unless its URL is given:
`VOXQ_TEST_DATABASE_URL` (an admin URL; a fresh database is created on it), `VOXQ_TEST_REDIS_URL`,
`VOXQ_TEST_S3_ENDPOINT_URL` (+ `VOXQ_TEST_S3_ACCESS_KEY_ID` / `VOXQ_TEST_S3_SECRET_ACCESS_KEY`).
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Stack

pytest_plugins = ["tests.fakes.fixtures"]

TEST_S3_ACCESS_KEY = "voxq-test-access"
TEST_S3_SECRET_KEY = "voxq-test-secret-" + secrets.token_hex(8)


# Outside the `stack` fixture (which points them at this session's servers), voxq's settings in the test
# process point at no server: port 9 (discard) is closed here, so a connection fails at once instead of
# reaching a server that happens to run on this machine (the defaults name its Redis and Postgres). Child
# processes get the stack's environment (`Stack.child_env`) on top of this.
NOWHERE = {
    "VOXQ_DATABASE_URL": "postgresql+psycopg://voxq@127.0.0.1:9/nowhere",
    "VOXQ_REDIS_URL": "redis://127.0.0.1:9/0",
    "VOXQ_S3_ENDPOINT_URL": "http://127.0.0.1:9",
}


def pytest_configure(config: pytest.Config) -> None:
    """Point this process's default settings at no server (see NOWHERE)."""
    os.environ.update(NOWHERE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier from its folder, so `-m unit` etc. select by tier."""
    for item in items:
        path = str(item.path)
        for tier in ("unit", "integration", "e2e"):
            if f"{os.sep}{tier}{os.sep}" in path:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this session's embedded servers keep their data and logs."""
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def postgres_admin_url(stack_dir: Path) -> Iterator[str]:
    """An admin URL of a real Postgres: the given one, or an embedded server."""
    given = os.environ.get("VOXQ_TEST_DATABASE_URL")
    if given:
        yield given
        return
    from voxq.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(stack_dir / "postgres")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database for this test session, migrated to head."""
    from core.db import upgrade
    from voxq.embedded import create_database

    name = f"voxq_test_{uuid.uuid4().hex[:10]}"
    url = create_database(postgres_admin_url, name)
    upgrade(url)
    try:
        yield url
    finally:
        _drop_quietly(postgres_admin_url, name)


def _drop_quietly(admin_url: str, name: str) -> None:
    """Drop the session database; a server that went away at teardown is not a test failure."""
    import sys
    import time

    from sqlalchemy.exc import OperationalError

    from voxq.embedded import drop_database

    for attempt in range(3):
        try:
            drop_database(admin_url, name)
            return
        except OperationalError as exc:  # e.g. a chaos/devstack test restarted the server just now
            if attempt == 2:
                print(f"could not drop test database {name}: {exc.__class__.__name__}", file=sys.stderr)
                return
            time.sleep(1.0)


@pytest.fixture(scope="session")
def redis_url(stack_dir: Path) -> Iterator[str]:
    """A real Redis/Valkey: the given one, or an embedded Valkey."""
    given = os.environ.get("VOXQ_TEST_REDIS_URL")
    if given:
        yield given
        return
    from voxq.embedded import ValkeyRedis

    server = ValkeyRedis(stack_dir / "valkey")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(stack_dir: Path) -> Iterator[tuple[str, str, str]]:
    """(endpoint, access key, secret key) of a real signature-checking S3: given, or SeaweedFS."""
    given = os.environ.get("VOXQ_TEST_S3_ENDPOINT_URL")
    if given:
        yield (
            given,
            os.environ.get("VOXQ_TEST_S3_ACCESS_KEY_ID", TEST_S3_ACCESS_KEY),
            os.environ.get("VOXQ_TEST_S3_SECRET_ACCESS_KEY", TEST_S3_SECRET_KEY),
        )
        return
    from voxq.embedded import SeaweedS3

    server = SeaweedS3(stack_dir / "seaweedfs", TEST_S3_ACCESS_KEY, TEST_S3_SECRET_KEY)
    server.start()
    try:
        yield server.endpoint_url, TEST_S3_ACCESS_KEY, TEST_S3_SECRET_KEY
    finally:
        server.stop()


@pytest.fixture(scope="session")
def session_stack(
    database_url: str, redis_url: str, s3_server: tuple[str, str, str], stack_dir: Path
) -> Stack:
    """The session's servers, as settings and as the environment child processes get."""
    endpoint, access, secret = s3_server
    return Stack(
        database_url=database_url,
        redis_url=redis_url,
        s3_endpoint_url=endpoint,
        s3_access_key_id=access,
        s3_secret_access_key=secret,
        s3_bucket=f"voxq-test-{uuid.uuid4().hex[:8]}",
        work_dir=stack_dir,
    )


@pytest.fixture
def stack(session_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """The servers, emptied for this test, with this process's settings pointing at them."""
    for key, value in session_stack.env().items():
        monkeypatch.setenv(key, value)
    session_stack.reset_process_state()
    session_stack.truncate_database()
    session_stack.flush_redis()
    session_stack.ensure_bucket()
    yield session_stack
    session_stack.reset_process_state()
