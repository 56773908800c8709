"""An estimated cost (an unknown model's, priced from the table's default; a call whose bill is not
settled) is said apart from a billed one, by the API (batch, job, usage) and by `voxq status` and
`voxq usage` (issue #16, item 22c)."""

from __future__ import annotations

import uuid
from decimal import Decimal

from sqlalchemy import update

from core.db import session_scope
from core.models import Batch
from tests.api_helpers import ApiServer, finish_job, make_key, sine_wav
from tests.support import Stack, run_voxq

UNKNOWN = "acme-asr-9"  # not in the price table: its cost is the default per-minute estimate


def _files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "audio/wav")) for name, data in items]


def test_estimated_costs_are_shown_apart_from_billed_ones(api: ApiServer, stack: Stack) -> None:
    key = make_key("acme")
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={}).json()
        known, unknown = c.post(
            f"/v1/batches/{batch['id']}/files",
            files=_files(("a.wav", sine_wav(1.0)), ("b.wav", sine_wav(1.2))),
        ).json()["jobs"]
        finish_job(known["id"], model="whisper-1", usd=Decimal("0.0002"))
        finish_job(unknown["id"], model=UNKNOWN, usd=Decimal("0.0007"), estimated=True)
        with session_scope() as s:
            s.execute(
                update(Batch).where(Batch.id == uuid.UUID(batch["id"])).values(cost_usd=Decimal("0.0009"))
            )

        job = c.get(f"/v1/jobs/{unknown['id']}").json()
        assert (job["cost_usd"], job["billed_usd"], job["estimated_usd"]) == (0.0007, 0.0, 0.0007)
        job = c.get(f"/v1/jobs/{known['id']}").json()
        assert (job["cost_usd"], job["billed_usd"], job["estimated_usd"]) == (0.0002, 0.0002, 0.0)
        page = c.get(f"/v1/batches/{batch['id']}/jobs").json()["items"]
        assert {j["id"]: j["estimated_usd"] for j in page} == {known["id"]: 0.0, unknown["id"]: 0.0007}
        one = c.get(f"/v1/batches/{batch['id']}").json()
        assert (one["cost_usd"], one["billed_usd"], one["estimated_usd"]) == (0.0009, 0.0002, 0.0007)
        [listed] = [b for b in c.get("/v1/batches").json()["items"] if b["id"] == batch["id"]]
        assert (listed["billed_usd"], listed["estimated_usd"]) == (0.0002, 0.0007)

        usage = c.get("/v1/usage", params={"group_by": "model"}).json()
        rows = {r["key"]: (r["cost_usd"], r["billed_usd"], r["estimated_usd"]) for r in usage["rows"]}
        assert rows == {UNKNOWN: (0.0007, 0.0, 0.0007), "whisper-1": (0.0002, 0.0002, 0.0)}
        totals = (usage["total_usd"], usage["total_billed_usd"], usage["total_estimated_usd"])
        assert totals == (0.0009, 0.0002, 0.0007)

    env = stack.child_env(VOXQ_API_URL=api.url, VOXQ_API_KEY=key)
    status = run_voxq(["status", batch["id"]], env)
    assert status.returncode == 0, status.stderr
    assert "cost $0.000900 (billed $0.000200 + estimated $0.000700)" in status.stdout
    assert "estimated: priced from list prices" in status.stdout
    job_status = run_voxq(["status", unknown["id"]], env)
    assert "cost $0.000700 (billed $0.000000 + estimated $0.000700)" in job_status.stdout
    plain = run_voxq(["status", known["id"]], env)
    assert "cost $0.000200" in plain.stdout and "estimated" not in plain.stdout
    usage_out = run_voxq(["usage", "--group-by", "model"], env)
    assert usage_out.returncode == 0, usage_out.stderr
    lines = usage_out.stdout.splitlines()
    assert lines[0].split()[1:] == [
        "billed",
        "USD",
        "estimated",
        "USD",
        "total",
        "USD",
        "billed",
        "s",
        "records",
    ]
    [row] = [line.split() for line in lines if line.startswith(UNKNOWN)]
    assert row[1:4] == ["0.000000", "0.000700", "0.000700"]
    [total] = [line.split() for line in lines if line.startswith("total")]
    assert total[1:4] == ["0.000200", "0.000700", "0.000900"]
    assert any(line.startswith("estimated: priced from list prices") for line in lines)
