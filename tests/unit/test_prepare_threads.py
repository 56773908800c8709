"""worker.prepare.run_threaded: every job once, on at most N threads of which the task's thread is one."""

from __future__ import annotations

import threading
import time

import pytest

from worker.prepare import run_threaded


def test_every_item_runs_once_on_at_most_n_threads_including_the_caller() -> None:
    seen: list[int] = []
    threads: set[int] = set()
    lock = threading.Lock()

    def fn(item: int) -> None:
        time.sleep(0.002)  # long enough that every thread gets items
        with lock:
            seen.append(item)
            threads.add(threading.get_ident())

    run_threaded(fn, list(range(60)), 4)
    assert sorted(seen) == list(range(60))
    assert len(threads) <= 4
    # The calling thread takes jobs too (it does not sit waiting on each job's result).
    assert threading.get_ident() in threads


def test_fewer_items_than_threads_starts_no_idle_threads() -> None:
    before = threading.active_count()
    counts: list[int] = []
    run_threaded(lambda _: counts.append(threading.active_count()), [1], 4)
    assert counts == [before]  # one item: it runs on the calling thread, no other thread was started
    run_threaded(lambda _: None, [], 4)


def test_returns_only_after_every_thread_finished() -> None:
    done: list[int] = []

    def fn(item: int) -> None:
        time.sleep(0.05 if item else 0)
        done.append(item)

    run_threaded(fn, [0, 1, 2, 3], 4)
    assert sorted(done) == [0, 1, 2, 3]


def test_an_error_on_the_calling_thread_is_raised_after_the_others_finish() -> None:
    done: list[int] = []
    caller = threading.get_ident()

    def fn(item: int) -> None:
        if threading.get_ident() == caller:
            raise RuntimeError("boom")
        time.sleep(0.02)
        done.append(item)

    with pytest.raises(RuntimeError, match="boom"):
        run_threaded(fn, list(range(8)), 2)
    # The other thread took over the caller's remaining items and was joined before the error came out.
    assert len(done) == 7 and len(set(done)) == 7
