"""The polled status read runs on the API's poll thread, not fanned out over the shared pool (P4b)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from tests.api_helpers import make_key, sine_wav, start_api_server, stop_api_server
from tests.support import Stack


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_bursts_of_polls_do_not_fan_out_over_threads(stack: Stack) -> None:
    """Before: each burst of polls ran on as many of anyio's threads at once, all taking turns at the
    GIL with the event loop; the answers left together, 25-125 ms late. Now they queue for the poll
    thread (VOXQ_API_POLL_THREADS, 1): the process starts no thread for them, and every one is answered."""
    server = start_api_server(stack)
    try:
        key = make_key("poller")
        with server.client(key, timeout=30) as client:
            batch = client.post("/v1/batches", json={}).json()["id"]
            files = [("file", (f"f{i}.wav", sine_wav(0.3 + i / 10), "audio/wav")) for i in range(3)]
            ids = [j["id"] for j in client.post(f"/v1/batches/{batch}/files", files=files).json()["jobs"]]
            assert client.get(f"/v1/jobs/{ids[0]}").status_code == 200  # the poll thread exists now
        before = _threads(server.proc.pid)
        most = before
        clients = [server.client(key, timeout=30) for _ in range(40)]
        try:
            for _ in range(5):
                start = threading.Barrier(len(clients))

                def poll(i: int, start: threading.Barrier = start) -> tuple[int, str]:
                    start.wait()
                    response = clients[i].get(f"/v1/jobs/{ids[i % len(ids)]}")
                    return response.status_code, response.json()["id"]

                with ThreadPoolExecutor(len(clients)) as pool:
                    answers = list(pool.map(poll, range(len(clients))))
                assert answers == [(200, ids[i % len(ids)]) for i in range(len(clients))]
                most = max(most, _threads(server.proc.pid))
        finally:
            for c in clients:
                c.close()
        assert most <= before, (before, most)
    finally:
        stop_api_server(server)


def test_polls_answer_as_before_with_more_poll_threads(stack: Stack) -> None:
    """VOXQ_API_POLL_THREADS=2: the job, and a 404 problem for an unknown one, as on the shared pool."""
    server = start_api_server(stack, VOXQ_API_POLL_THREADS="2")
    try:
        with server.client(make_key("poller"), timeout=30) as client:
            batch = client.post("/v1/batches", json={}).json()["id"]
            files = [("file", ("f.wav", sine_wav(0.5), "audio/wav"))]
            job = client.post(f"/v1/batches/{batch}/files", files=files).json()["jobs"][0]["id"]
            answer = client.get(f"/v1/jobs/{job}")
            assert answer.status_code == 200 and answer.json()["id"] == job
            missing = client.get("/v1/jobs/00000000-0000-0000-0000-000000000000")
            assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    finally:
        stop_api_server(server)
