"""Imports are scoped per tenant by bucket/prefix grants (issue #16 item 17).

Two tenants share one import bucket, each under its own prefix: neither can import the other's objects
(403 `bucket_not_allowed`, before any object is read), while its own import works; grants are managed by
the operator commands `voxq imports grant|revoke|list`. `VOXQ_IMPORT_BUCKETS` no longer grants anything
outside the dev environment: the API refuses to start with it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from core.storage import Storage
from tests.api_helpers import ApiServer, import_bucket, make_key, sine_wav
from tests.support import REPO_ROOT, Stack


def _voxq(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from voxq.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_tenant_cannot_import_another_tenants_prefix(
    api: ApiServer, stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = import_bucket(stack)
    storage = Storage(bucket=bucket)
    storage.ensure_bucket()
    storage.upload_bytes(sine_wav(1.0), "tenant-a/calls/1.wav")
    storage.upload_bytes(sine_wav(1.5), "tenant-b/calls/1.wav")
    key_a, key_b = make_key("tenant-a"), make_key("tenant-b")
    assert (
        _voxq(
            capsys, "imports", "grant", "--tenant", "tenant-a", "--bucket", bucket, "--prefix", "tenant-a/"
        )[0]
        == 0
    )
    assert (
        _voxq(
            capsys, "imports", "grant", "--tenant", "tenant-b", "--bucket", bucket, "--prefix", "tenant-b/"
        )[0]
        == 0
    )
    code, out, _ = _voxq(capsys, "imports", "list")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert code == 0 and [r[:3] for r in rows] == [
        ["tenant-a", bucket, "tenant-a/"],
        ["tenant-b", bucket, "tenant-b/"],
    ]
    own_a, own_b = f"s3://{bucket}/tenant-a/calls/1.wav", f"s3://{bucket}/tenant-b/calls/1.wav"
    with api.client(key_a) as a, api.client(key_b) as b:
        batch_a = a.post("/v1/batches", json={}).json()["id"]
        batch_b = b.post("/v1/batches", json={}).json()["id"]
        stolen = a.post(f"/v1/batches/{batch_a}/imports", json={"s3_uris": [own_b]})
        assert stolen.status_code == 403, stolen.text
        assert stolen.headers["content-type"] == "application/problem+json"
        assert stolen.json()["code"] == "bucket_not_allowed" and own_b in stolen.json()["detail"]
        # one foreign URI refuses the whole request, own objects included
        mixed = a.post(f"/v1/batches/{batch_a}/imports", json={"s3_uris": [own_a, own_b]})
        assert mixed.status_code == 403
        # a prefix is not a substring: tenant-a/ does not cover tenant-ab/
        assert (
            a.post(
                f"/v1/batches/{batch_a}/imports", json={"s3_uris": [f"s3://{bucket}/tenant-ab/x.wav"]}
            ).status_code
            == 403
        )
        assert a.get(f"/v1/batches/{batch_a}").json()["total_jobs"] == 0
        mine = a.post(f"/v1/batches/{batch_a}/imports", json={"s3_uris": [own_a]})
        assert mine.status_code == 201, mine.text
        theirs = b.post(f"/v1/batches/{batch_b}/imports", json={"s3_uris": [own_b]})
        assert theirs.status_code == 201, theirs.text
        assert b.post(f"/v1/batches/{batch_b}/imports", json={"s3_uris": [own_a]}).status_code == 403
        # revoked: refused again
        assert (
            _voxq(
                capsys,
                "imports",
                "revoke",
                "--tenant",
                "tenant-a",
                "--bucket",
                bucket,
                "--prefix",
                "tenant-a/",
            )[0]
            == 0
        )
        again = a.post(f"/v1/batches/{batch_a}/imports", json={"s3_uris": [own_a]})
        assert again.status_code == 403 and again.json()["code"] == "bucket_not_allowed"
    code, _, err = _voxq(capsys, "imports", "grant", "--tenant", "nobody", "--bucket", bucket)
    assert code != 0 and "no tenant" in err


def test_the_global_import_bucket_setting_is_refused_outside_dev(stack: Stack) -> None:
    env = stack.child_env(VOXQ_IMPORT_BUCKETS="shared-archive")
    result = subprocess.run(
        [sys.executable, "-c", "import api.main"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "VOXQ_IMPORT_BUCKETS" in result.stderr and "voxq imports grant" in result.stderr
    dev = stack.child_env(VOXQ_IMPORT_BUCKETS="shared-archive", VOXQ_ENVIRONMENT="dev")
    ok = subprocess.run(
        [sys.executable, "-c", "import api.main"],
        cwd=REPO_ROOT,
        env=dev,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
