"""Transcription of a group: many jobs at once over one event loop, each through the model chain.

A group task claims its jobs (lease renewed in the background while it runs), then transcribes every job
concurrently; provider calls share the process's httpx client and are bounded by a per-process semaphore
of `VOXQ_MAX_IN_FLIGHT`, so a 2-core host keeps hundreds of requests open. Database and S3 calls run in
threads so they never stall the loop. The task returns once none of its jobs waits for a provider slot
(`start_group`); the rest of the run goes on on the process's loop.

The parts, in the order a job meets them:
- worker.waves: a job's pieces (whole file or chunks) in waves (`VOXQ_CHUNK_CONTEXT`), stitched into its
  transcript;
- worker.chain: one piece through the model chain, every call an attempt;
- worker.policy: what follows each call (retry, next model, split, fail), a pure function.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable

from worker import completion, derived
from worker.chain import ON_SLOT, ChainRunner
from worker.derived import derived_key
from worker.runtime import Runtime
from worker.store.batches import BatchOptions
from worker.store.claims import claim_group_run, extend_leases, finish_group, release_soon
from worker.store.groups import GroupJob
from worker.waves import Drained, transcribe_job

log = logging.getLogger(__name__)

RETRY_AFTER_ERROR_SECONDS = 60.0


async def keep_leases(
    ids: list[uuid.UUID],
    *,
    owner: str,
    group_id: uuid.UUID | None,
    lease_seconds: float,
    every: float | None = None,
) -> None:
    """Renew these jobs' leases (held by `owner` for the run `group_id`) every third of a lease until
    cancelled.

    A renewal that fails (a deadlock Postgres broke, a database outage) is tried again after a tenth of
    the interval rather than ending the loop: a lease left to run out makes the sweeper hand live jobs to
    another worker.
    """
    interval = every if every is not None else max(lease_seconds / 3, 1)
    wait = interval
    while True:
        await asyncio.sleep(wait)
        try:
            await asyncio.to_thread(
                extend_leases, ids, owner=owner, group_id=group_id, lease_seconds=lease_seconds
            )
            wait = interval
        except Exception as exc:
            log.warning("lease renewal of %d job(s) failed (%s); retrying", len(ids), type(exc).__name__)
            wait = interval / 10


class _GroupRun:
    """One run of a group's claimed jobs: every job concurrently, lease renewal, then the group's tail."""

    def __init__(
        self,
        rt: Runtime,
        group_id: uuid.UUID,
        jobs: list[GroupJob],
        batches: dict[uuid.UUID, BatchOptions],
        runner: ChainRunner,
    ) -> None:
        self.rt = rt
        self.group_id = group_id
        self.jobs = jobs
        self.batches = batches
        self.runner = runner
        self.live = len(jobs)  # jobs not ended yet
        self.unslotted = {job.id for job in jobs}  # jobs with no call holding a slot yet, not ended
        self.slotted = asyncio.Event()  # set once `unslotted` is empty
        self.detached = False  # the group's task has returned (`start_group`)
        if not self.unslotted:
            self.slotted.set()

    @classmethod
    async def claim(cls, rt: Runtime, group_id: uuid.UUID) -> _GroupRun | None:
        """Claim the group's processing jobs; None (the group marked done) when there is none."""
        settings = rt.settings
        deadline = time.monotonic() + max(settings.task_time_limit - 90, 60)
        # Jobs and their batches' options in one round trip: the refill path of a freed slot.
        jobs, batches = await asyncio.to_thread(
            claim_group_run, group_id, owner=rt.worker_name, lease_seconds=settings.job_lease_seconds
        )
        if not jobs:
            await asyncio.to_thread(finish_group, group_id)
            return None
        runner = ChainRunner(rt, deadline=deadline)
        runner.audio = await derived.read_many(
            rt, [derived_key(j.tenant_id, j.id) for j in jobs if not j.chunks and not j.answers]
        )
        return cls(rt, group_id, jobs, batches, runner)

    def _slot_taken(self, job_id: uuid.UUID) -> None:
        self.unslotted.discard(job_id)
        if not self.unslotted:
            self.slotted.set()

    def _job_done(self, job_id: uuid.UUID) -> None:
        self._slot_taken(job_id)
        self.live -= 1
        if self.detached:
            self.rt.groups.job_done()

    async def _job(self, job: GroupJob) -> str:
        ON_SLOT.set(lambda: self._slot_taken(job.id))  # this job's task only (its own context)
        try:
            return await transcribe_job(self.rt, self.runner, job, self.batches[job.batch_id], self.group_id)
        finally:
            self._job_done(job.id)

    async def finish(self) -> dict[str, int]:
        """Transcribe every job to its end, then the group's tail; how many ended in each way."""
        rt, jobs, group_id = self.rt, self.jobs, self.group_id
        renewer = asyncio.ensure_future(
            keep_leases(
                [j.id for j in jobs],
                owner=rt.worker_name,
                group_id=group_id,
                lease_seconds=rt.settings.job_lease_seconds,
            )
        )
        try:
            results = await asyncio.gather(*(self._job(job) for job in jobs), return_exceptions=True)
        finally:
            renewer.cancel()
        counts: Counter[str] = Counter()
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                # Left `processing` with a lease ending soon: the sweeper gives it another run (at its
                # next tick for a run its draining process stopped: nothing went wrong with the job).
                drained = isinstance(result, Drained)
                if drained:
                    log.warning("job %s: %s", job.id, result)
                else:
                    log.error("job %s: %s: %s", job.id, type(result).__name__, result)
                counts["drained" if drained else "error"] += 1
                try:
                    await asyncio.to_thread(
                        release_soon,
                        job.id,
                        owner=rt.worker_name,
                        group_id=group_id,
                        after_seconds=0.0 if drained else RETRY_AFTER_ERROR_SECONDS,
                    )
                except Exception:
                    log.exception("could not shorten the lease of job %s", job.id)
            else:
                counts[result] += 1
        # The group's tail: one I/O-thread hop for the batch checks and the group's end, while Redis
        # forgets the FLACs.
        # One batch check per batch of the group, after every job of it here ended (each job skipped its
        # own: its siblings were still live, so the batch could not be done). Handed-off or failed-to-run
        # jobs are still live; the local worker or the sweeper checks when they end.
        # Ended (or handed off, with a copy in S3): their Redis-kept FLACs are no longer needed.
        await asyncio.gather(
            asyncio.to_thread(_finish_group_and_batches, group_id, {j.batch_id for j in jobs}),
            derived.forget(
                rt,
                [
                    derived_key(job.tenant_id, job.id)
                    for job, result in zip(jobs, results, strict=True)
                    if not job.chunks and not isinstance(result, BaseException)
                ],
            ),
        )
        return dict(counts)


async def transcribe_group(rt: Runtime, group_id: uuid.UUID) -> dict[str, int]:
    """Transcribe every still-processing job of a group; returns how many ended in each way."""
    run = await _GroupRun.claim(rt, group_id)
    if run is None:
        return {}
    return await run.finish()


async def start_group(rt: Runtime, group_id: uuid.UUID) -> dict[str, int]:
    """The group task's body: claim the group, start its jobs, and return once none of them waits for a
    provider slot (each holds one, or has ended); the rest of the run (answers, completions, lease
    renewal, the group's tail) goes on on the process's loop while the task's thread claims its next
    group. Returns the counts of a run that ended first, else `{"detached": jobs still running}`.

    The work a process takes on stays bounded: a thread stays with its group until every job of it got a
    slot (so the in-flight semaphore bounds it), and while the detached jobs not ended yet would exceed
    `Runtime.groups.limit` (2 x `VOXQ_MAX_IN_FLIGHT`: jobs backing off between retries hold no slot).
    The jobs keep their leases (renewed until they end), so a process killed after the task returned
    loses nothing: the sweeper re-runs its jobs once their leases run out. The whole run is bounded by the
    task's soft time limit as before (the chain's deadline stops retries earlier); a warm shutdown waits
    for it (`Runtime.close`). With `Runtime.detach_groups` off (a prefork child), the task waits for the
    whole run, as `transcribe_group`.
    """
    soft_limit = max(rt.settings.task_time_limit - 60, 30)
    run = await _GroupRun.claim(rt, group_id)
    if run is None:
        return {}
    task = asyncio.ensure_future(_bounded(run.finish(), soft_limit, group_id))
    rt.groups.track(task)
    try:
        if rt.detach_groups:
            slotted = asyncio.ensure_future(run.slotted.wait())
            try:
                await asyncio.wait({slotted, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                slotted.cancel()
            if not task.done():
                room = asyncio.ensure_future(rt.groups.wait_room(lambda: run.live))
                try:
                    await asyncio.wait({room, task}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    room.cancel()
            if not task.done():
                run.detached = True
                rt.groups.detach(run.live)
                task.add_done_callback(_log_failure)
                return {"detached": run.live}
        return await asyncio.shield(task)
    except BaseException:
        # Interrupted (a soft time limit raised in the task's thread): the run stops, as it always did.
        task.cancel()
        raise


async def _bounded(run: Awaitable[dict[str, int]], seconds: float, group_id: uuid.UUID) -> dict[str, int]:
    try:
        async with asyncio.timeout(seconds):
            return await run
    except TimeoutError:
        log.error(
            "group %s: still running after %.0f s: stopped (the sweeper re-runs its jobs)", group_id, seconds
        )
        raise


def _log_failure(task: asyncio.Task[dict[str, int]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("detached group run failed: %s: %s", type(exc).__name__, exc)


def _finish_group_and_batches(group_id: uuid.UUID, batch_ids: set[uuid.UUID]) -> None:
    completion.finish_batches(batch_ids)
    finish_group(group_id)
