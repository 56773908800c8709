"""`worker.runtime.GroupRuns`: how many detached jobs a process lets run, and what a shutdown waits for."""

from __future__ import annotations

import asyncio

from worker.runtime import GroupRuns


def test_a_group_detaches_only_while_the_detached_jobs_stay_within_the_limit() -> None:
    async def scenario() -> None:
        runs = GroupRuns(limit=6)
        assert runs.has_room(50)  # nothing detached: any one group may go
        runs.detach(4)
        assert runs.has_room(2) and not runs.has_room(3)
        waiting = asyncio.ensure_future(runs.wait_room(lambda: 3))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # 4 + 3 > 6: the thread stays with its group
        runs.job_done()
        await asyncio.sleep(0.01)
        assert waiting.done()  # 3 + 3 fits
        assert runs.detached_jobs == 3

    asyncio.run(scenario())


def test_a_cancelled_wait_for_room_leaves_no_waiter_behind() -> None:
    async def scenario() -> None:
        runs = GroupRuns(limit=1)
        runs.detach(1)
        waiting = asyncio.ensure_future(runs.wait_room(lambda: 1))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert runs._waiters == []

    asyncio.run(scenario())


def test_drain_waits_for_every_tracked_run() -> None:
    async def scenario() -> list[str]:
        runs = GroupRuns(limit=4)
        ended: list[str] = []

        async def run(name: str, seconds: float) -> None:
            await asyncio.sleep(seconds)
            ended.append(name)

        runs.track(asyncio.ensure_future(run("slow", 0.1)))
        runs.track(asyncio.ensure_future(run("fast", 0.01)))
        await runs.drain()
        assert not runs.runs
        return ended

    assert asyncio.run(scenario()) == ["fast", "slow"]
