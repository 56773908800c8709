"""The chaos run: thousands of short jobs through real processes while things break.

API (uvicorn), two Celery worker processes, beat, Valkey, Postgres and SeaweedFS, plus two fake
OpenAI-compatible accounts, each a server of its own with its own key, both with a fault mix (15% 429 with
Retry-After, 5% 500/503, 2% read timeouts that the fake never answers, 0.5% answers that come after the
client gave up and are billed all the same): the built-in provider `openai` (OPENAI_BASE_URL,
OPENAI_API_KEY) serves the primary model, and a second account, `backup`, declared in a providers file
(VOXQ_PROVIDERS_FILE, its key in BACKUP_API_KEY), serves the fallback. The `openai` account's quota runs
out halfway through (account-wide, as OpenAI's does: issue #17); `backup`'s does not. The chain is
`openai:gpt-4o-mini-transcribe`, `openai:gpt-4o-transcribe`, `backup:whisper-1`: a fallback to another
model of the same account after a quota answer would fail again, so once the quota answer came the
provider's circuit skips `openai:gpt-4o-transcribe` without a request and the real fallback is the other
account. Files go in through the HTTP API. During the run a worker is killed with SIGKILL twice (a
replacement starts each time), Redis restarts once and Postgres once.

Afterwards: every job is terminal (none stuck, none lost); no job has two transcripts and each
succeeded job's transcript came from one successful attempt of that job; after settlement both fakes'
billing logs and voxq's cost records reconcile request by request, to the cent; jobs whose primary call
hit the exhausted quota went to the fallback provider at once, and once voxq had the quota answer no
request of any model reached the `openai` account again (its provider circuit stays open for the run:
VOXQ_CIRCUIT_OPEN_SECONDS is longer than the run, as an operator whose quota ran out sets it; the
half-open probe is tested in tests/integration/test_circuit_ratelimit.py). The figures are printed at
the end.

Accounting of calls in flight when a worker is SIGKILLed (decision, see worker/sweeper.py and
core/billing.py): voxq cannot know whether the provider finished such a call, so the sweeper closes the
attempt as `abandoned` and charges a conservative estimate, marked estimated and unsettled. Once the run
is over, the test downloads each fake's per-request billing export for the run's time range over HTTP
(`GET /_fake/billing?since=&until=`), as an operator downloads a provider's usage export, and runs the
real `voxq billing settle --provider NAME` once per account on its own export (an export judges only its
provider's estimates, so the first settlement must leave the other account's alone): a billed abandoned
call gets its exact cost, an unbilled one loses its estimate. A call the client timed out on is charged
an estimate the same way (the provider may have finished it), and settled the same way. Then, strictly:
every billed request has exactly one cost record with the exact usage and cents, no cost record lacks a
billed request, no estimate is left, and job and batch totals (cost and budget committed) equal the sum
of their cost records. Every paid answer is kept with its attempt's close (`job_answers`) and reused by
later runs, so a job is paid twice only when the first answer never reached voxq (its worker was
SIGKILLed, or its task cancelled by the broker connection loss, between the fake's answer and the
commit), or when the provider finished a call after the client gave up on it (counted apart).

VOXQ_CHAOS_JOBS scales the run (default 2000).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from core.models import Attempt, Batch, CostRecord, Job, Transcript
from core.statuses import JOB_TERMINAL, AttemptOutcome, JobStatus, Settlement
from tests.api_helpers import start_api_server, stop_api_server
from tests.audio_fixtures import tone_samples, wav_bytes
from tests.fakes.fixtures import FAKE_OPENAI_API_KEY
from tests.fakes.openai_server import FakeOpenAI
from tests.provider_support import requests_after_failure
from tests.support import REPO_ROOT, Stack, celery_worker, stop_process, wait_until
from voxq.embedded import EmbeddedPostgres, ValkeyRedis

pytestmark = pytest.mark.chaos

PRIMARY = "gpt-4o-mini-transcribe"  # of the built-in provider `openai` (env: OPENAI_BASE_URL/_API_KEY)
SECOND = "gpt-4o-transcribe"  # the same account's other model, next in the chain: skipped after the quota
FALLBACK = "whisper-1"  # of `backup`, the second account, declared in the providers file
BACKUP = "backup"
BACKUP_KEY_ENV = "BACKUP_API_KEY"
BACKUP_KEY = "sk-backup-account-fedcba9876543210"
CHAIN_PRIMARY = f"openai:{PRIMARY}"
CHAIN_SECOND = f"openai:{SECOND}"
CHAIN_FALLBACK = f"{BACKUP}:{FALLBACK}"
JOBS = int(os.environ.get("VOXQ_CHAOS_JOBS", "2000"))
FILES_PER_REQUEST = 50
TERMINAL = {s.value for s in JOB_TERMINAL}


def _wav(freqs: list[int]) -> bytes:
    return wav_bytes(tone_samples(freqs, tone_seconds=0.35, gap_seconds=0.25, lead_seconds=0.1))


def _file_tones(i: int) -> list[int]:
    """Two tones per file, unique per index (no two files share audio, so nothing is deduplicated)."""
    return [300 + 10 * (i % 60), 1000 + 10 * (i // 60)]


@contextmanager
def _beat(stack: Stack, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    log = open(stack.work_dir / "beat.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "worker.app", "beat", "-l", "INFO"),
            *(
                "-s",
                str(stack.work_dir / "celerybeat-schedule"),
                "--pidfile",
                str(stack.work_dir / "beat.pid"),
            ),
        ],
        cwd=REPO_ROOT,
        env=stack.child_env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        stop_process(proc, grace=15)
        log.close()


class Uploader(threading.Thread):
    """Sends the files through the API in requests of 50, retrying (with Idempotency-Key) through outages."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.key = key
        self.job_ids: list[str] = []
        self.expected: dict[str, str] = {}
        self.retried_requests = 0
        self.error: BaseException | None = None

    def _post(self, client: httpx.Client, path: str, idem: str, **kwargs: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 180
        while True:
            try:
                resp = client.post(path, headers={"Idempotency-Key": idem}, **kwargs)
                if resp.status_code in (200, 201, 202):
                    return dict(resp.json())
                if resp.status_code < 500 and resp.status_code not in (409, 429):
                    raise AssertionError(f"{path}: {resp.status_code} {resp.text}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: the API did not recover within 180 s")
            self.retried_requests += 1
            time.sleep(1.0)

    def run(self) -> None:
        try:
            with httpx.Client(
                base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
            ) as c:
                for start in range(0, JOBS, FILES_PER_REQUEST):
                    indexes = range(start, min(start + FILES_PER_REQUEST, JOBS))
                    batch = self._post(
                        c,
                        "/v1/batches",
                        f"chaos-batch-{start}",
                        json={"name": f"chaos-{start}", "auto_submit": True},
                    )
                    files = [("file", (f"f{i}.wav", _wav(_file_tones(i)), "audio/wav")) for i in indexes]
                    out = self._post(
                        c, f"/v1/batches/{batch['id']}/files", f"chaos-files-{start}", files=files
                    )
                    for i, job in zip(indexes, out["jobs"], strict=True):
                        self.job_ids.append(job["id"])
                        self.expected[job["id"]] = " ".join(f"tone{f}" for f in _file_tones(i))
        except BaseException as exc:  # reported by the test thread
            self.error = exc


def _kill_group(proc: subprocess.Popen[bytes]) -> set[str]:
    """SIGKILL the worker and its pool children at once (a host or container dying); their worker names."""
    pids = {proc.pid}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[1]) == proc.pid:
                    pids.add(int(entry))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return {f"{socket.gethostname()}:{pid}" for pid in pids}


# Attempt error codes of calls whose bill is unknown until settled (core/providers/openai.py).
UNKNOWN_BILL_CODES = ("timeout", "transport_error", "bad_response", "internal")


def _wait_for_grace(engine: Any, *, grace_seconds: float) -> None:
    """Wait until every unsettled attempt started more than `grace_seconds` ago (settlement covers it)."""
    with Session(engine) as s:
        latest = s.scalar(
            select(func.max(Attempt.started_at)).where(Attempt.settlement == Settlement.UNSETTLED.value)
        )
    if latest is not None:
        time.sleep(max(0.0, (latest - datetime.now(UTC)).total_seconds() + grace_seconds + 1))


def _settle(
    stack: Stack, env: dict[str, str], provider: str, export: Path, since: datetime, until: datetime
) -> str:
    """`voxq billing settle --provider` on that provider's export, as an operator runs it; its report."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "voxq.cli", "billing", "settle", "--provider", provider),
            *("--file", str(export), "--since", since.isoformat(), "--until", until.isoformat()),
        ],
        cwd=REPO_ROOT,
        env=stack.child_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _providers_file(path: Path, backup_url: str) -> Path:
    """The operator's providers file: the second account, its key's variable, its model at list price."""
    path.write_text(
        f"""
[providers.{BACKUP}]
base_url = "{backup_url}"
api_key_env = "{BACKUP_KEY_ENV}"

[providers.{BACKUP}.models.{FALLBACK}]
price = "table"
# whisper-1's own (the catalogue's entry for openai:whisper-1)
capabilities = {{ timestamps = "word", prompt = true, response_formats = ["json", "text", "verbose_json"] }}
"""
    )
    return path


def _settlement_figures(engine: Any) -> dict[str, int]:
    with Session(engine) as s:
        by_state = dict(
            s.execute(
                select(Attempt.settlement, func.count())
                .where(Attempt.settlement.is_not(None))
                .group_by(Attempt.settlement)
            ).all()
        )
        estimated = s.scalar(select(func.count()).where(CostRecord.estimated.is_(True))) or 0
        records = s.scalar(select(func.count()).select_from(CostRecord)) or 0
    return {
        "estimates made": sum(by_state.values()),
        "unsettled": by_state.get(Settlement.UNSETTLED.value, 0),
        "settled as billed": by_state.get(Settlement.BILLED.value, 0),
        "settled as not billed": by_state.get(Settlement.NOT_BILLED.value, 0),
        "estimated cost records": estimated,
        "cost records": records,
    }


def test_chaos_run(s3_server: tuple[str, str, str]) -> None:
    started = time.monotonic()
    started_at = datetime.now(UTC)
    # Not under pytest's basetemp: other pytest sessions chmod /tmp/pytest-of-<user> to 0700, and the
    # embedded Postgres runs as its own system user (as root), so a restart there could not reach its data.
    work = Path(tempfile.mkdtemp(prefix="voxq-chaos-"))
    endpoint, access, secret = s3_server
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        postgres = EmbeddedPostgres(work / "postgres")
        postgres.start()
        cleanup.callback(postgres.stop)
        redis_server = ValkeyRedis(work / "valkey", persist=True)  # production Redis keeps an AOF
        redis_server.start()
        cleanup.callback(redis_server.stop)
        database_url = postgres.create_database("voxq_chaos")
        from core.db import upgrade

        upgrade(database_url)
        stack = Stack(
            database_url=database_url,
            redis_url=redis_server.url,
            s3_endpoint_url=endpoint,
            s3_access_key_id=access,
            s3_secret_access_key=secret,
            s3_bucket=f"voxq-chaos-{uuid.uuid4().hex[:8]}",
            work_dir=work,
        )
        # Two accounts, each a server of its own that takes only its own key: the quota of one cannot
        # touch the other, and a key sent to the wrong provider would be refused (401).
        fake = FakeOpenAI(api_keys={FAKE_OPENAI_API_KEY}).start()
        cleanup.callback(fake.stop)
        fake.seed(7)
        backup = FakeOpenAI(api_keys={BACKUP_KEY}).start()
        cleanup.callback(backup.stop)
        backup.seed(8)
        fakes = {"openai": fake, BACKUP: backup}
        mix = {
            "rate_limit": 0.15,
            "server_error": 0.025,
            "server_error:503": 0.025,
            "timeout": 0.02,
            "slow": 0.005,  # answered (and billed) 5 s after arrival, 2 s after the client gave up
        }
        for host, model in ((fake, PRIMARY), (fake, SECOND), (backup, FALLBACK)):
            host.configure(
                model,
                faults=dict(mix),
                latency=0.05,
                latency_jitter=0.2,
                hang_seconds=60.0,
                slow_seconds=5.0,
            )
        fake.exhaust_quota(None, after=JOBS // 2)  # the openai account's quota, every model of it
        env = {
            "OPENAI_BASE_URL": fake.base_url,
            "OPENAI_API_KEY": FAKE_OPENAI_API_KEY,
            "VOXQ_PROVIDERS_FILE": str(_providers_file(work / "providers.toml", backup.base_url)),
            BACKUP_KEY_ENV: BACKUP_KEY,
            "VOXQ_PRIMARY_MODEL": CHAIN_PRIMARY,
            "VOXQ_FALLBACK_MODELS": f"{CHAIN_SECOND},{CHAIN_FALLBACK}",
            "VOXQ_PROVIDER_TIMEOUT_SECONDS": "3",
            "VOXQ_MAX_RETRIES": "6",
            "VOXQ_RETRY_BASE_SECONDS": "0.2",
            "VOXQ_RETRY_MAX_SECONDS": "2",
            "VOXQ_CIRCUIT_FAILURE_THRESHOLD": "20",
            # longer than the run: once the openai account's quota is gone, no probe of it either (a model
            # circuit needs 20 failures in a row, which this fault mix never gives)
            "VOXQ_CIRCUIT_OPEN_SECONDS": "1800",
            "VOXQ_JOB_LEASE_SECONDS": "90",
            "VOXQ_JOB_MAX_ATTEMPTS": "10",
            "VOXQ_CELERY_VISIBILITY_TIMEOUT": "120",
        }
        saved_env = dict(os.environ)
        cleanup.callback(stack.reset_process_state)  # runs last: settings from the restored environment
        cleanup.callback(lambda: (os.environ.clear(), os.environ.update(saved_env)))
        os.environ.update({**stack.env(), **env})
        stack.reset_process_state()
        stack.ensure_bucket()
        from tests.api_helpers import make_key

        key = make_key("chaos")
        api = start_api_server(stack, **env)
        cleanup.callback(stop_api_server, api)
        cleanup.enter_context(_beat(stack, env))
        workers = [cleanup.enter_context(celery_worker(stack, name=f"w{n}", env=env)) for n in (1, 2)]

        engine = create_engine(database_url, pool_pre_ping=True)
        cleanup.callback(engine.dispose)

        def progress() -> int | None:
            try:
                with Session(engine) as s:
                    return int(s.scalar(select(func.count()).where(Job.status.in_(TERMINAL))) or 0)
            except Exception:  # Postgres restarting
                return None

        uploader = Uploader(api.url, key)
        uploader.start()
        events: list[str] = []
        plan = [(0.15, "kill"), (0.30, "redis"), (0.50, "postgres"), (0.70, "kill")]
        replacements = 0
        killed: set[str] = set()
        killed_at: dict[str, float] = {}  # worker name -> Unix time of its SIGKILL
        redis_restarted_at = datetime.max.replace(tzinfo=UTC)
        # bounded so CI (90 min, ~15 for this run) fails clearly instead of hanging: the whole run takes
        # about 5 minutes for 2,000 jobs on 2 cores, most of it the leases of killed workers running out
        budget = 300 + JOBS * 0.15
        while plan:
            if time.monotonic() - started > budget:
                raise AssertionError(f"chaos events not all reached: {plan}, done {progress()}")
            if uploader.error:
                raise uploader.error
            done = progress()
            if done is not None and done >= plan[0][0] * JOBS:
                _, what = plan.pop(0)
                at = f"{what} at {done}/{JOBS} terminal, t={time.monotonic() - started:.0f}s"
                if what == "kill":
                    at_time = time.time()
                    names = _kill_group(workers.pop(0))
                    killed_at.update(dict.fromkeys(names, at_time))
                    killed |= names
                    replacements += 1
                    workers.append(
                        cleanup.enter_context(celery_worker(stack, name=f"r{replacements}", env=env))
                    )
                elif what == "redis":
                    redis_restarted_at = datetime.now(UTC)
                    redis_server.restart()
                else:
                    postgres.restart()
                events.append(at)
                print(f"chaos: {at}", flush=True)
            time.sleep(0.5)
        uploader.join(timeout=600)
        assert not uploader.is_alive()
        if uploader.error:
            raise uploader.error
        assert len(uploader.job_ids) == JOBS

        def all_terminal() -> bool:
            return progress() == JOBS

        wait_until(all_terminal, timeout=420, interval=2.0, what="every job terminal")
        worker_pids = [w.pid for w in workers]
        assert all(w.poll() is None for w in workers), "a worker died on its own"

        def no_pending() -> bool:
            with Session(engine) as s:
                return not s.scalar(
                    select(func.count()).where(Attempt.outcome == AttemptOutcome.PENDING.value)
                )

        # the sweeper (every 30 s) closes calls lost with the killed workers once 2x the timeout passed
        wait_until(no_pending, timeout=120, interval=2.0, what="lost attempts closed by the sweeper")
        wall = time.monotonic() - started

        # A call the client timed out on is settled once the export covers it: its start plus the
        # settlement's grace (2 x the provider timeout + 10 s) must lie before `until`.
        _wait_for_grace(engine, grace_seconds=2 * 3 + 10)
        # Settlement against the provider's per-request usage export for the run's time range.
        before_settling = _settlement_figures(engine)
        until = datetime.now(UTC)
        exports = {
            name: httpx.get(
                f"{host.root_url}/_fake/billing",
                params={"since": started_at.timestamp(), "until": until.timestamp()},
                timeout=60,
            ).json()
            for name, host in fakes.items()
        }
        export = [entry for entries in exports.values() for entry in entries]
        export_paths = {name: work / f"billing-export-{name}.json" for name in exports}
        for name, entries in exports.items():
            export_paths[name].write_text(json.dumps(entries))
        provider_of_request = {e["request_id"]: name for name, entries in exports.items() for e in entries}
        request_logs = {name: host.request_log() for name, host in fakes.items()}
        billing_logs = {name: host.billing_log() for name, host in fakes.items()}
        # one settlement per account, each on its own export
        settle_report = "\n".join(
            _settle(stack, env, name, path, started_at, until) for name, path in export_paths.items()
        )
        after_settling = _settlement_figures(engine)
        # idempotent: settling the same exports again changes nothing
        for name, path in export_paths.items():
            again = _settle(stack, env, name, path, started_at, until)
            assert "settled as billed (estimate -> exact): 0" in again, again
            assert "settled as not billed (estimate removed): 0" in again, again
            assert "billed without a cost record, charged now: 0" in again, again
        assert _settlement_figures(engine) == after_settling

        with Session(engine) as s:
            jobs = {str(j.id): j for j in s.execute(select(Job)).scalars()}
            batches = list(s.execute(select(Batch)).scalars())
            attempts = list(s.execute(select(Attempt).order_by(Attempt.started_at, Attempt.id)).scalars())
            transcripts = list(s.execute(select(Transcript)).scalars())
            costs = list(s.execute(select(CostRecord)).scalars())

    # -- none lost, none stuck ---------------------------------------------------------------
    assert set(jobs) == set(uploader.job_ids)
    statuses = Counter(j.status for j in jobs.values())
    assert set(statuses) <= {JobStatus.SUCCEEDED.value, JobStatus.FAILED.value}, statuses
    for j in jobs.values():
        if j.status == JobStatus.FAILED.value:
            assert j.error_code and j.error_message, (j.id, j.error_code)

    # -- one transcript per succeeded job, from one successful attempt of that job -------------
    by_attempt = {a.id: a for a in attempts}
    per_job = Counter(str(t.job_id) for t in transcripts)
    assert max(per_job.values()) == 1
    succeeded = {jid for jid, j in jobs.items() if j.status == JobStatus.SUCCEEDED.value}
    assert set(per_job) == succeeded
    successes_per_job: dict[str, int] = Counter(
        str(a.job_id) for a in attempts if a.outcome == AttemptOutcome.SUCCESS.value
    )
    # Exactly one successful call per job: every answer that reached voxq was kept with its attempt's
    # close and reused by any later run (a SIGKILL, a task cancelled by the broker connection loss, a
    # sweeper requeue, a Postgres restart). A job paid twice lost its first answer before it reached
    # voxq (checked with the billing below). Was: 6-9 jobs with two successful calls per run.
    assert set(successes_per_job) == succeeded and set(successes_per_job.values()) == {1}, {
        j: n for j, n in successes_per_job.items() if n != 1
    }
    for t in transcripts:
        source = by_attempt[t.attempt_id] if t.attempt_id else None
        assert source is not None and source.outcome == AttemptOutcome.SUCCESS.value
        assert str(source.job_id) == str(t.job_id) and source.model == t.model
        assert t.text == uploader.expected[str(t.job_id)]

    # -- billing reconciliation after settlement, request by request, to the cent -------------
    billed = {e["request_id"]: e for e in export}
    # the exports cover the whole run of both accounts
    assert len(billed) == len(export) == sum(len(log) for log in billing_logs.values())
    by_cost = {str(c.attempt_id): c for c in costs}
    assert len(by_cost) == len(costs)  # one cost record per attempt at most
    missing = set(billed) - set(by_cost)
    assert not missing, f"billed requests without a cost record: {sorted(missing)[:5]}"
    unbilled = set(by_cost) - set(billed)
    assert not unbilled, f"cost records without a billed request: {sorted(unbilled)[:5]}"
    assert not [c for c in costs if c.estimated], "an estimate is left after settlement"
    assert not [a for a in attempts if a.settlement == Settlement.UNSETTLED.value]
    for request_id, entry in billed.items():
        cost = by_cost[request_id]
        attempt = by_attempt[uuid.UUID(request_id)]
        provider = provider_of_request[request_id]
        assert (attempt.provider, attempt.model) == (provider, entry["model"]), request_id
        assert cost.model in (entry["model"], f"{provider}:{entry['model']}"), (cost.model, provider)
        if attempt.outcome != AttemptOutcome.SUCCESS.value:
            # billed, but the answer never reached voxq (its worker died, or the client timed out):
            # settled from the export
            assert attempt.settlement == Settlement.BILLED.value, (request_id, attempt.outcome)
            assert attempt.outcome == AttemptOutcome.ABANDONED.value or attempt.error_code == "timeout"
        usage = entry["usage"]
        assert cost.usage_type == usage["type"]
        if usage["type"] == "tokens":
            assert (cost.input_tokens, cost.output_tokens, cost.input_audio_tokens) == (
                usage["input_tokens"],
                usage["output_tokens"],
                usage["input_token_details"]["audio_tokens"],
            )
        else:
            assert cost.billed_audio_seconds == pytest.approx(usage["seconds"])
        assert cost.usd == Decimal(entry["usd"])  # what the provider says it charged, to the cent
    for a in attempts:
        if a.settlement == Settlement.NOT_BILLED.value:
            assert str(a.id) not in by_cost
            assert a.outcome == AttemptOutcome.ABANDONED.value or a.error_code in UNKNOWN_BILL_CODES
    cost_of_job: dict[str, Decimal] = defaultdict(Decimal)
    cost_of_batch: dict[str, Decimal] = defaultdict(Decimal)
    for c in costs:
        cost_of_job[str(c.job_id)] += c.usd
        cost_of_batch[str(c.batch_id)] += c.usd
    for j in jobs.values():
        assert j.cost_usd == cost_of_job[str(j.id)], j.id
    for b in batches:
        # no budget on these batches: committed is exactly what was charged
        assert b.cost_usd == b.committed_usd == cost_of_batch[str(b.id)], b.id
    # Paid twice only when the first answer never reached voxq: every billed call of a job other than
    # the one behind its transcript was lost with its worker (SIGKILL, or the task cancelled when the
    # broker connection dropped) between the fake's answer and the commit.
    billed_per_job: dict[str, list[Attempt]] = defaultdict(list)
    for request_id in billed:
        a = by_attempt[uuid.UUID(request_id)]
        billed_per_job[str(a.job_id)].append(a)
    source_of = {str(t.job_id): t.attempt_id for t in transcripts}
    paid_twice = {job_id: tries for job_id, tries in billed_per_job.items() if len(tries) > 1}
    lost_answers: Counter[str] = Counter()
    timed_out_paid = set()
    for job_id, tries in paid_twice.items():
        for a in tries:
            if a.id == source_of.get(job_id):
                continue
            if a.outcome != AttemptOutcome.ABANDONED.value and a.error_code == "timeout":
                lost_answers["provider finished after the client timed out"] += 1
                timed_out_paid.add(job_id)
                continue
            cancelled = abs((a.started_at - redis_restarted_at).total_seconds()) < 30
            lost_answers["SIGKILL" if a.worker in killed else "broker-loss cancel"] += 1
            assert a.outcome == AttemptOutcome.ABANDONED.value and (a.worker in killed or cancelled), [
                (b.outcome, b.worker, b.started_at) for b in tries
            ]

    # -- quota: straight to the other account, no retries on the primary ----------------------
    per_chunk: dict[tuple[str, int | None], list[Attempt]] = defaultdict(list)
    for a in attempts:
        per_chunk[(str(a.job_id), a.chunk_index)].append(a)
    quota_hits = 0
    gaps: list[float] = []
    for tries in per_chunk.values():
        for n, a in enumerate(tries):
            if (a.provider, a.model) == ("openai", PRIMARY) and a.error_code == "insufficient_quota":
                quota_hits += 1
                # never retried: the quota answer closes as a fallback and the very next call of this
                # piece goes to the other account (the same account's SECOND is skipped without a call)
                assert a.outcome == AttemptOutcome.FALLBACK.value, (a.id, a.outcome)
                nxt = tries[n + 1] if n + 1 < len(tries) else None
                if nxt is not None and nxt.worker == a.worker:  # the same run (not a redelivery)
                    assert (nxt.provider, nxt.model) == (BACKUP, FALLBACK), [
                        (b.provider, b.model, b.error_code, b.retry_number) for b in tries
                    ]
                    if a.ended_at is not None:
                        gaps.append((nxt.started_at - a.ended_at).total_seconds())
                # never a retry of the quota answer, nor a call of any model of that account after it
                assert [b for b in tries[n + 1 :] if b.provider == "openai" and b.http_status] == [], [
                    (b.provider, b.model, b.error_code, b.retry_number) for b in tries
                ]
    assert quota_hits > 0, "the primary's quota never ran out"
    fallback_jobs = sum(
        1
        for t in transcripts
        if t.attempt_id
        and (by_attempt[t.attempt_id].provider, by_attempt[t.attempt_id].model) == (BACKUP, FALLBACK)
    )
    assert fallback_jobs > 0
    # The account's log: requests of any of its models that voxq started once it knew the quota was gone
    # (their attempt row is younger than the close of the attempt that got the first quota answer); calls
    # already sent when it came back are in flight, not late. None at all, in the whole run.
    attempts_by_id = {str(a.id): a for a in attempts}
    quota_requests = [r for r in request_logs["openai"] if r["code"] == "insufficient_quota"]
    assert quota_requests, "the openai account never answered insufficient_quota"
    late = requests_after_failure(request_logs["openai"], attempts_by_id)
    assert late == [], f"{len(late)} requests reached the openai account after its quota answer: {late[:5]}"
    # `late` covers every model of the account: SECOND, next in the chain, is kept from a call only by the
    # provider's circuit (it may have been called before the quota ran out, PRIMARY rate limited or failing)
    second_calls = [r for r in request_logs["openai"] if r["model"] == SECOND]
    assert not [r for r in request_logs[BACKUP] if r["code"] == "insufficient_quota"]  # its own account

    # When the provider billed each answer lost with a SIGKILLed worker, from the kill: after it, the
    # provider finished a request whose client had died (nothing voxq could keep); before it, an answer
    # voxq had received but not committed yet (the window between a billed answer and its commit).
    kill_lags = sorted(
        round(billed[str(a.id)]["ts"] - killed_at[a.worker], 3)
        for job_id, tries in paid_twice.items()
        for a in tries
        if a.id != source_of.get(job_id) and a.worker in killed_at
    )

    figures = {
        "jobs": len(jobs),
        "succeeded": statuses[JobStatus.SUCCEEDED.value],
        "failed": statuses[JobStatus.FAILED.value],
        "failure codes": dict(Counter(j.error_code for j in jobs.values() if j.error_code)),
        "attempts": len(attempts),
        "retries": sum(1 for a in attempts if a.retry_number > 0),
        "attempt outcomes": dict(Counter(a.outcome for a in attempts)),
        "quota answers on the primary": quota_hits,
        "requests per account (openai, backup)": (len(request_logs["openai"]), len(request_logs[BACKUP])),
        "quota answers in the openai account's log (calls in flight when it ran out)": len(quota_requests),
        "requests to the openai account after voxq knew its quota was gone": len(late),
        "requests of openai's second model (all before the quota answer)": len(second_calls),
        "quota answer -> fallback call, median/max s": (
            round(sorted(gaps)[len(gaps) // 2], 2) if gaps else None,
            round(max(gaps), 2) if gaps else None,
        ),
        "fallbacks (transcripts by the fallback)": fallback_jobs,
        "redeliveries (jobs run more than once)": sum(1 for j in jobs.values() if j.run_count > 1),
        "jobs with >1 successful call": sum(1 for n in successes_per_job.values() if n > 1),
        "jobs paid twice (first answer lost with its worker)": len(set(paid_twice) - timed_out_paid),
        "jobs paid twice (provider finished after the client timed out)": len(timed_out_paid),
        "  billed answers lost, by cause": dict(lost_answers),
        "billed requests": len(billed),
        "cost records": len(costs),
        "settlement before": before_settling,
        "settlement after": after_settling,
        "upload requests retried": uploader.retried_requests,
        "chaos events": events,
        "worker pids at the end": worker_pids,
        "wall time s": round(wall, 1),
    }
    figures["answers lost with a SIGKILLed worker, billed before/after the kill"] = (
        sum(1 for lag in kill_lags if lag < 0),
        sum(1 for lag in kill_lags if lag >= 0),
    )
    figures["  billed minus SIGKILL time, s"] = kill_lags
    # The window issue #16 asks to shorten: answers the provider billed before voxq's worker died (or
    # while its task was cancelled), i.e. answers voxq could have committed. What the provider finished
    # after the kill, or after the client timed out, no commit path can keep (OpenAI bills it all the
    # same); it is counted and settled, not avoidable.
    in_window = sum(1 for lag in kill_lags if lag < 0) + lost_answers["broker-loss cancel"]
    figures["jobs paid twice"] = f"{len(paid_twice)} ({100 * len(paid_twice) / len(jobs):.2f}% of jobs)"
    figures["  of which an answer voxq had received but not committed"] = (
        f"{in_window} ({100 * in_window / len(jobs):.2f}% of jobs, target <= 0.5%)"
    )
    print("\n== voxq billing settle ==\n" + settle_report, file=sys.stderr)
    print("\n== chaos figures ==", file=sys.stderr)
    for name, value in figures.items():
        print(f"  {name}: {value}", file=sys.stderr)
    print(f"== chaos figures ==\n{figures}", flush=True)
    assert len(events) == 4
    assert in_window <= 0.005 * len(jobs), figures["  of which an answer voxq had received but not committed"]
