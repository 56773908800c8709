"""The embedded development stack behind `voxq dev` and `voxq demo`.

Starts SeaweedFS, Valkey and Postgres (each only when no URL for it is configured), migrates, ensures
the bucket and a dev API key, then runs the API, two Celery workers, beat and Flower as supervised child
processes on 127.0.0.1. Everything lives under one data directory, so a second start finds the same data,
ports, secrets and API key again. Children get the same `VOXQ_*` variables docker-compose passes.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydantic import SecretStr

from core import names
from core.errors import ConfigError
from voxq.embedded import (
    HOST,
    EmbeddedPostgres,
    SeaweedS3,
    ValkeyRedis,
    free_port,
    port_is_free,
    wait_for_port,
)

DEV_DATABASE = "voxq"
DEV_TENANT = "dev"
# The general worker consumes these in this order; `local` and `align` get their own worker (CPU-heavy,
# few slots).
WORKER_QUEUES = (
    names.QUEUE_INGEST_HIGH,
    names.QUEUE_TRANSCRIBE_HIGH,
    names.QUEUE_INGEST,
    names.QUEUE_TRANSCRIBE,
    names.QUEUE_TRANSCRIBE_LOW,
    names.QUEUE_MAINTENANCE,
    names.QUEUE_WEBHOOKS,
)
# The local worker: the offline model's transcriptions and the align stage (both CPU work on that model).
LOCAL_WORKER_QUEUES = f"{names.QUEUE_LOCAL},{names.QUEUE_ALIGN}"
# What docker-compose gives every voxq service (its `x-voxq-env`); `voxq dev` gives its children the same
# names, so both recipes run the same code the same way (tests/unit/test_compose.py keeps them equal).
SHARED_ENV = (
    "VOXQ_ENVIRONMENT",
    "VOXQ_DATABASE_URL",
    "VOXQ_REDIS_URL",
    "VOXQ_S3_ENDPOINT_URL",
    "VOXQ_S3_BUCKET",
    "VOXQ_S3_REGION",
    "VOXQ_S3_ACCESS_KEY_ID",
    "VOXQ_S3_SECRET_ACCESS_KEY",
    "VOXQ_IMPORT_BUCKETS",
    "VOXQ_SECRETS_KEY",
    "VOXQ_WEBHOOK_SECRET",
    "VOXQ_METRICS_TOKEN",
    "VOXQ_FLOWER_USER",
    "VOXQ_FLOWER_PASSWORD",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "VOXQ_PRIMARY_MODEL",
    "VOXQ_FALLBACK_MODELS",
    "VOXQ_LOCAL_CONCURRENCY",
    "VOXQ_LOCAL_MODEL_CACHE_DIR",
    "VOXQ_DATA_DIR",
    "VOXQ_LOG_FORMAT",
    "VOXQ_LOG_LEVEL",
)
CHILD_STOP_TIMEOUT = 20.0
BACKOFF_MAX_SECONDS = 30.0
HEALTHY_RUN_SECONDS = 30.0  # a child that ran this long before dying restarts without backoff
# Telemetry off in every child (huggingface_hub is pulled in by the local engine).
TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies, so nothing is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _stop_postmaster(pg_dir: Path, timeout: float = 30.0) -> None:
    """Fast-shutdown the Postgres of `pg_dir` by its pid file (pg_ctl daemonized it: in no child's group)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((pg_dir / "postmaster.pid").read_text().splitlines()[0])
        if str(pg_dir).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return  # a stale file whose pid now belongs to someone else
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def _answers(port: int | None) -> bool:
    """True when something accepts connections on 127.0.0.1:port."""
    if port is None:
        return False
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _env_value(value: object) -> str:
    """A setting's value as the environment variable that sets it."""
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def write_secret(path: Path, value: str) -> None:
    """Write a secret file readable by its owner only (0600 from the first byte)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    path.chmod(0o600)


def read_or_create_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret stored at `path`, created with `make()` on first use."""
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    value = make()
    write_secret(path, value)
    return value


@dataclass
class Child:
    """A supervised process: own session (so its whole group can be stopped), log file, restart state."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    restarts: int = 0

    def start(self) -> None:
        """Start the process, appending its output to its log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # only a prctl call between fork and exec
            )
        self.started_at = time.monotonic()
        self.restart_at = None

    @property
    def pid(self) -> int | None:
        """The process id, when started."""
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = CHILD_STOP_TIMEOUT) -> None:
        """SIGTERM to the child's process group (warm shutdown), SIGKILL to the group after `timeout`."""
        self.restart_at = None
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        # Grandchildren (prefork pool, uvicorn workers) must not outlive the group leader.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


@dataclass
class DevInfo:
    """What a running dev stack offers: URLs and the credentials to use them."""

    data_dir: Path
    api_url: str
    flower_url: str
    flower_user: str
    flower_password: str
    api_key: str
    database_url: str
    redis_url: str
    s3_endpoint_url: str
    s3_bucket: str
    log_dir: Path
    embedded: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """Human-readable summary (for the terminal only: it contains the dev credentials)."""
        from sqlalchemy.engine import make_url

        db = make_url(self.database_url).render_as_string(hide_password=True)
        return "\n".join(
            [
                f"voxq dev is up — data in {self.data_dir}",
                f"  API       {self.api_url}   (docs {self.api_url}/docs, health {self.api_url}/healthz)",
                f"  Flower    {self.flower_url}   user {self.flower_user} password {self.flower_password}",
                f"  S3        {self.s3_endpoint_url}   bucket {self.s3_bucket}",
                f"  Postgres  {db}",
                f"  Redis     {self.redis_url}",
                f"  API key   {self.api_key}",
                f"  Logs      {self.log_dir}",
                f"  Embedded  {', '.join(self.embedded) or 'none (all URLs configured)'}",
                "",
                f"  export VOXQ_API_URL={self.api_url} VOXQ_API_KEY={self.api_key}",
            ]
        )


class DevStack:
    """The whole stack under one data directory: `start()`, `supervise_once()` in a loop, `stop()`."""

    def __init__(
        self,
        data_dir: Path | str = ".voxq",
        *,
        api_port: int = 8000,
        flower_port: int = 5555,
        env: Mapping[str, str] | None = None,
        say: Callable[[str], None] | None = None,
        with_flower: bool = True,
        with_beat: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.api_port = api_port or free_port()  # 0: any free port
        self.flower_port = flower_port or free_port()
        self.base_env = dict(os.environ if env is None else env)
        self.say = say or (lambda msg: print(msg, flush=True))
        self.with_flower = with_flower
        self.with_beat = with_beat
        self.log_dir = self.data_dir / "logs"
        self.secrets_dir = self.data_dir / "secrets"
        self.env: dict[str, str] = {}
        self.children: list[Child] = []
        self.s3: SeaweedS3 | None = None
        self.redis: ValkeyRedis | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.info: DevInfo | None = None
        self._lock_file: IO[str] | None = None
        self._stopping = threading.Event()
        self._next_postgres_check = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, *, wait_timeout: float = 60.0) -> DevInfo:
        """Bring everything up; on any failure, stop what was started and re-raise."""
        try:
            return self._start(wait_timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, wait_timeout: float) -> DevInfo:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self.secrets_dir.mkdir(exist_ok=True)
        self.secrets_dir.chmod(0o700)
        self._take_lock()
        self._reap_leftovers()
        wanted = [("API", self.api_port)] + ([("Flower", self.flower_port)] if self.with_flower else [])
        for what, port in wanted:
            if not port_is_free(port):
                raise ConfigError(f"port {port} for the {what} is in use: pass another port")
        self.env = self._base_child_env()
        embedded = self._start_servers()
        self._check_stop()
        self._activate_env()
        self._prepare()
        api_key = self._dev_api_key()
        self._check_stop()
        self._start_children()
        self._wait_ready(wait_timeout)
        self._check_stop()
        self.info = DevInfo(
            data_dir=self.data_dir,
            api_url=f"http://{HOST}:{self.api_port}",
            flower_url=f"http://{HOST}:{self.flower_port}",
            flower_user=self.env["VOXQ_FLOWER_USER"],
            flower_password=self.env["VOXQ_FLOWER_PASSWORD"],
            api_key=api_key,
            database_url=self.env["VOXQ_DATABASE_URL"],
            redis_url=self.env["VOXQ_REDIS_URL"],
            s3_endpoint_url=self.env["VOXQ_S3_ENDPOINT_URL"],
            s3_bucket=self.env["VOXQ_S3_BUCKET"],
            log_dir=self.log_dir,
            embedded=embedded,
        )
        return self.info

    def _check_stop(self) -> None:
        if self._stopping.is_set():  # SIGTERM/Ctrl-C while starting: unwind what is up
            raise KeyboardInterrupt

    def stop(self) -> None:
        """Stop children in reverse start order, then the embedded servers in reverse order."""
        self._stopping.set()
        for child in reversed(self.children):
            if child.alive():
                began = time.monotonic()
                child.stop()
                self.say(f"stopped {child.name} ({time.monotonic() - began:.1f}s)")
            child.stop()
        for server in (self.postgres, self.redis, self.s3):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        if self.postgres is not None:
            # pg_ctl can fail (e.g. someone tightened a parent folder's mode): stop it by its pid file.
            _stop_postmaster(self.postgres.data_dir)
        self.postgres = self.redis = self.s3 = None
        self._write_pids()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> DevStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- supervision -----------------------------------------------------------------------------

    def supervise_once(self) -> None:
        """Restart children that died, with exponential backoff for ones that keep dying."""
        now = time.monotonic()
        for child in self.children:
            if self._stopping.is_set():
                return
            if child.alive():
                if now - child.started_at > HEALTHY_RUN_SECONDS:
                    child.failures = 0
                continue
            if child.restart_at is None:
                code = child.proc.returncode if child.proc else None
                if child.proc is not None:
                    # What the dead leader left in its group (e.g. prefork pool processes) goes too.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(child.proc.pid, signal.SIGKILL)
                if now - child.started_at > HEALTHY_RUN_SECONDS:
                    child.failures = 0
                delay = min(BACKOFF_MAX_SECONDS, 2.0**child.failures) if child.failures else 0.5
                child.failures += 1
                child.restart_at = now + delay
                self.say(
                    f"{child.name} exited (code {code}); restarting in {delay:.1f}s, log {child.log_path}"
                )
            elif now >= child.restart_at:
                child.restarts += 1
                child.start()
                self._write_pids()
        for server in (self.s3, self.redis):
            if server is not None and server.process is not None and not server.process.alive():
                self.say(f"{server.process.name} exited; restarting")
                server.start()
                self._write_pids()
        if self.postgres is not None and now >= self._next_postgres_check:
            # pg_ctl daemonized Postgres (it is not our child): check that its port still answers.
            self._next_postgres_check = now + 5.0
            if not _answers(self.postgres.port):
                self.say("postgres is not answering; restarting")
                _stop_postmaster(self.postgres.data_dir)  # if it hangs rather than died
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.postgres.start()

    def run(self, poll_seconds: float = 0.5) -> None:
        """Supervise until `request_stop()` (a signal handler calls it), then stop everything."""
        try:
            while not self._stopping.wait(poll_seconds):
                self.supervise_once()
        finally:
            self.stop()

    def request_stop(self) -> None:
        """Ask `run()` to return (safe from a signal handler)."""
        self._stopping.set()

    # -- steps -----------------------------------------------------------------------------------

    def _take_lock(self) -> None:
        self._lock_file = open(self.data_dir / "dev.lock", "w")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_file.close()
            self._lock_file = None
            raise ConfigError(f"another voxq dev is already running on {self.data_dir}") from exc
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    def _pids_path(self) -> Path:
        return self.data_dir / "pids.json"

    def _write_pids(self) -> None:
        if self._lock_file is None:
            return  # the data dir belongs to another run
        pids = [c.pid for c in self.children if c.alive() and c.pid]
        for server in (self.s3, self.redis):
            if server is not None and server.process is not None and server.process.alive():
                assert server.process.proc is not None
                pids.append(server.process.proc.pid)
        with contextlib.suppress(OSError):
            self._pids_path().write_text(json.dumps(pids))

    def _reap_leftovers(self) -> None:
        """Stop servers a previous run left behind (it was SIGKILLed): ours only, by data dir."""
        path = self._pids_path()
        if path.exists():
            with contextlib.suppress(ValueError, OSError):
                for pid in json.loads(path.read_text()):
                    cmdline = Path(f"/proc/{int(pid)}/cmdline")
                    with contextlib.suppress(OSError):
                        if str(self.data_dir).encode() in cmdline.read_bytes():
                            os.killpg(int(pid), signal.SIGKILL)
            path.unlink(missing_ok=True)
        _stop_postmaster(self.data_dir / "postgres")

    def _saved_ports(self) -> dict[str, int]:
        path = self.data_dir / "ports.json"
        try:
            data = json.loads(path.read_text())
            return {str(k): int(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_port(self, name: str, port: int) -> None:
        ports = self._saved_ports()
        ports[name] = port
        (self.data_dir / "ports.json").write_text(json.dumps(ports))

    def _base_child_env(self) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(TELEMETRY_OFF)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("VOXQ_ENVIRONMENT", "dev")
        env["VOXQ_DATA_DIR"] = str(self.data_dir)
        # The joined model weights are big: share them per checkout (settings' default), not per data dir.
        from core.settings import Settings

        default_cache = str(Settings.model_fields["local_model_cache_dir"].default)
        env.setdefault("VOXQ_LOCAL_MODEL_CACHE_DIR", str(Path(default_cache).resolve()))
        env.setdefault("VOXQ_LOG_FORMAT", "human")
        env["VOXQ_API_HOST"] = HOST
        env["VOXQ_API_PORT"] = str(self.api_port)
        env.setdefault("VOXQ_FLOWER_USER", "voxq")
        if not env.get("VOXQ_FLOWER_PASSWORD"):
            env["VOXQ_FLOWER_PASSWORD"] = read_or_create_secret(
                self.secrets_dir / "flower_password", lambda: secrets.token_urlsafe(18)
            )
        if not env.get("OPENAI_API_KEY") and not env.get("VOXQ_OPENAI_API_KEY"):
            # No hosted provider: the offline model is the whole chain (unless chosen explicitly).
            env.setdefault("VOXQ_PRIMARY_MODEL", names.LOCAL_MODEL)
            env.setdefault("VOXQ_FALLBACK_MODELS", "")
        env.pop("FLOWER_UNAUTHENTICATED_API", None)
        return env

    def _start_servers(self) -> list[str]:
        """Start the servers no URL was given for; return their names."""
        started: list[str] = []
        saved = self._saved_ports()
        if not self.base_env.get("VOXQ_S3_ENDPOINT_URL"):
            access = read_or_create_secret(
                self.secrets_dir / "s3_access_key_id", lambda: "voxq-" + secrets.token_hex(8)
            )
            secret = read_or_create_secret(
                self.secrets_dir / "s3_secret_access_key", lambda: secrets.token_urlsafe(32)
            )
            base = saved.get("s3")
            if base is not None and not all(port_is_free(p) for p in SeaweedS3.ports(base)):
                base = None
            self.s3 = SeaweedS3(self.data_dir / "seaweedfs", access, secret, port=base)
            self.say(f"starting SeaweedFS S3 on {self.s3.endpoint_url}")
            self.s3.start()
            self._save_port("s3", self.s3.port)
            self.env["VOXQ_S3_ENDPOINT_URL"] = self.s3.endpoint_url
            self.env["VOXQ_S3_ACCESS_KEY_ID"] = access
            self.env["VOXQ_S3_SECRET_ACCESS_KEY"] = secret
            started.append("seaweedfs")
        if not self.base_env.get("VOXQ_REDIS_URL"):
            port = saved.get("redis")
            if port is not None and not port_is_free(port):
                port = None
            self.redis = ValkeyRedis(self.data_dir / "valkey", port=port, persist=True)
            self.say(f"starting Valkey on {self.redis.url}")
            self.redis.start()
            self._save_port("redis", self.redis.port)
            self.env["VOXQ_REDIS_URL"] = self.redis.url
            started.append("valkey")
        if not self.base_env.get("VOXQ_DATABASE_URL"):
            from voxq.embedded import create_database

            self.postgres = EmbeddedPostgres(self.data_dir / "postgres")
            self.say("starting Postgres")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
                self.postgres.start()
            self.env["VOXQ_DATABASE_URL"] = create_database(self.postgres.url, DEV_DATABASE)
            started.append("postgres")
        self._write_pids()
        return started

    def _activate_env(self) -> None:
        """Point this process's settings at the stack too (migrations, dev key, the demo client)."""
        from core.db import dispose_engine
        from core.settings import get_settings, reset_settings_cache

        for key in [k for k in os.environ if k.startswith("VOXQ_")]:
            if key not in self.env:
                del os.environ[key]
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("VOXQ_")})
        reset_settings_cache()
        dispose_engine()
        settings = get_settings()
        for key in SHARED_ENV:
            if key not in self.env:
                self.env[key] = _env_value(getattr(settings, key.removeprefix("VOXQ_").lower()))

    def _prepare(self) -> None:
        from core.db import upgrade
        from core.storage import Storage

        self.say("migrating the database (alembic upgrade head)")
        upgrade(self.env["VOXQ_DATABASE_URL"])
        Storage().ensure_bucket()

    def _dev_api_key(self) -> str:
        """The dev tenant's key: the saved one while it still authenticates, else a new one."""
        from core.auth import authenticate, create_key
        from core.db import session_scope

        path = self.secrets_dir / "dev_api_key"
        saved = path.read_text().strip() if path.exists() else ""
        with session_scope() as session:
            if saved and authenticate(session, saved) is not None:
                return saved
            issued = create_key(session, DEV_TENANT, "voxq dev")
        write_secret(path, issued.plaintext)
        return issued.plaintext

    def _celery(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "worker.app", *args]

    def _start_children(self) -> None:
        from core.settings import get_settings

        settings = get_settings()
        specs: list[tuple[str, list[str]]] = [
            (
                "api",
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "api.main:app",
                    "--host",
                    HOST,
                    "--port",
                    str(self.api_port),
                    "--no-access-log",
                ],
            ),
            (
                "worker",
                self._celery("worker", "-E", "-Q", ",".join(WORKER_QUEUES), "-n", "worker@%h", "-l", "INFO"),
            ),
            (
                "local-worker",
                self._celery(
                    "worker",
                    "-E",
                    "-Q",
                    LOCAL_WORKER_QUEUES,
                    "-c",
                    str(max(1, settings.local_concurrency)),
                    "-n",
                    "local@%h",
                    "-l",
                    "INFO",
                ),
            ),
        ]
        if self.with_beat:
            specs.append(
                (
                    "beat",
                    self._celery(
                        "beat",
                        "-s",
                        str(self.data_dir / "celerybeat-schedule"),
                        "--pidfile",
                        str(self.data_dir / "celerybeat.pid"),
                        "-l",
                        "INFO",
                    ),
                )
            )
        if self.with_flower:
            specs.append(
                (
                    "flower",
                    # `voxq flower` checks the password and execs Flower with FLOWER_BASIC_AUTH set.
                    [
                        sys.executable,
                        "-m",
                        "voxq.cli",
                        "flower",
                        "--address",
                        HOST,
                        "--port",
                        str(self.flower_port),
                    ],
                )
            )
        (self.data_dir / "celerybeat.pid").unlink(missing_ok=True)  # stale after a crash
        for name, args in specs:
            child = Child(name, args, self.log_dir / f"{name}.log", dict(self.env))
            self.say(f"starting {name}")
            child.start()
            self.children.append(child)
        self._write_pids()

    def _wait_ready(self, timeout: float) -> None:
        by_name = {c.name: c for c in self.children}
        ports = [(name, port) for name, port in (("api", self.api_port), ("flower", self.flower_port))]
        for name, port in ports:
            if name not in by_name:
                continue  # Flower is optional (the demo runs without it)
            log = by_name[name].log_path
            deadline = time.monotonic() + timeout
            while True:
                self._check_stop()
                try:
                    wait_for_port(port, 1.0, proc=by_name[name].proc)
                    break
                except TimeoutError as exc:
                    if time.monotonic() > deadline:
                        raise ConfigError(f"{name} did not start: {exc}; see {log}") from exc
                except RuntimeError as exc:  # it exited
                    raise ConfigError(f"{name} did not start: {exc}; see {log}") from exc


def install_stop_handlers(stack: DevStack) -> None:
    """SIGTERM and SIGINT (Ctrl-C) make `stack.run()` stop everything in order."""

    def handler(signum: int, _frame: object) -> None:
        stack.request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
