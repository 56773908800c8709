"""`voxq dev` as a user runs it: a real process tree on free ports, stopped with SIGTERM, started again."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pytest
import redis
from botocore.config import Config

from tests.support import REPO_ROOT, voxq_dev_process, wait_until
from voxq.devstack import SHARED_ENV

START_TIMEOUT = 90.0


@dataclass
class DevRun:
    """One running `voxq dev`: its process, output file and the values it printed."""

    proc: subprocess.Popen[bytes]
    output: Path
    api_port: int
    flower_port: int

    def text(self) -> str:
        """Everything it printed so far."""
        return self.output.read_text(errors="replace")

    def printed(self, label: str) -> str:
        """The value printed after `label` in the summary."""
        match = re.search(rf"^\s+{label}\s+(\S+)", self.text(), re.MULTILINE)
        assert match, f"{label} not printed:\n{self.text()}"
        return match.group(1)


def _dev_env() -> dict[str, str]:
    # No VOXQ_* URL from the outside: `voxq dev` must start every server itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXQ_", "OPENAI_", "FLOWER_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["VOXQ_LOCAL_MODEL_CACHE_DIR"] = str(REPO_ROOT / ".voxq" / "models")
    return env


@contextmanager
def voxq_dev(data_dir: Path, tag: str) -> Iterator[DevRun]:
    """Run `voxq dev` until the with-block ends, then make sure it is gone."""
    output = data_dir.parent / f"voxq-dev-{tag}.out"
    with voxq_dev_process(data_dir, _dev_env(), output) as (proc, api_port, flower_port):
        yield DevRun(proc, output, api_port, flower_port)


def _wait_up(run: DevRun) -> None:
    def up() -> bool:
        assert run.proc.poll() is None, f"voxq dev exited early:\n{run.text()}"
        return "Ctrl-C stops everything" in run.text()

    wait_until(up, timeout=START_TIMEOUT, interval=0.2, what="voxq dev to print its summary")


def _children(pid: int) -> dict[int, str]:
    """Every live descendant of `pid` with its command line."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")).decode()
                except OSError:
                    continue
                frontier.append(child)
    return found


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _listening_addresses(pids: set[int]) -> set[str]:
    """IPv4/IPv6 addresses the given processes accept TCP connections on (from /proc/net/tcp*)."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found: set[str] = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1].rsplit(":", 1)[0])
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _in_session(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[4]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def _batches_status(api: str, key: str) -> int:
    return httpx.get(f"{api}/v1/batches", headers={"Authorization": f"Bearer {key}"}).status_code


def _s3(data_dir: Path, endpoint: str) -> object:
    secrets = data_dir / "secrets"
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=(secrets / "s3_access_key_id").read_text(),
        aws_secret_access_key=(secrets / "s3_secret_access_key").read_text(),
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A scratch dir outside pytest's basetemp: concurrent pytest sessions chmod that to 0700, which
    locks out embedded Postgres' own system user."""
    path = Path(tempfile.mkdtemp(prefix="voxq-e2e-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_voxq_dev_up_healthy_supervised_stopped_and_restarted(work_dir: Path) -> None:
    data_dir = work_dir / "voxq-data"
    marker = f"persist-{time.time_ns()}"

    with voxq_dev(data_dir, "first") as run:
        launched = time.monotonic()

        # The API reports every dependency ok within 30 s of the command starting.
        def healthy() -> bool:
            assert run.proc.poll() is None, f"voxq dev exited early:\n{run.text()}"
            try:
                body = httpx.get(f"http://127.0.0.1:{run.api_port}/healthz", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            return bool(body == {"status": "ok", "checks": {"database": "ok", "redis": "ok", "s3": "ok"}})

        wait_until(healthy, timeout=30, interval=0.2, what="/healthz with database, redis and s3 ok")
        assert time.monotonic() - launched < 30
        _wait_up(run)
        api_key = run.printed("API key")
        assert api_key.startswith("vq_")
        flower_url = run.printed("Flower")
        password = re.search(r"user (\S+) password (\S+)", run.text())
        assert password is not None and password.group(1) == "voxq"
        # Secrets are owner-only files.
        for secret in (data_dir / "secrets").iterdir():
            assert secret.stat().st_mode & 0o077 == 0, f"{secret} readable by others"

        # The dev key is accepted by the API; a wrong one is refused.
        api = f"http://127.0.0.1:{run.api_port}"
        assert (
            httpx.get(f"{api}/v1/batches", headers={"Authorization": f"Bearer {api_key}"}).status_code == 200
        )
        assert httpx.get(f"{api}/v1/batches", headers={"Authorization": "Bearer vq_wrong"}).status_code == 401

        # Flower: basic auth required on its API.
        assert httpx.get(f"{flower_url}/api/workers", timeout=10).status_code == 401
        auth = (password.group(1), password.group(2))
        assert httpx.get(f"{flower_url}/api/workers", auth=auth, timeout=10).status_code == 200
        assert httpx.get(f"{flower_url}/api/workers", auth=("voxq", "wrong"), timeout=10).status_code == 401

        # Both workers answer the health check compose uses.
        health_env = {
            **_dev_env(),
            "VOXQ_REDIS_URL": run.printed("Redis"),
            "VOXQ_DATABASE_URL": run.printed("Postgres"),
        }
        wait_until(
            lambda: (
                subprocess.run(
                    [sys.executable, "-m", "voxq.cli", "worker-health"], env=health_env, timeout=60
                ).returncode
                == 0
            ),
            timeout=60,
            interval=1,
            what="voxq worker-health exit 0",
        )

        # Leave data in S3 and Redis to find after a restart.
        endpoint = run.printed("S3")
        s3 = _s3(data_dir, endpoint)
        s3.put_object(Bucket="voxq-audio", Key=f"dev-test/{marker}", Body=b"kept")  # type: ignore[attr-defined]
        redis.Redis.from_url(run.printed("Redis")).set(marker, "kept")

        # Supervision: a crashed worker is started again (its orphaned pool goes with it).
        children = _children(run.proc.pid)
        worker_pid = next(p for p, cmd in children.items() if "-n worker@%h" in cmd)
        pool = set(_children(worker_pid))
        os.kill(worker_pid, signal.SIGKILL)

        def restarted() -> bool:
            # A direct child: the old worker's pool processes carry the same command line.
            return any(
                "-n worker@%h" in cmd and p != worker_pid and _parent(p) == run.proc.pid
                for p, cmd in _children(run.proc.pid).items()
            )

        wait_until(restarted, timeout=30, what="the worker to be restarted")
        wait_until(lambda: not any(_alive(p) for p in pool), timeout=10, what="the dead worker's pool to go")
        assert "worker exited" in run.text()

        # A crashed Valkey or Postgres is started again too, on the same port and data.
        valkey = next(p for p, cmd in _children(run.proc.pid).items() if "valkey-server" in cmd)
        os.kill(valkey, signal.SIGKILL)
        os.kill(int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        wait_until(healthy, timeout=60, interval=0.5, what="/healthz ok after Valkey and Postgres crashed")
        assert "valkey exited; restarting" in run.text()
        assert "postgres is not answering; restarting" in run.text()
        assert redis.Redis.from_url(run.printed("Redis")).get(marker) == b"kept"
        assert _batches_status(api, api_key) == 200

        # SIGTERM: every child stops, in reverse start order, and nothing is left behind.
        tree = _children(run.proc.pid)

        def postmaster_now() -> int:
            return int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])

        names = {"weed mini", "valkey-server", "uvicorn", "-n worker@%h", "-n local@%h", " beat ", "flower"}
        for name in names:
            assert any(name in cmd for cmd in tree.values()), f"{name} not running under voxq dev"
        # Every server and child listens on loopback only (127.0.0.1 is 0100007F in /proc/net/tcp).
        listening = _listening_addresses(set(tree) | {postmaster_now()})
        assert "0100007F" in listening
        assert listening <= {"0100007F", "00000000000000000000000001000000"}, listening

        # Every child gets the variables compose gives its services.
        for pid, cmd in tree.items():
            if "uvicorn" in cmd or "-n local@%h" in cmd:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                keys = {item.split(b"=", 1)[0].decode() for item in environ if b"=" in item}
                assert set(SHARED_ENV) <= keys, set(SHARED_ENV) - keys
        postmaster = postmaster_now()
        assert _alive(postmaster)
        all_pids = set(tree) | {postmaster}
        for pid in tree:
            all_pids |= set(_children(pid))
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(60) == 0

        def leftovers() -> list[str]:
            return [tree.get(p, str(p)) for p in all_pids if _alive(p)]

        with contextlib.suppress(AssertionError):
            wait_until(lambda: not leftovers(), timeout=10)
        assert leftovers() == []
        assert _in_session(run.proc.pid) == []
        out = run.text()
        order = [
            out.index(f"stopped {name} (") for name in ("flower", "beat", "local-worker", "worker", "api")
        ]
        assert order == sorted(order), out[-600:]

    # A second start on the same data dir finds everything again.
    with voxq_dev(data_dir, "second") as again:
        _wait_up(again)
        assert again.printed("API key") == api_key
        api = f"http://127.0.0.1:{again.api_port}"
        wait_until(
            lambda: httpx.get(f"{api}/healthz", timeout=2).status_code == 200, timeout=30, what="/healthz"
        )
        assert (
            httpx.get(f"{api}/v1/batches", headers={"Authorization": f"Bearer {api_key}"}).status_code == 200
        )
        s3 = _s3(data_dir, again.printed("S3"))
        body = s3.get_object(Bucket="voxq-audio", Key=f"dev-test/{marker}")["Body"].read()  # type: ignore[attr-defined]
        assert body == b"kept"
        assert redis.Redis.from_url(again.printed("Redis")).get(marker) == b"kept"
        assert json.loads((data_dir / "ports.json").read_text())  # ports remembered for stable URLs


def test_second_voxq_dev_on_same_data_dir_is_refused(work_dir: Path) -> None:
    data_dir = work_dir / "voxq-data"
    with voxq_dev(data_dir, "owner") as first:
        _wait_up(first)
        with voxq_dev(data_dir, "intruder") as second:
            assert second.proc.wait(60) == 1
            assert "already running" in second.text()
        assert first.proc.poll() is None
