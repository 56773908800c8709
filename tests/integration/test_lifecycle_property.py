"""The lifecycle property test (issue #16): a hypothesis state machine over the real stack whose rules are
the operations that race in production, with every invariant checked after every step and a drain at
the end of each example (tests/lifecycle_world.py has the world, its operations and the invariants).

Rules: upload (one file, submitted or held), dedupe twin, presigned upload with or without its PUT, a late
PUT, submit, a worker running one queued message (prepare, a group, a local job), a worker dying after
taking a message, a worker dying while its calls hang at the provider, a group run while every transcript
write fails, a group run while both hosted models are out of quota (handoff to the local engine), lease
expiry + sweeper tick, a two-day pause + sweeper and storage sweep, provider faults for the next answers
(429 rate limit, 500/503, timeout, 429 quota, 400 bad audio), cancel (job, batch), delete, retry-failed,
and billing settlement against the fake's usage export. Invariants (after every step; strict ones at the
drain): see `World.check`.

`make test` runs a bounded set of examples from a fixed seed (VOXQ_PROPERTY_EXAMPLES, default 10;
VOXQ_PROPERTY_STEPS, default 30; VOXQ_PROPERTY_SEED, default 16); `make test-long` runs many more. A
failure prints the steps it took (`World.log`, with VOXQ_PROPERTY_TRACE=1 for every example); each
sequence a failure was found with is kept below as a plain test replaying it, among them the two it
found in issue #16's items 4 and 5 before their fixes merged (they failed then; they pass now).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.api_helpers import ApiServer
from tests.fakes.openai_server import FakeOpenAI
from tests.lifecycle_world import FAULTS, FREQS, MODELS, WORKER_ENV, World
from tests.pipeline_support import Pipeline

EXAMPLES = int(os.environ.get("VOXQ_PROPERTY_EXAMPLES", "10"))
STEPS = int(os.environ.get("VOXQ_PROPERTY_STEPS", "30"))

picks = st.integers(min_value=0, max_value=63)
freqs = st.sampled_from(FREQS)


@pytest.fixture
def new_world(
    api: ApiServer,
    pipeline: Pipeline,
    fake_openai: FakeOpenAI,
    hosted_settings: None,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[], World]]:
    """Builds a fresh world (empty stack, two tenants) per example; the worker stages run in this process
    with `WORKER_ENV`."""
    from core.settings import reset_settings_cache
    from worker.runtime import close_runtime

    for key, value in WORKER_ENV.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    close_runtime()
    worlds: list[World] = []

    def build() -> World:
        world = World(api, pipeline, fake_openai).start()
        worlds.append(world)
        return world

    yield build
    for world in worlds:
        world.close()
        if os.environ.get("VOXQ_PROPERTY_TRACE"):
            print(f"example: {len(world.log)} steps:", "; ".join(world.log))
    close_runtime()


@seed(int(os.environ.get("VOXQ_PROPERTY_SEED", "16")))
class Lifecycle(RuleBasedStateMachine):
    """The rules; `build` is set by the test to the fixture's world factory."""

    build: Callable[[], World]

    def __init__(self) -> None:
        super().__init__()
        self.world = type(self).build()

    @initialize(first=st.sampled_from([0, 1]), a=freqs, b=freqs)
    def batches(self, first: int, a: int, b: int) -> None:
        self.world.new_batch(first)
        self.world.new_batch(1 - first)
        self.world.upload(0, a)
        self.world.upload(1, b)
        self.world.submit(0)
        self.world.submit(1)

    @rule(tenant=st.sampled_from([0, 1]))
    def new_batch(self, tenant: int) -> None:
        self.world.new_batch(tenant)

    @rule(pick=picks, freq=freqs, hold=st.booleans())
    def upload(self, pick: int, freq: int, hold: bool) -> None:
        self.world.upload(pick, freq)
        if not hold:
            self.world.submit(pick)

    @rule(pick=picks)
    def twin(self, pick: int) -> None:
        self.world.twin(pick)

    @rule(pick=picks, freq=freqs, put=st.booleans())
    def presign(self, pick: int, freq: int, put: bool) -> None:
        self.world.presign(pick, freq, put)

    @rule(pick=picks, freq=freqs)
    def late_put(self, pick: int, freq: int) -> None:
        self.world.late_put(pick, freq)

    @rule(pick=picks)
    def submit(self, pick: int) -> None:
        self.world.submit(pick)

    @rule(pick=picks)
    def work(self, pick: int) -> None:
        self.world.work(pick)

    @rule(pick=picks)
    def work_more(self, pick: int) -> None:  # workers run far more often than anything else happens
        self.world.work(pick)

    @rule(pick=picks)
    def work_again(self, pick: int) -> None:
        self.world.work(pick)

    @rule(pick=picks)
    def lose(self, pick: int) -> None:
        self.world.lose(pick)

    @rule(pick=picks)
    def die_mid_call(self, pick: int) -> None:
        self.world.die_mid_call(pick)

    @rule(pick=picks)
    def handoff(self, pick: int) -> None:
        self.world.handoff(pick)

    @rule(pick=picks)
    def completion_fails(self, pick: int) -> None:
        self.world.completion_fails(pick)

    @rule()
    def expire_leases(self) -> None:
        self.world.expire_leases()

    @rule()
    def long_pause(self) -> None:
        self.world.long_pause()

    @rule(model=st.integers(0, len(MODELS) - 1), kind=st.sampled_from(FAULTS), count=st.integers(1, 3))
    def fault(self, model: int, kind: str, count: int) -> None:
        self.world.fault(model, kind, count)

    @rule(pick=picks)
    def cancel_job(self, pick: int) -> None:
        self.world.cancel_job(pick)

    @rule(pick=picks)
    def cancel_batch(self, pick: int) -> None:
        self.world.cancel_batch(pick)

    @rule(pick=picks)
    def delete_job(self, pick: int) -> None:
        self.world.delete_job(pick)

    @rule(pick=picks)
    def retry_failed(self, pick: int) -> None:
        self.world.retry_failed(pick)

    @rule()
    def settle(self) -> None:
        self.world.settle()

    @invariant()
    def invariants_hold(self) -> None:
        self.world.check()

    def teardown(self) -> None:
        self.world.drain()


def test_lifecycle_state_machine(new_world: Callable[[], World]) -> None:
    Lifecycle.build = staticmethod(new_world)  # type: ignore[method-assign]
    run_state_machine_as_test(
        Lifecycle,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
            # Shrinking re-runs the stack hundreds of times: off unless asked (the failure's own steps are
            # in its report either way, `World.log`).
            phases=[p for p in Phase if p != Phase.shrink or os.environ.get("VOXQ_PROPERTY_SHRINK")],
        ),
    )


# ---- sequences the machine found, replayed step by step (hypothesis has no @example for machines) ----


def replay(new_world: Callable[[], World], steps: list[tuple[str, dict[str, object]]]) -> None:
    """Run these rules of the machine in order, with the invariants after each, then the drain."""
    Lifecycle.build = staticmethod(new_world)  # type: ignore[method-assign]
    machine = Lifecycle()
    machine.invariants_hold()
    for name, kwargs in steps:
        getattr(machine, name)(**kwargs)
        machine.invariants_hold()
    machine.teardown()
    if os.environ.get("VOXQ_PROPERTY_TRACE"):
        print("replay:", "; ".join(machine.world.log))


def test_replay_a_batch_waits_for_its_presigned_upload(new_world: Callable[[], World]) -> None:
    # Found by the machine (seed 16): a batch submitted before its presigned upload arrived stays
    # processing, waiting for the PUT; the invariant, not the product, was wrong.
    replay(
        new_world,
        [
            ("batches", {"first": 0, "a": 300, "b": 300}),
            ("long_pause", {}),
            ("presign", {"pick": 0, "freq": 300, "put": False}),
            ("fault", {"model": 0, "kind": "rate_limit", "count": 1}),
            ("expire_leases", {}),
            ("expire_leases", {}),
            ("lose", {"pick": 52}),
            ("settle", {}),
            ("lose", {"pick": 10}),
            ("work_more", {"pick": 5}),
            ("expire_leases", {}),
            ("submit", {"pick": 48}),
            ("delete_job", {"pick": 37}),
            ("retry_failed", {"pick": 45}),
            ("completion_fails", {"pick": 49}),
            ("settle", {}),
            ("completion_fails", {"pick": 26}),
            ("completion_fails", {"pick": 48}),
            ("settle", {}),
            ("work", {"pick": 61}),
            ("work", {"pick": 61}),
            ("new_batch", {"tenant": 1}),
            ("settle", {}),
            ("work_more", {"pick": 42}),
            ("twin", {"pick": 46}),
            ("cancel_job", {"pick": 53}),
            ("work_again", {"pick": 36}),
            ("twin", {"pick": 17}),
            ("fault", {"model": 1, "kind": "server_error", "count": 3}),
            ("completion_fails", {"pick": 19}),
        ],
    )


def test_replay_a_file_uploaded_after_submit_waits_for_the_next_submit(
    new_world: Callable[[], World],
) -> None:
    # Found by the machine (seed 16): a batch given a file after its submit stays processing until it is
    # submitted again; the invariant, not the product, was wrong.
    replay(
        new_world,
        [
            ("batches", {"first": 1, "a": 300, "b": 700}),
            ("work", {"pick": 0}),
            ("upload", {"pick": 1, "freq": 300, "hold": True}),
            ("lose", {"pick": 0}),
            ("long_pause", {}),
        ],
    )


LOCAL_COMPLETION_FAILS = [
    ("batches", {"first": 1, "a": 700, "b": 300}),
    ("handoff", {"pick": 26}),
    ("expire_leases", {}),
    ("handoff", {"pick": 10}),
    ("handoff", {"pick": 28}),
    ("upload", {"freq": 300, "hold": False, "pick": 62}),
    ("long_pause", {}),
    ("upload", {"freq": 560, "hold": False, "pick": 9}),
    ("submit", {"pick": 44}),
    ("delete_job", {"pick": 28}),
    ("late_put", {"freq": 420, "pick": 60}),
    ("settle", {}),
    ("lose", {"pick": 61}),
    ("cancel_job", {"pick": 61}),
    ("handoff", {"pick": 47}),
    ("late_put", {"freq": 420, "pick": 26}),
    ("cancel_batch", {"pick": 2}),
    ("expire_leases", {}),
    ("completion_fails", {"pick": 22}),
    ("completion_fails", {"pick": 7}),
    ("presign", {"freq": 300, "pick": 24, "put": False}),
    ("twin", {"pick": 48}),
    ("completion_fails", {"pick": 58}),
    ("work_more", {"pick": 21}),
    ("expire_leases", {}),
    ("handoff", {"pick": 37}),
    ("completion_fails", {"pick": 63}),
]


def test_replay_the_local_stage_fails_to_write_its_transcript(new_world: Callable[[], World]) -> None:
    # Found by the machine (default seed, with the transcript text invariant): the local stage's
    # transcript write failing raised out of the task (the test's worker now treats a raising stage as
    # Celery does: logged and acked); the job must still end once work stops.
    replay(new_world, LOCAL_COMPLETION_FAILS)


# Found by the machine before issue #16 item 5 was fixed (a regression test now).
def test_a_failed_transcript_write_does_not_make_the_rerun_pay_again(new_world: Callable[[], World]) -> None:
    world = new_world()
    world.new_batch(0)
    world.upload(0, 300)
    world.submit(0)
    world.work(0)  # prepare: the group's message waits
    world.completion_fails(0)  # the provider answers and bills; the transcript write fails
    world.check()
    world.drain()  # the sweeper hands the job to another run, which transcribes it
    assert len(world.fake.billing_log()) == 1, world.log


# Found by the machine before issue #16 item 4 was fixed (a regression test now).
def test_a_job_waiting_for_the_local_engine_keeps_its_lease(new_world: Callable[[], World]) -> None:
    from datetime import timedelta

    from core import names

    world = new_world()
    world.new_batch(0)
    world.upload(0, 300)
    world.submit(0)
    world.work(0)  # prepare
    world.handoff(0)  # both hosted models out of quota: the job waits on the local queue
    assert [k for k, _ in world.messages()] == [names.QUEUE_LOCAL]
    world.time_passes(timedelta(seconds=1000))  # a long local queue: past a 900 s lease
    world.sweeper_tick()
    world.check()
    assert world.work(0) == names.TASK_TRANSCRIBE_LOCAL
    job = world.pipeline.jobs([uuid.UUID(world.jobs[0][1])])
    assert [j.status for j in job.values()] == ["succeeded"], world.log
    world.drain()
