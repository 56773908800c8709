"""Run untrusted media parsing in child processes with a memory and CPU-time cap, reused across files.

FFmpeg parses whatever a tenant uploads. A crafted file that makes a demuxer or decoder allocate
gigabytes or spin must cost one child process, not the API or a worker: `MediaSandbox.run(fn, *args)`
runs `fn` (a module-level function: it is pickled by name) in an idle child of a small pool and returns
its result or re-raises its `VoxqError`. Each child:

- is a fresh interpreter (`subprocess`, not `multiprocessing`: Celery's prefork children may not have
  multiprocessing children), started with this process's `sys.path`: nothing of the parent's threads,
  locks or sockets; it talks over a socket pair (`multiprocessing.connection.Connection`);
- caps its address space (`RLIMIT_AS`) at what it uses after start-up plus `memory_bytes`, so an
  allocation past it fails (MemoryError, FFmpeg's ENOMEM) instead of growing the machine's memory;
- before each call caps its CPU time (`RLIMIT_CPU` soft limit) at what it used so far plus the call's
  `cpu_seconds`: past it the kernel ends the child (SIGXCPU);
- writes no core files (`RLIMIT_CORE` 0) and ends when its parent goes away (its pipe closes).

A child that dies, runs past the call's wall-clock `timeout`, or runs out of memory is replaced, and the
call raises `MediaLimitExceeded` (an AudioError: the API answers 422 `media_limit_exceeded`, a job fails
with that code). Children are reused, so the price of a fresh interpreter is paid once per child, not per
file: a call costs two pipe messages (its arguments and result pickled).

This bounds resources (a decompression bomb, a decoder loop); it is not a boundary against code
execution: the child runs as the same user, with the same environment, and its answers are unpickled.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, ParamSpec, TypeVar

from core.errors import MediaLimitExceeded

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger(__name__)

_START_TIMEOUT = 120.0  # a fresh interpreter importing PyAV and numpy on a loaded host


def _address_space() -> int | None:
    """This process's current virtual size in bytes (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _set_soft(limit_name: int, soft: int) -> None:
    """Lower (or raise up to the hard limit) a soft limit; the hard limit is never touched."""
    _, hard = resource.getrlimit(limit_name)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(limit_name, (soft, hard))


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a plain RuntimeError naming its type (no message: it may
    carry data)."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 (our own bytes, just made)
    except Exception:
        return RuntimeError(f"{type(exc).__module__}.{type(exc).__name__} in the media sandbox")
    return exc


# Run by the child interpreter: the socket's fd is its argument; the first message is what to set up.
_BOOTSTRAP = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "sys.path[:], memory_bytes, warm = conn.recv()\n"
    "from core.sandbox import child_main\n"
    "child_main(conn, memory_bytes, warm)\n"
)


def child_main(conn: Connection, memory_bytes: int, warm: tuple[str, ...]) -> None:
    """A child's loop: receive `(fn, args, kwargs, cpu_seconds)`, run it under the caps, send the outcome."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    for module in warm:
        __import__(module)  # before the memory cap: imports are the child's fixed cost, not a file's
    with contextlib.suppress(ValueError, OSError):
        _set_soft(resource.RLIMIT_CORE, 0)
    base = _address_space()
    if base is not None:
        with contextlib.suppress(ValueError, OSError):
            _set_soft(resource.RLIMIT_AS, base + memory_bytes)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            fn, args, kwargs, cpu_seconds = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        with contextlib.suppress(ValueError, OSError):
            _set_soft(resource.RLIMIT_CPU, int(_cpu_used() + cpu_seconds) + 1)
        try:
            reply: tuple[str, Any] = ("ok", fn(*args, **kwargs))
        except MemoryError:
            reply = ("err", MediaLimitExceeded("the file needs more memory to decode than allowed"))
        except BaseException as exc:
            reply = ("err", _portable(exc))
        try:
            conn.send(reply)
        except MemoryError:
            return  # cannot even answer: the parent sees the child gone
        except (pickle.PicklingError, TypeError, AttributeError):
            conn.send(("err", RuntimeError("the media sandbox could not return its result")))


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    conn: Connection


class MediaSandbox:
    """A pool of up to `processes` capped children (see the module docstring); thread-safe."""

    def __init__(self, *, processes: int, memory_bytes: int, warm: tuple[str, ...] = ()) -> None:
        self.memory_bytes = memory_bytes
        self.warm = warm
        self._slots = threading.BoundedSemaphore(processes)
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._closed = False

    def _start(self) -> _Child:
        parent, theirs = multiprocessing.Pipe(duplex=True)  # a socket pair
        fd = theirs.fileno()
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(fd)], pass_fds=(fd,), stdin=subprocess.DEVNULL
        )
        theirs.close()
        child = _Child(process, parent)
        try:
            parent.send((list(sys.path), self.memory_bytes, self.warm))
            if not parent.poll(_START_TIMEOUT):
                raise RuntimeError("the media sandbox did not start in time")
            parent.recv()  # ("ready", pid)
        except BaseException:
            _stop(child)
            raise
        return child

    def _take(self) -> _Child:
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.process.poll() is None:
                    return child
                _stop(child)
        return self._start()

    def run(self, fn: Callable[P, R], *args: Any, cpu_seconds: float, timeout: float, **kwargs: Any) -> R:
        """`fn(*args, **kwargs)` in a capped child; its VoxqError is raised here, a child that dies or
        overruns raises MediaLimitExceeded."""
        if self._closed:
            raise RuntimeError("the media sandbox is closed")
        with self._slots:
            child = self._take()
            healthy = False
            try:
                child.conn.send((fn, args, kwargs, cpu_seconds))
                if not child.conn.poll(timeout):
                    raise MediaLimitExceeded(f"the file took longer than {timeout:.0f} s to read")
                status, payload = child.conn.recv()
                healthy = True
            except (EOFError, OSError) as exc:
                raise MediaLimitExceeded(
                    "the file needs more memory or CPU time to decode than allowed"
                ) from exc
            finally:
                if healthy:
                    with self._lock:
                        self._idle.append(child)
                else:
                    _stop(child)
        if status == "ok":
            return payload  # type: ignore[no-any-return]
        assert isinstance(payload, BaseException)
        raise payload  # the child's own error (a VoxqError for bad media), as the caller would meet it

    def close(self) -> None:
        """Stop every idle child (busy ones stop when their call returns)."""
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            _stop(child)


def _stop(child: _Child) -> None:
    """End a child now (it may be stuck in C code)."""
    with contextlib.suppress(OSError):
        child.conn.close()
    if child.process.poll() is None:
        child.process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.process.wait(5)


_sandboxes: dict[str, MediaSandbox] = {}
_sandboxes_lock = threading.Lock()
_sandboxes_pid: int | None = None


def shared_sandbox(
    name: str, *, processes: int, memory_bytes: int, warm: tuple[str, ...] = ()
) -> MediaSandbox:
    """This process's sandbox called `name`, made on first use (a forked child makes its own)."""
    global _sandboxes_pid
    with _sandboxes_lock:
        if _sandboxes_pid != os.getpid():
            _sandboxes.clear()  # a fork's copies of the parent's pipes are not ours to use
            _sandboxes_pid = os.getpid()
        sandbox = _sandboxes.get(name)
        if sandbox is None:
            sandbox = _sandboxes[name] = MediaSandbox(
                processes=processes, memory_bytes=memory_bytes, warm=warm
            )
        return sandbox


def close_sandboxes() -> None:
    """Stop this process's sandboxes (tests, shutdown)."""
    with _sandboxes_lock:
        boxes = list(_sandboxes.values()) if _sandboxes_pid == os.getpid() else []
        _sandboxes.clear()
    for box in boxes:
        box.close()
