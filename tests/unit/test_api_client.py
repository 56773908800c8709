"""The Python client and CLI helpers against httpx.MockTransport (no I/O)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest

from voxq.cli.client_commands import ProgressBar, collect_inputs, transcript_path
from voxq.client import ApiError, VoxqClient, is_finished


class _Api:
    """A scripted API: records requests, answers like the real one."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.batch_polls = 0
        self.put_bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if request.url.host == "s3.test":
            self.put_bodies.append(request.read())
            return httpx.Response(200)
        if path == "/v1/batches" and request.method == "POST":
            return httpx.Response(201, json={"id": "b1", **json.loads(request.content)})
        if path == "/v1/batches/b1/files":
            body = request.read()
            names = [part.split(b'"')[0].decode() for part in body.split(b'filename="')[1:]]
            if any(n.startswith("bad") for n in names):
                return httpx.Response(
                    415,
                    json={
                        "type": "urn:voxq:problem:unsupported_media",
                        "title": "Unsupported Media Type",
                        "status": 415,
                        "detail": "not audio",
                        "code": "unsupported_media",
                    },
                )
            return httpx.Response(
                201, json={"batch_id": "b1", "jobs": [{"id": f"j-{n}", "filename": n} for n in names]}
            )
        if path == "/v1/batches/b1/uploads":
            ask = json.loads(request.content)
            return httpx.Response(
                201,
                json={
                    "job_id": f"p-{ask['filename']}",
                    "upload_url": "http://s3.test/put?sig=1",
                    "headers": {},
                    "expires_at": "2030-01-01T00:00:00Z",
                },
            )
        if path == "/v1/jobs/j1/transcript":
            self.transcript_polls = getattr(self, "transcript_polls", 0) + 1
            status = "pending" if self.transcript_polls < 3 else "aligned"
            return httpx.Response(200, json={"text": "hi", "alignment": {"status": status}})
        if path == "/v1/jobs/j2/transcript":
            return httpx.Response(200, json={"text": "hi", "alignment": {"status": "none"}})
        if path == "/v1/jobs/j1/align" and request.method == "POST":
            ask = json.loads(request.content) if request.content else {}
            return httpx.Response(
                202,
                json={"job_id": "j1", "status": "pending", "timestamps": ask.get("timestamps", "segment")},
            )
        if path == "/v1/batches/b1" and request.method == "GET":
            self.batch_polls += 1
            done = self.batch_polls >= 3
            counts = {"queued": 0 if done else 2, "succeeded": 2 if done else 0}
            return httpx.Response(
                200,
                json={
                    "id": "b1",
                    "status": "completed" if done else "processing",
                    "counts": counts,
                    "total_jobs": 2,
                    "cost_usd": 0.01,
                },
            )
        if path == "/v1/batches":
            cursor = request.url.params.get("cursor")
            if cursor is None:
                return httpx.Response(200, json={"items": [{"id": "b3"}, {"id": "b2"}], "next_cursor": "c1"})
            return httpx.Response(200, json={"items": [{"id": "b1"}], "next_cursor": None})
        return httpx.Response(
            404,
            json={
                "type": "urn:voxq:problem:not_found",
                "title": "Not Found",
                "status": 404,
                "detail": "job not found",
                "code": "not_found",
            },
            headers={"content-type": "application/problem+json"},
        )


def _client(api: _Api, threshold: int = 1000) -> VoxqClient:
    return VoxqClient(
        "http://api.test", "vq_key", presign_threshold=threshold, transport=httpx.MockTransport(api)
    )


def test_upload_files_packs_small_files_and_presigns_big_ones(tmp_path: Path) -> None:
    files = []
    for name, size in (("a.wav", 100), ("big.wav", 5000), ("b.wav", 200)):
        path = tmp_path / name
        path.write_bytes(bytes([len(files)]) * size)
        files.append(path)
    api = _Api()
    progress: list[int] = []
    with _client(api) as client:
        jobs = client.upload_files("b1", files, progress=progress.append)
    assert [j["id"] for j in jobs] == ["j-a.wav", "p-big.wav", "j-b.wav"]  # results in input order
    multipart = [r for r in api.requests if r.url.path.endswith("/files")]
    assert len(multipart) == 1  # the two small files share one request
    assert api.put_bodies == [bytes([1]) * 5000]
    put = next(r for r in api.requests if r.url.host == "s3.test")
    assert "authorization" not in put.headers  # the API key never goes to S3
    assert put.headers["content-length"] == "5000"
    assert sum(progress) == 5300
    assert all(
        r.headers["authorization"] == "Bearer vq_key" for r in api.requests if r.url.host == "api.test"
    )


def test_skip_rejected_finds_the_bad_file_and_keeps_the_others(tmp_path: Path) -> None:
    paths = []
    for name in ("a.wav", "bad.mp3", "c.wav"):
        (tmp_path / name).write_bytes(b"x" * 10)
        paths.append(tmp_path / name)
    api = _Api()
    with _client(api) as client:
        with pytest.raises(ApiError):
            client.upload_files("b1", paths)
        jobs = client.upload_files("b1", paths, skip_rejected=True)
    assert [j["id"] for j in jobs] == ["j-a.wav", None, "j-c.wav"]
    assert jobs[1]["status"] == "rejected" and jobs[1]["error"] == {
        "code": "unsupported_media",
        "message": "not audio",
    }


def test_wait_polls_until_finished_and_reports_updates() -> None:
    api = _Api()
    seen: list[int] = []
    with _client(api) as client:
        final = client.wait("b1", poll_seconds=0, on_update=lambda b: seen.append(b["counts"]["succeeded"]))
    assert final["status"] == "completed" and seen == [0, 0, 2] and api.batch_polls == 3


def test_errors_become_api_errors_with_the_problem_code() -> None:
    with _client(_Api()) as client, pytest.raises(ApiError) as caught:
        client.get_job("nope")
    assert (
        caught.value.status == 404
        and caught.value.code == "not_found"
        and caught.value.detail == "job not found"
    )


def test_iter_batches_follows_cursors() -> None:
    with _client(_Api()) as client:
        assert [b["id"] for b in client.iter_batches()] == ["b3", "b2", "b1"]


def test_is_finished() -> None:
    assert not is_finished({"status": "processing", "counts": {"queued": 1, "succeeded": 1}, "total_jobs": 2})
    assert is_finished({"status": "processing", "counts": {"failed": 1, "succeeded": 1}, "total_jobs": 2})
    assert not is_finished({"status": "open", "counts": {}, "total_jobs": 0})
    assert is_finished({"status": "cancelled", "counts": {"cancelled": 0}, "total_jobs": 0})


def test_collect_inputs_recurses_skips_hidden_and_keeps_relative_names(tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for rel in ("in/a.wav", "in/sub/b.mp3", "in/.secret.wav", "in/.git/x.wav", "single.ogg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = collect_inputs([str(tmp_path / "in"), str(tmp_path / "single.ogg")])
    assert [str(rel) for _, rel in found] == ["a.wav", "sub/b.mp3", "single.ogg"]
    with pytest.raises(FileNotFoundError):
        collect_inputs([str(tmp_path / "missing")])


def test_transcript_paths_are_unique(tmp_path: Path) -> None:
    used: set[Path] = set()
    first = transcript_path(tmp_path, Path("x/a.wav"), "srt", used)
    second = transcript_path(tmp_path, Path("x/a.mp3"), "srt", used)
    assert first == tmp_path / "x" / "a.srt" and second == tmp_path / "x" / "a-2.srt"


def test_progress_bar_without_a_terminal_prints_plain_lines() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar.draw(50, 100, "uploading", force=True)
    bar.draw(60, 100, "uploading")  # throttled
    bar.draw(100, 100, "done", force=True)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "[" + "#" * 15 + "." * 15 + "]  50.0% uploading",
        "[" + "#" * 30 + "] 100.0% done",
    ]


def test_align_posts_the_granularity_asked_for() -> None:
    api = _Api()
    with _client(api) as client:
        assert client.align("j1", "word") == {"job_id": "j1", "status": "pending", "timestamps": "word"}
        assert client.align("j1")["timestamps"] == "segment"
        assert client.create_batch(profile="podcast", timestamps="word")["timestamps"] == "word"
        with pytest.raises(ApiError) as caught:
            client.align("nope")
    assert caught.value.code == "not_found"
    assert [json.loads(r.content or b"{}") for r in api.requests[:2]] == [{"timestamps": "word"}, {}]


def test_wait_timings_polls_until_the_alignment_is_no_longer_pending() -> None:
    api = _Api()
    with _client(api) as client:
        assert client.wait_timings("j1", poll_seconds=0.01) == {"status": "aligned"}
        assert client.wait_timings("j2") == {"status": "none"}
    assert [r.url.params["format"] for r in api.requests] == ["json"] * 4


def test_status_prints_a_jobs_route_and_a_batchs_routes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from voxq.cli import client_commands

    job = {
        "id": "j1",
        "status": "succeeded",
        "filename": "a.wav",
        "duration_seconds": 3.0,
        "model": "whisper-1",
        "attempts": 1,
        "cost_usd": 0.0003,
        "billed_usd": 0.0003,
        "estimated_usd": 0.0,
        "error": None,
        "deduplicated_from": None,
        "route_model": "whisper-1",
        "route_reason": "cheapest meeting timestamps=word: whisper-1 $0.0003 < cheap $0.0010 (60 s minimum)",
    }
    batch = {
        "id": "b1",
        "status": "processing",
        "progress": 0.5,
        "total_jobs": 2,
        "counts": {"queued": 1},
        "audio_seconds": 3.0,
        "billed_seconds": 3.0,
        "cost_usd": 0.0,
        "routing": "cheapest",
        "routes": {"openai:whisper-1": 12, "openai:cheap": 3},
    }

    def api(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/batches/b1":
            return httpx.Response(200, json=batch)
        if request.url.path == "/v1/jobs/j1":
            return httpx.Response(200, json=job)
        return httpx.Response(404, json={"code": "not_found", "detail": "no", "status": 404})

    monkeypatch.setattr(
        client_commands,
        "_client",
        lambda *_: VoxqClient("http://api.test", "vq_key", transport=httpx.MockTransport(api)),
    )
    assert client_commands.run_status(argparse.Namespace(id="j1", json=False)) == 0
    out = capsys.readouterr().out
    assert f"  route whisper-1: {job['route_reason']}\n" in out
    assert client_commands.run_status(argparse.Namespace(id="b1", json=False)) == 0
    out = capsys.readouterr().out
    assert "  routing cheapest\n" in out
    assert "  routes openai:whisper-1 12, openai:cheap 3\n" in out
