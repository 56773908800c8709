"""api.server.HttpToolsProtocol: uvicorn's httptools protocol handing request bodies over without copies.

A real uvicorn server (in a thread, on a loopback port) with the protocol serves an app that hashes what
`receive()` gives it; raw sockets send bodies whole, in small delayed pieces, chunked, and back to back on
one keep-alive connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from api.server import BodyChunks, HttpToolsProtocol
from voxq.embedded import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = "api.server:HttpToolsProtocol"


def test_body_chunks_hand_over_a_single_chunk_as_it_is_and_join_several() -> None:
    one = BodyChunks()
    chunk = os.urandom(300_000)
    one += chunk
    assert len(one) == len(chunk)
    assert bytes(one) is chunk  # not a copy
    several = BodyChunks()
    parts = [b"ab", b"", b"cde", os.urandom(70_000)]
    for part in parts:
        several += part
    assert len(several) == sum(map(len, parts))
    assert bytes(several) == b"".join(parts)
    assert bytes(BodyChunks()) == b""


async def _hashing_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers the SHA-256 and size of the body it received, and whether every message body was bytes."""
    if scope["type"] != "http":
        return
    sha, size, messages, all_bytes = hashlib.sha256(), 0, 0, True
    buffers: set[str] = set()  # what uvicorn's cycle buffered body chunks in, seen before each receive()
    while True:
        if messages == 1:
            await asyncio.sleep(0.02)  # let more of the body arrive
        buffers.add(type(receive.__self__.body).__name__)
        message = await receive()
        body = message.get("body", b"")
        all_bytes = all_bytes and type(body) is bytes
        sha.update(body)
        size += len(body)
        messages += 1
        if not message.get("more_body"):
            break
    answer = json.dumps(
        {
            "sha256": sha.hexdigest(),
            "size": size,
            "messages": messages,
            "bytes": all_bytes,
            "buffers": sorted(buffers),
        }
    )
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(answer)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": answer.encode()})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, uvicorn.Server]]:
    port = free_port()
    config = uvicorn.Config(
        _hashing_app, host="127.0.0.1", port=port, http=PROTOCOL, lifespan="off", log_level="warning"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_for_port(port, timeout=30)
    yield port, srv
    srv.should_exit = True
    thread.join(10)


def _read_answer(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return dict(json.loads(rest[:length]))


def test_the_server_runs_this_protocol(server: tuple[int, uvicorn.Server]) -> None:
    assert server[1].config.http_protocol_class is HttpToolsProtocol


def test_a_large_body_arrives_intact_in_bytes_messages(server: tuple[int, uvicorn.Server]) -> None:
    body = os.urandom(5_000_000)
    with socket.create_connection(("127.0.0.1", server[0])) as sock:
        sock.sendall(f"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        answer = _read_answer(sock)
    assert answer["sha256"] == hashlib.sha256(body).hexdigest() and answer["size"] == len(body)
    assert answer["bytes"] is True
    assert answer["messages"] > 1  # really streamed in several receive() calls
    assert "BodyChunks" in answer["buffers"]  # the chunks were kept, not appended to a bytearray


def test_a_body_sent_in_small_delayed_pieces_arrives_intact(server: tuple[int, uvicorn.Server]) -> None:
    body = os.urandom(200_000)
    with socket.create_connection(("127.0.0.1", server[0])) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for start in range(0, len(body), 7_000):
            sock.sendall(body[start : start + 7_000])
            if start % 49_000 == 0:
                time.sleep(0.005)
        answer = _read_answer(sock)
    assert answer["sha256"] == hashlib.sha256(body).hexdigest() and answer["size"] == len(body)


def test_chunked_bodies_and_keep_alive_requests_do_not_mix(server: tuple[int, uvicorn.Server]) -> None:
    first, second, third = os.urandom(150_000), os.urandom(90_000), b""
    chunked = b"".join(
        f"{len(first[i : i + 30_000]):x}\r\n".encode() + first[i : i + 30_000] + b"\r\n"
        for i in range(0, len(first), 30_000)
    )
    with socket.create_connection(("127.0.0.1", server[0])) as sock:
        sock.sendall(
            b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
        )
        assert _read_answer(sock)["sha256"] == hashlib.sha256(first).hexdigest()
        sock.sendall(
            f"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: {len(second)}\r\n\r\n".encode() + second
        )
        assert _read_answer(sock)["sha256"] == hashlib.sha256(second).hexdigest()
        sock.sendall(b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = _read_answer(sock)
        assert answer["sha256"] == hashlib.sha256(third).hexdigest() and answer["size"] == 0


def test_every_launch_of_the_api_uses_the_protocol() -> None:
    """Compose, the image, Kubernetes, the test servers and the benchmarks all start uvicorn with it."""
    compose = (REPO / "docker-compose.yml").read_text()
    assert f'"--http", "{PROTOCOL}"' in compose
    assert f'"--http", "{PROTOCOL}"' in (REPO / "infra" / "Dockerfile").read_text()
    assert f"--http={PROTOCOL}" in (REPO / "infra" / "k8s" / "api.yaml").read_text()
    assert f'"{PROTOCOL}"' in (REPO / "tests" / "api_helpers.py").read_text()
    assert f'"{PROTOCOL}"' in (REPO / "bench" / "_harness.py").read_text()
