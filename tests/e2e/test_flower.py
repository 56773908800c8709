"""Flower over HTTP: `voxq flower` behind basic auth against the stack's Redis with a real worker."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from core import names
from tests.support import REPO_ROOT, Stack, celery_worker, stop_process, wait_until
from voxq.embedded import free_port, wait_for_port

USER = "ops"


@pytest.fixture
def flower(stack: Stack) -> Iterator[tuple[str, str]]:
    """(base URL, password) of a `voxq flower` process on a free port."""
    password = "fl-" + secrets.token_urlsafe(16)
    port = free_port()
    log_path = stack.work_dir / f"flower-{port}.log"
    env = stack.child_env(VOXQ_FLOWER_USER=USER, VOXQ_FLOWER_PASSWORD=password)
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    env.pop("FLOWER_BASIC_AUTH", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "voxq.cli", "flower", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, 60, proc=proc)
        yield f"http://127.0.0.1:{port}", password
    finally:
        stop_process(proc, grace=20)
    # Flower's own log never shows the password (it travels in the environment, not argv).
    assert password not in log_path.read_text(errors="replace")


def test_flower_lists_the_worker_with_auth_and_refuses_without(stack: Stack, flower: tuple[str, str]) -> None:
    url, password = flower
    with celery_worker(stack, name="flowerw", queues=names.QUEUE_MAINTENANCE, concurrency=1):
        auth = httpx.BasicAuth(USER, password)

        def listed() -> dict[str, Any] | None:
            response = httpx.get(f"{url}/api/workers", params={"refresh": "1"}, auth=auth, timeout=30)
            assert response.status_code == 200, response.text
            workers: dict[str, Any] = response.json()
            return workers if any(name.startswith("flowerw@") for name in workers) else None

        workers = wait_until(listed, timeout=60, interval=1.0, what="Flower lists the worker")
        (name,) = [n for n in workers if n.startswith("flowerw@")]
        assert names.QUEUE_MAINTENANCE in {q["name"] for q in workers[name].get("active_queues", [])}

        assert httpx.get(f"{url}/api/workers", timeout=10).status_code == 401
        assert (
            httpx.get(f"{url}/api/workers", auth=httpx.BasicAuth(USER, "wrong"), timeout=10).status_code
            == 401
        )
        assert (
            httpx.get(f"{url}/api/workers", auth=httpx.BasicAuth("other", password), timeout=10).status_code
            == 401
        )
        assert httpx.get(f"{url}/", timeout=10).status_code == 401  # the UI too, not only the API

        # A task shows under its readable name, with ids-only arguments.
        from celery import Celery

        producer = Celery("flower-test", broker=stack.redis_url)
        producer.send_task(names.TASK_HEARTBEAT, kwargs={"worker": "probe-7"}, queue=names.QUEUE_MAINTENANCE)
        producer.close()

        def task_seen() -> dict[str, Any] | None:
            tasks: dict[str, Any] = httpx.get(f"{url}/api/tasks", auth=auth, timeout=10).json()
            done = [
                t
                for t in tasks.values()
                if t.get("name") == names.TASK_HEARTBEAT and t.get("state") == "SUCCESS"
            ]
            return done[0] if done else None

        task = wait_until(task_seen, timeout=60, interval=1.0, what="Flower saw the heartbeat task")
        assert "probe-7" in str(task.get("kwargs"))


@pytest.mark.parametrize(
    ("environment", "password", "expected"),
    [
        ("test", "", "VOXQ_FLOWER_PASSWORD"),
        ("test", "changeme", "VOXQ_FLOWER_PASSWORD"),
        ("test", "short", "VOXQ_FLOWER_PASSWORD"),
        ("dev", "", "empty"),
        ("production", "admin", "real secret"),
    ],
)
def test_voxq_flower_refuses_weak_passwords(
    stack: Stack, environment: str, password: str, expected: str
) -> None:
    port = free_port()
    env = stack.child_env(VOXQ_ENVIRONMENT=environment, VOXQ_FLOWER_PASSWORD=password)
    if environment == "production":
        # The other secrets are strong, so only Flower's password is wrong.
        env.update(
            VOXQ_S3_SECRET_ACCESS_KEY="s" * 32, VOXQ_WEBHOOK_SECRET="w" * 32, VOXQ_SECRETS_KEY="k" * 32
        )
    result = subprocess.run(
        [sys.executable, "-m", "voxq.cli", "flower", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    if password:
        assert password not in result.stderr.replace("VOXQ_FLOWER_PASSWORD", "")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
