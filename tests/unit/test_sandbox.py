"""The media sandbox: capped child processes, reused; a child that overruns costs itself, not us."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator

import pytest

from core.errors import EmptyAudio, MediaLimitExceeded
from core.sandbox import MediaSandbox


def child_pid() -> int:
    return os.getpid()


def add(a: int, b: int) -> int:
    return a + b


def refuse() -> None:
    raise EmptyAudio("nothing in it")


def allocate(gigabytes: float) -> int:
    block = bytearray(int(gigabytes * 1024**3))  # one allocation past the cap: MemoryError
    return len(block)


def spin() -> None:
    while True:
        pass


def nap(seconds: float) -> None:
    time.sleep(seconds)


@pytest.fixture
def sandbox() -> Iterator[MediaSandbox]:
    box = MediaSandbox(processes=1, memory_bytes=256 * 1024 * 1024)
    yield box
    box.close()


def test_calls_run_in_a_reused_child_and_errors_come_back_as_themselves(sandbox: MediaSandbox) -> None:
    first = sandbox.run(child_pid, cpu_seconds=5, timeout=30)
    assert first != os.getpid()
    assert sandbox.run(add, 2, b=3, cpu_seconds=5, timeout=30) == 5
    with pytest.raises(EmptyAudio, match="nothing in it") as caught:
        sandbox.run(refuse, cpu_seconds=5, timeout=30)
    assert caught.value.code == "empty_audio"
    assert sandbox.run(child_pid, cpu_seconds=5, timeout=30) == first  # the same child all along


def test_memory_past_the_cap_is_refused_and_the_child_lives_on(sandbox: MediaSandbox) -> None:
    first = sandbox.run(child_pid, cpu_seconds=5, timeout=30)
    with pytest.raises(MediaLimitExceeded, match="memory") as caught:
        sandbox.run(allocate, 2.0, cpu_seconds=5, timeout=30)
    assert caught.value.code == "media_limit_exceeded"
    assert sandbox.run(allocate, 0.05, cpu_seconds=5, timeout=30) == int(0.05 * 1024**3)
    assert sandbox.run(child_pid, cpu_seconds=5, timeout=30) == first
    # the cap is the child's: this process may still allocate as before
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY
    assert len(bytearray(300 * 1024 * 1024)) == 300 * 1024 * 1024


def test_cpu_past_the_cap_ends_the_child_and_a_new_one_takes_over(sandbox: MediaSandbox) -> None:
    first = sandbox.run(child_pid, cpu_seconds=5, timeout=30)
    started = time.monotonic()
    with pytest.raises(MediaLimitExceeded):
        sandbox.run(spin, cpu_seconds=1, timeout=60)
    assert time.monotonic() - started < 20  # the kernel stopped it near 1 s of CPU, not the 60 s timeout
    second = sandbox.run(child_pid, cpu_seconds=5, timeout=30)
    assert second != first
    # the CPU cap is per call: a child that used CPU before still gets its full budget next time
    assert sandbox.run(add, 1, 1, cpu_seconds=5, timeout=30) == 2


def test_a_call_past_its_wall_clock_timeout_is_cut_off(sandbox: MediaSandbox) -> None:
    started = time.monotonic()
    with pytest.raises(MediaLimitExceeded, match="longer than"):
        sandbox.run(nap, 30.0, cpu_seconds=5, timeout=1.0)
    assert time.monotonic() - started < 10
    assert sandbox.run(add, 2, 2, cpu_seconds=5, timeout=30) == 4
